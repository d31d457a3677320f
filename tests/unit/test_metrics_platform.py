"""The platform's series from a real controller and store (fake engine): replicas by
state, starts and failures, deployment status, a running rollout and its split, the
reconcile loop; labelled by model, deployment and environment."""

from __future__ import annotations

from pathlib import Path

from test_controller_loop import Rig
from test_controller_rollouts_loop import ready_all

from kingpost.engines.base import ReplicaPhase
from kingpost.engines.fake import FakeEngine
from kingpost.metrics.platform import collect
from kingpost.metrics.text import Family


def _value(families: list[Family], name: str, **labels: str) -> float | None:
    found = [
        v
        for fam in families
        for n, lab, v in fam.samples
        if n == name and labels.items() <= lab.items()
    ]
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else None


def test_a_running_rollout_and_the_replicas_of_both_sides(tmp_path: Path) -> None:
    rig = Rig(tmp_path, engine=FakeEngine(auto_ready=False))
    rig.deploy()
    rig.controller.reconcile_once()
    ready_all(rig)
    rig.controller.reconcile_once()
    rig.deploy()
    third = rig.deploy()
    rig.store.promote("loop", third, "production")  # a rollout: deployment-3 rolls in
    rig.controller.reconcile_once()
    fams = collect(rig.controller, rig.store)

    prod = {"model": "loop", "deployment": "deployment-1", "environment": "production"}
    assert _value(fams, "kingpost_replicas", **prod, state="ready") == 1
    assert _value(fams, "kingpost_replicas", **prod, state="starting") == 0
    assert _value(fams, "kingpost_replica_starts_total", **prod) == 1
    assert _value(fams, "kingpost_deployment_status", **prod, status="ACTIVE") == 1
    cand = {"model": "loop", "deployment": "deployment-3", "environment": "production"}
    assert _value(fams, "kingpost_replicas", model="loop", deployment="deployment-3",
                  state="starting") == 1  # fmt: skip
    info = _value(fams, "kingpost_rollout_info", **cand, previous_deployment="deployment-1",
                  status="IN_PROGRESS")  # fmt: skip
    assert info == 1
    assert _value(fams, "kingpost_rollout_candidate_traffic_ratio", **cand) == 0.0
    # The dashboard's rollout panel names these (tests/integration/test_metrics.py).
    dashboard = (Path(__file__).resolve().parents[2] / "docs/grafana-dashboard.json").read_text()
    assert "kingpost_rollout_info" in dashboard
    assert "kingpost_rollout_candidate_traffic_ratio" in dashboard
    assert _value(fams, "kingpost_reconcile_duration_seconds_count") == 3
    # deployment-2 is in no environment: its label is empty, not another's.
    assert _value(fams, "kingpost_deployment_status", deployment="deployment-2",
                  environment="") == 1  # fmt: skip

    (candidate,) = rig.engine.live(third)
    rig.engine.set_phase(candidate, ReplicaPhase.FAILED, "exited 1")
    rig.controller.reconcile_once()
    fams = collect(rig.controller, rig.store)
    assert _value(fams, "kingpost_replica_failures_total", deployment="deployment-3") == 1
    assert _value(fams, "kingpost_replica_failures_total", **prod) == 0
    # The routing table carries the same labels, for the gateway's own /metrics (the
    # rollout's candidate: none, as in kingpost_replicas above, until production is its).
    table = rig.controller.reconcile_once()
    named = {(r.name, r.environment) for r in table.deployments.values()}
    assert named == {("deployment-1", "production"), ("deployment-2", ""), ("deployment-3", "")}
