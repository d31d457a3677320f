"""The Ray engine's pure parts: what a replica asks of Ray, whether a cluster can hold it,
the project archive's hash, the per-replica secrets key."""

from __future__ import annotations

from pathlib import Path

import pytest

from kingpost.config import TrussConfig
from kingpost.engines._ray_node import pack_project
from kingpost.engines.base import Probes, ReplicaSpec, ServerKind
from kingpost.engines.ray_engine import (
    actor_name,
    replica_resources,
    unplaceable,
    waiting_for_room,
)

GI = 2**30


def _spec(resources: dict[str, object]) -> ReplicaSpec:
    config = TrussConfig.model_validate({"resources": resources})
    return ReplicaSpec(
        "d1-r1", "d1", "m1", ServerKind.MODEL_CLASS, Path("."), 8080, "/predict", Probes(),
        config=config,
    )  # fmt: skip


def _node(cpu: float, memory: float, gpu: float = 0, alive: bool = True) -> dict[str, object]:
    res = {"CPU": cpu, "memory": memory, **({"GPU": gpu} if gpu else {})}
    return {"Alive": alive, "Resources": res}


@pytest.mark.parametrize(
    ("resources", "asks"),
    [
        ({"cpu": "500m", "memory": "1Gi"}, {"CPU": 0.5, "memory": float(GI)}),
        ({"cpu": "2", "memory": "512Mi"}, {"CPU": 2.0, "memory": 512.0 * 2**20}),
        (
            {"cpu": "1", "memory": "2Gi", "accelerator": "A10G:2"},
            {"CPU": 1.0, "memory": 2.0 * GI, "GPU": 2.0},
        ),
    ],
)
def test_a_replica_asks_ray_for_the_configs_cpu_memory_and_gpus(
    resources: dict[str, object], asks: dict[str, float]
) -> None:
    assert replica_resources(_spec(resources)) == asks


@pytest.mark.parametrize(
    ("asks", "nodes", "words"),
    [
        ({"CPU": 1.0}, [_node(2, GI)], None),
        ({"CPU": 4.0}, [_node(2, GI), _node(3, GI)], "cpu asks 4, the largest node has 3"),
        ({"CPU": 4.0}, [_node(8, GI, alive=False), _node(2, GI)], "the largest node has 2"),
        ({"CPU": 1.0, "GPU": 1.0}, [_node(8, GI)], "accelerator asks 1, the largest node has 0"),
        ({"CPU": 1.0, "memory": 4.0 * GI}, [_node(8, GI)], "resources.memory asks 4.00Gi"),
        # Each amount exists, but on different nodes: none holds all of it at once.
        ({"CPU": 4.0, "GPU": 1.0}, [_node(8, GI), _node(1, GI, gpu=1)], "no node has all of it"),
    ],
)  # fmt: skip
def test_a_replica_no_live_node_can_hold_is_refused_with_what_is_missing(
    asks: dict[str, float], nodes: list[dict[str, object]], words: str | None
) -> None:
    why = unplaceable(asks, nodes)
    if words is None:
        assert why is None
    else:
        assert why is not None and words in why, why


def test_the_project_archive_hash_depends_on_contents_only(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / name / "model").mkdir(parents=True)
        (tmp_path / name / "model" / "model.py").write_text("x = 1\n")
        (tmp_path / name / "config.yaml").write_text("model_name: m\n")
    (tmp_path / "b" / "config.yaml").touch()  # another mtime, same bytes
    _, one = pack_project(tmp_path / "a")
    _, two = pack_project(tmp_path / "b")
    assert one == two
    (tmp_path / "b" / "config.yaml").write_text("model_name: n\n")
    assert pack_project(tmp_path / "b")[1] != one


def test_actor_names_carry_scope_deployment_and_replica() -> None:
    assert actor_name("abc", "d1", "d1-r1").split(":", 3) == ["kp", "abc", "d1", "d1-r1"]


def test_a_replica_waiting_for_room_says_what_it_asks_and_what_is_free() -> None:
    asks = {"CPU": 2.0, "memory": 128 * 2**20}
    nodes = [{"CPU": 1.0, "memory": 3 * 2**30, "GPU": 1.0}, {"CPU": 1.5, "memory": 2**30}]
    why = waiting_for_room(asks, nodes)
    assert why is not None and why.startswith("waiting for room on the Ray cluster"), why
    assert "it asks cpu 2, memory 0.12Gi on one node" in why, why
    assert "(the most free on any node: cpu 1.5, memory 3.00Gi)" in why, why
    assert "GPU" not in why  # only what it asks for
    # 2.5 CPUs free in all, but not on one node: still waiting
    assert waiting_for_room(asks, nodes) is not None
    # a node with room: Ray is placing it
    assert waiting_for_room(asks, [*nodes, {"CPU": 2.0, "memory": 2**30}]) is None
    assert "cpu 0" in (waiting_for_room({"CPU": 1.0}, []) or "")  # no node at all
