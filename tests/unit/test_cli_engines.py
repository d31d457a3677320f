"""`kingpost engines`: the rows it prints from the API's answer."""

from __future__ import annotations

from kingpost.cli.engines import node_rows


def test_a_cluster_engine_gets_a_row_per_node_and_a_local_one_a_single_row() -> None:
    answer = {
        "engines": [
            {"name": "process", "running": True, "default": False, "nodes": None},
            {"name": "docker", "running": False, "default": False, "nodes": None},
            {
                "name": "ray",
                "running": True,
                "default": True,
                "nodes": [
                    {
                        "address": "10.77.0.3",
                        "alive": True,
                        "resources": {"CPU": 2.0, "memory": 2**31},
                        "replicas": [{"replica_id": "d1-a"}, {"replica_id": "d2-b"}],
                    },
                    {"address": "10.77.0.4", "alive": False, "resources": {}, "replicas": []},
                ],
            },
        ]
    }
    rows = node_rows(answer)
    assert [r["engine"] for r in rows] == ["process", "ray (default)", "ray (default)"]
    assert rows[0]["node"] == "this machine"
    assert rows[1] == {
        "engine": "ray (default)",
        "node": "10.77.0.3",
        "alive": "yes",
        "cpu": "2",
        "memory": "2.0 GiB",
        "gpu": "",
        "replicas": "d1-a, d2-b",
    }
    assert rows[2]["alive"] == "no" and rows[2]["replicas"] == ""
