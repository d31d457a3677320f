"""The loop applies rollouts: replica counts per side, weighted traffic, the environment
moving only once the candidate is ready (fake engine, real SQLite store)."""

from __future__ import annotations

from pathlib import Path

from test_controller_loop import Rig

from kingpost.controller.loop import DRAIN_GRACE_S, Controller
from kingpost.engines.base import ReplicaPhase
from kingpost.engines.fake import FakeEngine
from kingpost.gateway.stats import DeploymentStats, GatewayStats
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


def test_a_ready_replica_leaves_the_table_before_it_stops_and_waits_for_its_requests(
    tmp_path: Path,
) -> None:
    rig = Rig(tmp_path)
    now = [1000.0]
    inflight: dict[str, int] = {}
    stats_at = [0.0]

    def stats() -> GatewayStats:
        return GatewayStats({dep: DeploymentStats(inflight=dict(inflight))}, at=stats_at[0])

    controller = Controller(
        rig.settings, rig.store, push=rig.pushed.append, pull_stats=stats,
        engines={"fake": rig.engine}, clock=lambda: now[0],
    )  # fmt: skip
    dep = rig.deploy(min_replicas=2, max_replicas=2)
    controller.reconcile_once()
    controller.reconcile_once()
    assert len(controller.table.deployments[dep].upstreams) == 2
    rig.store.set_desired(dep, DesiredState.INACTIVE)
    (first, second) = rig.engine.live(dep)
    inflight.update({first: 1, second: 0})
    stats_at[0] = now[0] - 5  # figures from before the drain began: they tell nothing
    controller.reconcile_once()
    assert controller.table.deployments[dep].upstreams == ()  # out of the table at once
    assert rig.engine.live(dep) == [first, second]  # still running: draining
    # Fresh figures (pulled at the end of a pass, read by the next): one request is still
    # in flight on the first.
    now[0] += 1
    stats_at[0] = now[0]
    controller.reconcile_once()
    assert rig.engine.live(dep) == [first, second]
    controller.reconcile_once()
    assert rig.engine.live(dep) == [first]
    inflight[first] = 0
    controller.reconcile_once()
    assert rig.engine.live(dep) == [first]  # these figures are from before it finished
    controller.reconcile_once()
    assert rig.engine.live(dep) == []


