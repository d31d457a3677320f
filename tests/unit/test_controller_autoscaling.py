"""The loop's autoscaling against the fake engine, a real SQLite store and an injected
clock: samples from the gateway's stats become replicas; a scale-down drains first."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pytest
from tests.unit.test_controller_loop import Rig

from kingpost.controller.loop import Controller
from kingpost.engines.base import ReplicaPhase
from kingpost.gateway.stats import DeploymentStats, GatewayStats
from kingpost.store.autoscaling import (
    effective_settings,
    update_deployment_settings,
    update_environment_settings,
)


class Gateway:
    """What the gateway would report: in-flight requests per replica, at a time."""

    def __init__(self, now: list[float]) -> None:
        self.now = now
        self.inflight: dict[str, dict[str, int]] = {}

    def pull(self) -> GatewayStats:
        deps = {d: DeploymentStats(inflight=dict(r)) for d, r in self.inflight.items()}
        return GatewayStats(deps, at=self.now[0])


def _rig(tmp_path: Path) -> tuple[Rig, Gateway, list[float]]:
    now = [1000.0]
    gw = Gateway(now)
    rig = Rig(tmp_path)
    rig.controller = Controller(
        rig.settings, rig.store, push=rig.pushed.append, engines={"fake": rig.engine},
        pull_stats=gw.pull, clock=lambda: now[0],
    )  # fmt: skip
    return rig, gw, now


def _tick(rig: Rig, now: list[float], seconds: float = 1.0) -> None:
    now[0] += seconds
    rig.controller.reconcile_once()


def test_load_adds_replicas_and_a_scale_down_drains_before_stopping(tmp_path: Path) -> None:
    rig, gw, now = _rig(tmp_path)
    dep = rig.deploy()
    settings = {
        "max_replica": 3, "autoscaling_window": 10, "scale_down_delay": 0,
        "concurrency_target": 2, "target_utilization_percentage": 100,
    }  # fmt: skip
    update_deployment_settings(rig.store, "loop", dep, settings)
    rig.controller.reconcile_once()
    (first,) = rig.engine.live(dep)
    gw.inflight = {dep: {first: 6}}
    for _ in range(6):
        _tick(rig, now)
    live = rig.engine.live(dep)
    assert len(live) == 3, rig.controller.scaler.counts(dep)
    counts = rig.controller.scaler.counts(dep)
    assert counts is not None and (counts.wanted, counts.ready) == (3, 3)
    # The load halves (3 in flight, one on each replica): 2 replicas are enough.
    gw.inflight = {dep: dict.fromkeys(live, 1)}
    for _ in range(12):
        _tick(rig, now)
    gw.inflight = {dep: dict.fromkeys(live, 1)}
    routed = {u.replica_id for u in rig.pushed[-1].deployments[dep].upstreams}
    draining = set(live) - routed
    assert draining, "a replica should have left the table"
    assert draining <= set(rig.engine.live(dep)), "stopped while a request was in flight"
    gw.inflight = {dep: {}}
    _tick(rig, now)  # pulls the stats that show them idle
    _tick(rig, now)  # stops them
    assert not draining & set(rig.engine.live(dep)), "drained replicas should be stopped"
    # Not back in the table of the pass that stopped them (it polled before the stop).
    assert not draining & {u.replica_id for u in rig.pushed[-1].deployments[dep].upstreams}


def test_settings_changed_in_place_apply_without_a_restart(tmp_path: Path) -> None:
    rig, _, now = _rig(tmp_path)
    dep = rig.deploy()
    rig.controller.reconcile_once()
    (first,) = rig.engine.live(dep)
    update_deployment_settings(rig.store, "loop", dep, {"min_replica": 2, "max_replica": 2})
    _tick(rig, now)
    live = rig.engine.live(dep)
    assert len(live) == 2 and first in live  # the serving replica was not replaced
    assert rig.store.get_deployment(dep).id == dep


def test_an_environments_min_replica_governs_the_deployment_it_points_at(
    tmp_path: Path,
) -> None:
    """The environment's set was merged onto the deployment's own one field at a time, and
    a field that failed was dropped: ``min_replica`` 2 came first, failed against the
    deployment's own ``max_replica`` 1 (every push's default), and the deployment ran 1."""
    rig, _, now = _rig(tmp_path)
    dep = rig.deploy()  # its own settings: min 1, max 1
    status, _, env = update_environment_settings(
        rig.store, "loop", "production", {"min_replica": 2, "max_replica": 3}
    )
    assert status == "ACCEPTED" and env.autoscaling_settings is not None
    settings, source = effective_settings(
        rig.store.get_deployment(dep), rig.store.list_environments("loop")
    )
    assert (settings.min_replica, settings.max_replica, source) == (2, 3, "production")
    for _ in range(3):
        _tick(rig, now)
    assert len(rig.engine.live(dep)) == 2


def test_an_environment_set_that_no_longer_validates_applies_field_by_field_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A stored set is validated whole when written; one that fails later (a rule changed)
    still applies what it can, and says what it left out, once."""
    rig, _, _ = _rig(tmp_path)
    dep = rig.store.get_deployment(rig.deploy())
    (env,) = rig.store.list_environments("loop")
    stored = {"min_replica": 2, "max_replica": 3, "autoscaling_window": 5}
    env = replace(env, autoscaling_settings=stored)
    with caplog.at_level(logging.WARNING, logger="kingpost.store.autoscaling"):
        settings, source = effective_settings(dep, [env])
        effective_settings(dep, [env])
    assert (settings.max_replica, settings.autoscaling_window, source) == (3, 60, "production")
    (warning,) = caplog.records
    assert "autoscaling_window=5" in warning.getMessage()
    assert "production" in warning.getMessage() and dep.id in warning.getMessage()


