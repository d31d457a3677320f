"""The stats channel's pure parts: counting answers, the JSON form, merging workers."""

from __future__ import annotations

import pytest

from kingpost.gateway.stats import (
    DeploymentCounters,
    DeploymentStats,
    GatewayStats,
    merge_snapshots,
)


@pytest.mark.parametrize(
    ("status", "cls"),
    [(200, 2), (204, 2), (101, 1), (302, 3), (404, 4), (429, 4), (503, 5), (0, 0), (999, 0)],
)
def test_an_answer_counts_in_its_status_class(status: int, cls: int) -> None:
    counters = DeploymentCounters()
    counters.record(status, 0.25)
    assert counters.by_class == [int(i == cls) for i in range(6)]
    assert counters.latency_sum_s == 0.25


def _snap(workers: int = 1, **deps: DeploymentStats) -> GatewayStats:
    return GatewayStats(dict(deps), workers=workers, at=100.0 + workers)


def test_workers_merge_by_deployment_and_replica() -> None:
    a = _snap(d1=DeploymentStats(2, {"r1": 1, "r2": 2}, {"2xx": 5, "5xx": 1}, 1.5))
    b = _snap(
        2,
        d1=DeploymentStats(1, {"r2": 1, "r3": 1}, {"2xx": 3}, 0.5),
        d2=DeploymentStats(0, {"r9": 1}, {"4xx": 2}, 0.1),
    )
    merged = merge_snapshots([a, b])
    d1 = merged.deployments["d1"]
    assert (merged.workers, merged.at) == (3, 102.0)
    assert (d1.queued, d1.inflight, d1.inflight_total) == (3, {"r1": 1, "r2": 3, "r3": 1}, 5)
    assert (d1.answered["2xx"], d1.answered["5xx"], d1.latency_sum_s) == (8, 1, 2.0)
    assert merged.deployments["d2"].answered["4xx"] == 2
    assert merge_snapshots([]).deployments == {}


def test_the_json_form_round_trips_and_fills_missing_classes() -> None:
    snap = _snap(d1=DeploymentStats(1, {"r": 2}, {"2xx": 4}, 0.75))
    again = GatewayStats.from_json(snap.to_json())
    d1 = again.deployments["d1"]
    assert (d1.queued, d1.inflight, d1.latency_sum_s, again.at) == (1, {"r": 2}, 0.75, 101.0)
    assert d1.answered == {"none": 0, "1xx": 0, "2xx": 4, "3xx": 0, "4xx": 0, "5xx": 0}


def test_labels_and_the_control_age_travel_and_merge() -> None:
    """The gateway's own /metrics labels deployments from what its workers' tables say,
    and shows the oldest table push over workers (a dead control plane)."""
    a = GatewayStats(
        {}, labels={"d1": {"model": "m", "deployment": "v1", "environment": "production"}}
    )
    a.control_age_s = 2.5
    b = GatewayStats({}, labels={"d2": {"model": "m", "deployment": "v2", "environment": ""}})
    b.control_age_s = 40.0
    merged = merge_snapshots(
        [GatewayStats.from_json(a.to_json()), GatewayStats.from_json(b.to_json())]
    )
    assert merged.labels == {
        "d1": {"model": "m", "deployment": "v1", "environment": "production"},
        "d2": {"model": "m", "deployment": "v2", "environment": ""},
    }
    assert merged.control_age_s == 40.0
    assert merge_snapshots([]).control_age_s == -1.0
    # A snapshot from a gateway of the version before: no labels, age unknown.
    assert GatewayStats.from_json({"deployments": {}}).control_age_s == -1.0