def test_a_replica_stuck_with_requests_stops_after_the_drain_grace(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    now = [1000.0]
    dep = rig.deploy()

    def stats() -> GatewayStats:
        (rid,) = rig.engine.live(dep)
        return GatewayStats({dep: DeploymentStats(inflight={rid: 1})}, at=now[0])

    controller = Controller(
        rig.settings, rig.store, push=rig.pushed.append, pull_stats=stats,
        engines={"fake": rig.engine}, clock=lambda: now[0],
    )  # fmt: skip
    controller.reconcile_once()
    controller.reconcile_once()
    rig.store.set_desired(dep, DesiredState.INACTIVE)
    controller.reconcile_once()
    now[0] += DRAIN_GRACE_S - 1
    controller.reconcile_once()
    assert len(rig.engine.live(dep)) == 1
    now[0] += 1
    controller.reconcile_once()
    assert rig.engine.live(dep) == []


def test_a_candidate_not_ready_in_time_fails_with_its_last_log_lines(tmp_path: Path) -> None:
    rig = Rig(tmp_path, engine=FakeEngine(auto_ready=False))
    now = [1000.0]
    controller = Controller(
        rig.settings, rig.store, push=rig.pushed.append, engines={"fake": rig.engine},
        clock=lambda: now[0],
    )  # fmt: skip
    first = rig.deploy()
    controller.reconcile_once()
    ready_all(rig)
    controller.reconcile_once()
    rig.store.set_promotion_settings("loop", "production", {"ready_timeout_seconds": 5})
    second = rig.deploy(environment="production")
    controller.reconcile_once()
    now[0] += 5
    controller.reconcile_once()
    assert rig.store.latest_rollout("loop", "production").status == RolloutStatus.IN_PROGRESS  # type: ignore[union-attr]
    now[0] += 1
    controller.reconcile_once()
    rollout = rig.store.latest_rollout("loop", "production")
    assert rollout is not None and rollout.status == RolloutStatus.FAILED
    assert "0 of 1 replica(s) ready after 5 s" in rollout.message
    assert "last log lines:\nfake output" in rollout.message
    assert controller.table.models[rollout.model_id].environments["production"] == ((first, 1.0),)
    assert rig.store.get_deployment(second).desired_state == DesiredState.INACTIVE


def test_a_failed_rollout_gives_the_previous_deployment_back_all_its_replicas(
    tmp_path: Path,
) -> None:
    """Once a rollout ended, autoscaling went on from the count of the step before the
    last: a previous deployment at ``min_replica`` 0, cut to 1 of 2 by a step, stayed at
    1 after the candidate failed (and at 0 it would have cold-started)."""
    from kingpost.store.autoscaling import update_deployment_settings

    rig = Rig(tmp_path, engine=FakeEngine(auto_ready=False))
    first = rig.deploy(min_replicas=2, max_replicas=2)
    for _ in range(2):
        rig.controller.reconcile_once()
        ready_all(rig)
    update_deployment_settings(
        rig.store, "loop", first,
        {"min_replica": 0, "autoscaling_window": 10, "scale_down_delay": 600},
    )  # fmt: skip
    rig.controller.reconcile_once()
    assert len(rig.engine.live(first)) == 2
    rig.store.set_promotion_settings("loop", "production", ROLLING)
    second = rig.deploy(min_replicas=2, max_replicas=2, environment="production")
    for _ in range(6):  # one candidate ready, so one previous replica goes
        rig.controller.reconcile_once()
        ready_all(rig)
        if len(rig.engine.live(first)) == 1:
            break
    assert len(rig.engine.live(first)) == 1
    for rid in rig.engine.live(second):
        rig.engine.set_phase(rid, ReplicaPhase.FAILED, "exited 1: boom")
    for _ in range(4):
        rig.controller.reconcile_once()
        ready_all(rig)
    rollout = rig.store.latest_rollout("loop", "production")
    assert rollout is not None and rollout.status == RolloutStatus.FAILED
    assert not rig.controller.rollout_active(first)
    assert rig.controller.scaler.wanted(first, -1) == 2
    assert len(rig.engine.live(first)) == 2 and serving(rig, first) == 2


def test_a_candidate_deactivated_as_the_rollout_succeeds_leaves_production_where_it_was(
    tmp_path: Path,
) -> None:
    """The pass decided SUCCEEDED from its snapshot; a user's deactivation (or delete)
    of the candidate committed before the pass recorded it, and production then pointed
    at a deployment that no longer ran. A delete is refused while the rollout runs; a
    deactivation is not, and the terminal write sees it."""
    from kingpost.errors import ConflictError

    rig = Rig(tmp_path, engine=FakeEngine(auto_ready=False))
    first = rig.deploy()
    rig.controller.reconcile_once()
    ready_all(rig)
    rig.controller.reconcile_once()
    second = rig.deploy()
    rig.store.promote("loop", second, "production")
    rig.controller.reconcile_once()
    record = rig.store.record_rollout
    refused: list[ConflictError] = []

    def racing(rollout_id: str, fields: dict[str, object], seen: tuple[str, str | None]):  # type: ignore[no-untyped-def]
        if fields.get("status") == RolloutStatus.SUCCEEDED:  # the user's calls land here
            try:
                rig.store.set_desired(second, DesiredState.DELETED, "loop")
            except ConflictError as exc:
                refused.append(exc)
            rig.store.set_desired(second, DesiredState.INACTIVE, "loop")
        return record(rollout_id, fields, seen)

    rig.store.record_rollout = racing  # type: ignore[method-assign]
    ready_all(rig)
    rig.controller.reconcile_once()
    rig.controller.reconcile_once()
    assert refused and "cancel the promotion first" in str(refused[0])
    rollout = rig.store.latest_rollout("loop", "production")
    assert rollout is not None and rollout.status == RolloutStatus.FAILED
    assert "deactivated or deleted" in rollout.message
    assert rig.store.get_environment("loop", "production").deployment_id == first
    assert production(rig) == ((first, 1.0),)
    assert rig.engine.live(first) and not rig.engine.live(second)