def test_a_frozen_deployment_keeps_its_count(tmp_path: Path) -> None:
    rig, gw, now = _rig(tmp_path)
    dep = rig.deploy()
    update_deployment_settings(rig.store, "loop", dep, {"max_replica": 3})
    rig.controller.reconcile_once()
    (first,) = rig.engine.live(dep)
    # What a running rollout does each pass: it holds the deployment at its count.
    rig.controller._advance_rollouts = lambda _replicas: rig.controller.scaler.hold({dep: 1})  # type: ignore[method-assign]
    gw.inflight = {dep: {first: 10}}
    for _ in range(3):
        _tick(rig, now)
    assert rig.engine.live(dep) == [first]


def test_a_wake_at_zero_starts_a_replica_at_the_next_pass(tmp_path: Path) -> None:
    rig, _, now = _rig(tmp_path)
    dep = rig.deploy(min_replicas=0)
    update_deployment_settings(
        rig.store, "loop", dep, {"autoscaling_window": 10, "scale_down_delay": 0}
    )
    for _ in range(16):
        _tick(rig, now)
    assert rig.engine.live(dep) == []
    assert rig.store.get_deployment(dep).status == "SCALED_TO_ZERO"
    rig.controller.wake_deployment(dep)
    rig.controller.reconcile_once()  # no time passes: the demand sample is enough
    assert len(rig.engine.live(dep)) == 1


def test_a_wake_during_the_last_replicas_drain_never_routes_to_it(tmp_path: Path) -> None:
    """At zero, the last replica drains; a request wakes the deployment meanwhile. The pass
    that stops the drained replica polled it before the stop: it must not count as the
    capacity the wake asked for (which stopped the new replica and routed to the old)."""
    rig, _, now = _rig(tmp_path)
    rig.engine.auto_ready = False
    dep = rig.deploy(min_replicas=0)
    settings = {"autoscaling_window": 10, "scale_down_delay": 0}
    update_deployment_settings(rig.store, "loop", dep, settings)
    rig.controller.reconcile_once()
    (old,) = rig.engine.live(dep)
    rig.engine.set_phase(old, ReplicaPhase.READY)
    while rig.controller.scaler.wanted(dep, 1) != 0:
        _tick(rig, now)
    assert old in rig.engine.live(dep)  # draining
    rig.controller.wake_deployment(dep)
    _tick(rig, now)
    (new,) = set(rig.engine.live(dep)) - {old}
    for _ in range(3):
        _tick(rig, now)
        assert old not in {u.replica_id for u in rig.pushed[-1].deployments[dep].upstreams}
    assert rig.engine.live(dep) == [new]


