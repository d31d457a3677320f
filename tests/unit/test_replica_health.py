"""ReplicaHealth's rules as a table: rounds of (time, ready, alive) -> phase and verdict."""

from __future__ import annotations

import pytest

from kingpost.engines.base import Probes, ReplicaPhase
from kingpost.engines.probes import MAX_EXITS_BEFORE_READY, ReplicaHealth

PROBES = Probes(
    initial_delay_s=10,
    readiness_failure_threshold=2,
    liveness_failure_threshold=3,
    startup_timeout_s=60,
)
R, N, S = ReplicaPhase.READY, ReplicaPhase.NOT_READY, ReplicaPhase.STARTING
LIVE_FAIL, SLOW = "liveness probe failed", "not ready after 60s"

# Each round: (now, ready, alive) -> (phase after it, restart reason or None).
CASES = {
    "ready-at-once": [((1, True, None), (R, None))],
    "starting-until-ready": [((1, False, None), (S, None)), ((5, True, None), (R, None))],
    "never-ready-times-out": [((30, False, None), (S, None)), ((61, False, None), (S, SLOW))],
    "readiness-threshold-takes-traffic-away": [
        ((1, True, None), (R, None)),
        ((2, False, None), (R, None)),  # one failure: still serving
        ((3, False, None), (N, None)),  # the threshold: no traffic, no restart
        ((4, True, None), (R, None)),  # back
    ],
    "no-liveness-before-the-initial-delay": [
        ((1, True, None), (R, None)),
        ((2, False, None), (R, None)),
        *[((t, False, None), (N, None)) for t in (3, 4, 5, 9)],  # failing, not restarted
    ],
    "liveness-threshold-restarts": [
        ((11, True, True), (R, None)),
        ((12, True, False), (R, None)),
        ((13, True, False), (R, None)),
        ((14, True, False), (R, LIVE_FAIL)),
    ],
    "a-live-round-resets-the-count": [
        ((11, True, False), (R, None)),
        ((12, True, False), (R, None)),
        ((13, True, True), (R, None)),
        ((14, True, False), (R, None)),
        ((15, True, False), (R, None)),
        ((16, True, False), (R, LIVE_FAIL)),
    ],
    "ready-once-never-times-out": [((1, True, None), (R, None)), ((500, False, None), (R, None))],
}


@pytest.mark.parametrize("rounds", CASES.values(), ids=CASES.keys())
def test_rounds(
    rounds: list[tuple[tuple[float, bool, bool | None], tuple[object, object]]],
) -> None:
    health = ReplicaHealth(launched=0.0)
    for (now, ready, alive), (phase, verdict) in rounds:
        assert health.judge(PROBES, now, ready, alive) == verdict, (now, ready, alive)
        assert health.phase == phase, (now, ready, alive)


def test_exits_before_ready_give_up_after_the_limit_and_never_once_ready() -> None:
    health = ReplicaHealth()
    assert [health.give_up() for _ in range(MAX_EXITS_BEFORE_READY)] == [False, False, True]
    ready_once = ReplicaHealth(ever_ready=True)
    assert not any(ready_once.give_up() for _ in range(10))


def test_backoff_doubles_and_is_capped() -> None:
    health = ReplicaHealth()
    delays = []
    for _ in range(8):
        health.back_off(100.0, "exited 1")
        delays.append(health.next_start - 100.0)
    assert delays == [1, 2, 4, 8, 16, 30, 30, 30]
    assert (health.phase, health.message, health.restarts) == (
        ReplicaPhase.RESTARTING,
        "exited 1",
        8,
    )


@pytest.mark.parametrize(
    ("age", "ever_ready", "period", "expected"),
    [
        (0.0, False, 10.0, 0.01),  # just launched: every 10 ms
        (1.9, False, 10.0, 0.01),
        (2.0, False, 10.0, 0.05),  # then every 50 ms
        (9.9, False, 10.0, 0.05),
        (10.0, False, 10.0, 10.0),  # a slow load: the configured period
        (0.5, False, 0.005, 0.005),  # never slower than the configured period
        (0.5, True, 10.0, 10.0),  # once ready, the configured period
    ],
)
def test_probe_period_is_fast_while_a_replica_first_starts(
    age: float, ever_ready: bool, period: float, expected: float
) -> None:
    health = ReplicaHealth(launched=100.0, ever_ready=ever_ready)
    assert health.probe_period(period, 100.0 + age) == expected
