"""``GET /v1/engines``: which engines run, and a cluster engine's nodes (a fake engine
stands in for Ray, one seam)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from kingpost.api import ControlPlane, create_app
from kingpost.controller.loop import Controller
from kingpost.engines.fake import FakeEngine
from kingpost.serve import bootstrap
from kingpost.settings import Settings

NODES = [{"address": "10.77.0.3", "alive": True, "resources": {"CPU": 2.0}, "replicas": []}]


class _Cluster(FakeEngine):
    def __init__(self, nodes: list[dict[str, Any]] | None, fail: bool = False) -> None:
        super().__init__()
        self._nodes, self._fail = nodes, fail

    def cluster(self) -> list[dict[str, Any]] | None:
        if self._fail:
            raise ConnectionError("the GCS is gone")
        return self._nodes


def _get(tmp_path: Path, engines: dict[str, FakeEngine]) -> dict[str, Any]:
    s = Settings(home=tmp_path / "home", engine="ray")
    store = bootstrap(s, lambda _: None, show_key=True)
    key = (s.home / "credentials").read_text().strip()
    plane = ControlPlane(s, store, Controller(s, store, engines=dict(engines)))
    with TestClient(create_app(plane)) as client:
        r = client.get("/v1/engines", headers={"Authorization": f"Api-Key {key}"})
    assert r.status_code == 200, r.text
    return {e["name"]: e for e in r.json()["engines"]}


def test_the_engines_that_run_and_a_cluster_engines_nodes(tmp_path: Path) -> None:
    got = _get(tmp_path, {"ray": _Cluster(NODES), "process": _Cluster(None)})
    assert set(got) == {"process", "docker", "ray"}
    assert got["ray"]["running"] and got["ray"]["default"] and got["ray"]["nodes"] == NODES
    assert got["process"]["running"] and got["process"]["nodes"] is None
    assert not got["docker"]["running"] and got["docker"]["nodes"] is None


def test_a_cluster_that_cannot_be_read_is_said_not_raised(tmp_path: Path) -> None:
    got = _get(tmp_path, {"ray": _Cluster(None, fail=True)})
    assert got["ray"]["nodes"] is None
    assert "cannot read the cluster: the GCS is gone" in got["ray"]["error"]