def test_a_build_longer_than_the_delay_does_not_scale_to_zero(tmp_path: Path) -> None:
    from kingpost.store import DeploymentStatus

    rig, _, now = _rig(tmp_path)
    dep = rig.deploy(min_replicas=0)
    update_deployment_settings(
        rig.store, "loop", dep, {"autoscaling_window": 10, "scale_down_delay": 0}
    )
    scaler = rig.controller.scaler
    building = rig.store.get_deployment(dep)
    object.__setattr__(building, "status", DeploymentStatus.BUILDING)
    from kingpost.store.autoscaling import deployment_settings

    for t in range(30):
        scaler.observe(GatewayStats({}, at=now[0] + t), [dep], now[0] + t)  # idle
        wanted = scaler.step(building, deployment_settings(building), [], now[0] + t)
    assert wanted == 1
    counts = scaler.counts(dep)
    assert counts is not None and "building" in counts.reason


def test_a_promotion_under_load_starts_from_the_replicas_serving_now(tmp_path: Path) -> None:
    """A rollout took the previous deployment's ``min_replicas`` as its size: promoting
    while the autoscaler ran 4 replicas cut the previous deployment to 1 at the first pass
    (and the candidate would have ended with 1)."""
    rig, gw, now = _rig(tmp_path)
    first = rig.deploy(environment="production")
    settings = {
        "max_replica": 4, "autoscaling_window": 10, "scale_down_delay": 0,
        "concurrency_target": 1, "target_utilization_percentage": 100,
    }  # fmt: skip
    update_deployment_settings(rig.store, "loop", first, settings)
    rig.controller.reconcile_once()
    (r0,) = rig.engine.live(first)
    gw.inflight = {first: {r0: 8}}
    for _ in range(8):
        _tick(rig, now)
    live = rig.engine.live(first)
    assert len(live) == 4
    gw.inflight = {first: dict.fromkeys(live, 2)}
    rig.deploy(environment="production")
    _tick(rig, now)
    rollout = rig.store.latest_rollout("loop", "production")
    assert rollout is not None
    assert (rollout.previous_initial_replicas, rollout.target_replicas) == (4, 4)
    routed = {u.replica_id for u in rig.pushed[-1].deployments[first].upstreams}
    assert routed == set(live)


def test_a_development_swap_wakes_a_deployment_at_zero(tmp_path: Path) -> None:
    """A swap (new requirements, say) of an idle development deployment waited for a
    replica the autoscaler never started, as wanted was 0: the swap is demand."""
    import threading
    import time

    from kingpost.controller import devloop

    rig, _, now = _rig(tmp_path)
    dep_id = rig.deploy(development=True, min_replicas=0, max_replicas=1)
    update_deployment_settings(
        rig.store, "loop", dep_id, {"autoscaling_window": 10, "scale_down_delay": 0}
    )
    for _ in range(20):
        _tick(rig, now)
    dep = rig.store.get_deployment(dep_id)
    assert dep.status == "SCALED_TO_ZERO" and not rig.engine.live(dep_id)
    done: list[devloop.Applied] = []

    def run() -> None:
        diff: tuple[list[str], list[str]] = ([], [])
        started = time.perf_counter()
        done.append(
            devloop._swap(rig.controller, rig.store, dep, dep.project_hash, dep.config, diff,
                          "a test", started)
        )  # fmt: skip

    swap = threading.Thread(target=run, daemon=True)
    swap.start()
    for _ in range(100):
        if done:
            break
        _tick(rig, now, 0.1)
        time.sleep(0.05)
    assert done and done[0].ok, done
    assert len(rig.engine.live(dep_id)) == 1


def test_the_development_deployment_keeps_one_replica_and_its_scale_to_zero(
    tmp_path: Path,
) -> None:
    """A PATCH gave it max_replica 4 and the autoscaler ran 4 under load: it runs one
    replica and goes to zero when idle, as on Baseten; its other settings may change."""
    from kingpost.errors import ValidationError

    rig, _, _ = _rig(tmp_path)
    dep = rig.deploy(development=True, min_replicas=0, max_replicas=1)
    for changes, field in (
        ({"max_replica": 4}, "max_replica"),
        ({"min_replica": 1}, "min_replica"),
    ):
        with pytest.raises(ValidationError) as refused:
            update_deployment_settings(rig.store, "loop", dep, changes)
        assert refused.value.details["field"] == field
        assert "development deployment runs one replica" in refused.value.message
    view = rig.store.get_deployment(dep)
    assert (view.min_replicas, view.max_replicas) == (0, 1)
    status, _, view = update_deployment_settings(rig.store, "loop", dep, {"scale_down_delay": 60})
    assert status == "ACCEPTED" and view.autoscaling_settings["scale_down_delay"] == 60
