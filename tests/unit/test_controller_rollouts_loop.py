"""The loop applies rollouts: replica counts per side, weighted traffic, the environment
moving only once the candidate is ready (fake engine, real SQLite store)."""

from __future__ import annotations

from pathlib import Path

from test_controller_loop import Rig

from kingpost.engines.base import ReplicaPhase
from kingpost.engines.fake import FakeEngine
from kingpost.store import DeploymentStatus, DesiredState, RolloutStatus

ROLLING = {"rolling_deploy": True, "rolling_deploy_config": {"max_surge_percent": 50}}


def production(rig: Rig) -> tuple[tuple[str, float], ...]:
    table = rig.controller.table
    (model,) = table.models.values()
    return model.environments["production"]


def serving(rig: Rig, dep: str) -> int:
    return len(rig.controller.table.deployments[dep].upstreams)


def ready_all(rig: Rig) -> None:
    for rid in rig.engine.live():
        rig.engine.set_phase(rid, ReplicaPhase.READY)


def test_a_promotion_keeps_traffic_on_the_previous_deployment_until_the_candidate_is_ready(
    tmp_path: Path,
) -> None:
    rig = Rig(tmp_path, engine=FakeEngine(auto_ready=False))
    first = rig.deploy()
    rig.controller.reconcile_once()
    ready_all(rig)
    rig.controller.reconcile_once()
    second = rig.deploy()
    rig.store.promote("loop", second, "production")
    for _ in range(3):  # the candidate starts, and is not ready
        rig.controller.reconcile_once()
        assert production(rig) == ((first, 1.0),)
    assert rig.store.latest_rollout("loop", "production").status == RolloutStatus.IN_PROGRESS  # type: ignore[union-attr]
    ready_all(rig)
    rig.controller.reconcile_once()
    assert production(rig) == ((second, 1.0),)
    assert rig.store.latest_rollout("loop", "production").status == RolloutStatus.SUCCEEDED  # type: ignore[union-attr]
    # Not rolling: the previous deployment keeps running, in no environment now.
    assert rig.store.get_deployment(first).desired_state == DesiredState.ACTIVE


def test_a_rolling_promotion_moves_replicas_and_traffic_in_steps(tmp_path: Path) -> None:
    rig = Rig(tmp_path)  # replicas are ready at the first poll after their start
    first = rig.deploy(min_replicas=2, max_replicas=2)
    rig.controller.reconcile_once()
    rig.controller.reconcile_once()
    rig.store.set_promotion_settings("loop", "production", ROLLING)
    second = rig.deploy(min_replicas=2, max_replicas=2, environment="production")
    seen = []
    for _ in range(8):
        rig.controller.reconcile_once()
        row = (len(rig.engine.live(second)), len(rig.engine.live(first)), production(rig))
        if not seen or seen[-1] != row:
            seen.append(row)
    assert seen == [
        (1, 2, ((first, 1.0),)),  # one candidate starting; no traffic before it is ready
        (1, 1, ((first, 0.5), (second, 0.5))),  # ready: half the traffic, one previous goes
        (2, 1, ((first, 0.5), (second, 0.5))),
        (2, 0, ((second, 1.0),)),  # then SUCCEEDED: the environment points at the candidate
    ]
    rollout = rig.store.latest_rollout("loop", "production")
    assert rollout is not None
    assert (rollout.status, rollout.step, rollout.steps) == (RolloutStatus.SUCCEEDED, 2, 2)
    assert rig.store.get_deployment(first).desired_state == DesiredState.INACTIVE
    assert not rig.controller.rollout_active(second)


def test_a_candidate_that_fails_leaves_all_traffic_on_the_previous_deployment(
    tmp_path: Path,
) -> None:
    rig = Rig(tmp_path, engine=FakeEngine(auto_ready=False))
    first = rig.deploy()
    rig.controller.reconcile_once()
    ready_all(rig)
    rig.controller.reconcile_once()
    rig.store.set_promotion_settings("loop", "production", ROLLING)
    second = rig.deploy(environment="production")
    rig.controller.reconcile_once()
    assert rig.controller.rollout_active(first) and rig.controller.rollout_active(second)
    (candidate,) = rig.engine.live(second)
    rig.engine.set_phase(candidate, ReplicaPhase.FAILED, "exited 1: boom")
    for _ in range(3):
        rig.controller.reconcile_once()
    rollout = rig.store.latest_rollout("loop", "production")
    assert rollout is not None and rollout.status == RolloutStatus.FAILED
    assert "exited 1: boom" in rollout.message
    assert production(rig) == ((first, 1.0),) and serving(rig, first) == 1
    assert rig.store.get_deployment(second).desired_state == DesiredState.INACTIVE
    assert rig.store.get_deployment(first).status == DeploymentStatus.ACTIVE
