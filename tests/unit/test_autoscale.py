"""Table-driven tests of the pure autoscaling decision, on an injected clock."""

from __future__ import annotations

import itertools

import pytest

from kingpost.controller.autoscale import AutoscalingSettings, Sample, decide
from kingpost.errors import ValidationError

# Target 1 request per replica at 100%: demand N asks for N replicas.
FLAT = AutoscalingSettings(
    min_replica=1,
    max_replica=10,
    autoscaling_window=60,
    scale_down_delay=120,
    concurrency_target=1,
    target_utilization_percentage=100,
    max_scale_down_rate=50,
)


def series(start: float, end: float, demand: int, replicas: int, queued: int = 0) -> list[Sample]:
    """One sample a second in [start, end), ``demand`` in flight."""
    return [Sample(float(t), demand, queued, replicas) for t in range(int(start), int(end))]


def settings(**changes: int) -> AutoscalingSettings:
    return FLAT.merged(dict(changes))


NOW = 1000.0
# (name, settings, samples, current, frozen, expected replicas, reason contains)
CASES = [
    ("steady load holds", FLAT, series(700, NOW, 2, 2), 2, False, 2, "steady"),
    (
        "steady load at 70% utilization asks for headroom",
        settings(target_utilization_percentage=70),
        series(700, NOW, 7, 10),
        10,
        False,
        10,
        "steady",
    ),
    (
        "sustained higher load scales up on the window",
        FLAT,
        series(700, NOW, 3, 1),
        1,
        False,
        3,
        "scale up",
    ),
    (
        "10x step acts within 2 s (burst)",
        FLAT,
        series(700, NOW - 2, 1, 1) + series(NOW - 2, NOW, 10, 1),
        1,
        False,
        5,  # (3 x 1 + 2 x 10) / 5 samples in the 6 s panic window, rounded up
        "burst",
    ),
    (
        "a burst does not scale down while it lasts",
        FLAT,
        series(700, NOW - 3, 0, 8) + series(NOW - 3, NOW, 30, 8),
        8,
        False,
        10,  # capped at max_replica
        "burst",
    ),
    (
        "lull shorter than scale_down_delay holds (no flapping)",
        FLAT,
        series(700, NOW - 100, 4, 4) + series(NOW - 100, NOW, 0, 4),
        4,
        False,
        4,
        "demand was higher",
    ),
    (
        "lull longer than the delay steps down by the max rate",
        FLAT,
        series(700, NOW - 300, 8, 8) + series(NOW - 300, NOW, 1, 8),
        8,
        False,
        4,
        "scale down",
    ),
    (
        "the next step waits one window after the last",
        FLAT,
        series(700, NOW - 300, 8, 8)
        + series(NOW - 300, NOW - 30, 1, 8)
        + series(NOW - 30, NOW, 1, 4),
        4,
        False,
        4,
        "changed within",
    ),
    (
        "a window after the last step, the next step",
        FLAT,
        series(700, NOW - 300, 8, 8)
        + series(NOW - 300, NOW - 61, 1, 8)
        + series(NOW - 61, NOW, 1, 4),
        4,
        False,
        2,
        "scale down",
    ),
    (
        "a step removes at least one replica",
        settings(max_scale_down_rate=1),
        series(700, NOW, 0, 3),
        3,
        False,
        2,
        "scale down",
    ),
    (
        "down to the highest recommendation over the delay, not below",
        settings(max_scale_down_rate=100),
        series(700, NOW - 300, 8, 8) + series(NOW - 300, NOW, 3, 8),
        8,
        False,
        3,
        "scale down",
    ),
    ("never below min_replica", settings(min_replica=2), series(700, NOW, 0, 2), 2, False, 2, ""),
    (
        "never above max_replica",
        settings(max_replica=3),
        series(700, NOW, 9, 3),
        3,
        False,
        3,
        "at max_replica 3",
    ),
    (
        "a lowered max_replica applies at once",
        settings(max_replica=2),
        series(700, NOW, 5, 5),
        5,
        False,
        2,
        "outside",
    ),
    (
        "a raised min_replica applies at once",
        settings(min_replica=3, max_replica=5),
        series(700, NOW, 0, 1),
        1,
        False,
        3,
        "outside",
    ),
    (
        "frozen during a rollout",
        FLAT,
        series(700, NOW - 2, 1, 1) + series(NOW - 2, NOW, 10, 1),
        1,
        True,
        1,
        "frozen",
    ),
    (
        "frozen holds even below the delay",
        FLAT,
        series(700, NOW, 0, 6),
        6,
        True,
        6,
        "frozen",
    ),
    (
        "no history after a restart: nothing removed",
        FLAT,
        series(NOW - 5, NOW, 0, 4),
        4,
        False,
        4,
        "less than scale_down_delay",
    ),
    (
        "idle for the whole delay scales to zero",
        settings(min_replica=0, max_scale_down_rate=100),
        series(700, NOW, 0, 1),
        1,
        False,
        0,
        "scale to zero",
    ),
    (
        "one request within the delay keeps a replica",
        settings(min_replica=0),
        [*series(700, NOW - 100, 0, 1), Sample(NOW - 100, 1, 0, 1), *series(NOW - 99, NOW, 0, 1)],
        1,
        False,
        1,
        "demand was higher",
    ),
    (
        "zero to one on the first waiting request",
        settings(min_replica=0),
        [*series(700, NOW - 1, 0, 0), Sample(NOW - 0.5, 0, 1, 0)],
        0,
        False,
        1,
        "",
    ),
    (
        "a burst at zero wakes several",
        settings(min_replica=0),
        [*series(700, NOW - 1, 0, 0), Sample(NOW - 0.5, 0, 20, 0)],
        0,
        False,
        4,  # 20 over 6 panic samples... mean 20/6 = 3.3 -> 4
        "burst",
    ),
    (
        "idle at zero stays at zero",
        settings(min_replica=0),
        series(700, NOW, 0, 0),
        0,
        False,
        0,
        "",
    ),
]


@pytest.mark.parametrize(
    ("name", "cfg", "samples", "current", "frozen", "expected", "reason"),
    CASES,
    ids=[c[0] for c in CASES],
)
def test_decide(
    name: str,
    cfg: AutoscalingSettings,
    samples: list[Sample],
    current: int,
    frozen: bool,
    expected: int,
    reason: str,
) -> None:
    decision = decide(cfg, samples, current, NOW, frozen=frozen)
    assert decision.replicas == expected, decision.reason
    assert reason in decision.reason


def test_longer_lull_goes_down_to_min_one_step_at_a_time() -> None:
    """Replays a lull on a clock: every decision is applied, and the count falls by at most
    half per step, a window apart, down to min_replica, never up."""
    cfg = settings(min_replica=1, scale_down_delay=120)
    samples = series(0, 300, 8, 8)
    current, steps = 8, []
    for t in range(300, 1000):
        samples.append(Sample(float(t), 0, 0, current))
        samples = [s for s in samples if s.at > t - 200]
        decision = decide(cfg, samples, current, float(t))
        assert decision.replicas <= current
        if decision.replicas != current:
            assert decision.replicas >= current - max(1, current // 2)
            steps.append((t, decision.replicas))
            current = decision.replicas
    assert current == 1 and len(steps) >= 3
    assert steps[0][0] >= 300 + 120  # not before the delay
    assert all(b[0] - a[0] >= 60 for a, b in itertools.pairwise(steps))


def test_ten_x_step_decides_within_two_seconds() -> None:
    cfg = settings(max_replica=20)
    samples = series(0, 600, 1, 1)
    for t in (600.0, 600.5, 601.0, 601.5, 602.0):
        samples.append(Sample(t, 10, 0, 1))
        decision = decide(cfg, samples, 1, t)
        if decision.replicas > 1:
            assert t - 600 <= 2.0
            break
    else:
        pytest.fail("no scale-up within 2 s of a 10x step")


@pytest.mark.parametrize(
    ("changes", "field", "rule"),
    [
        ({"autoscaling_window": 9}, "autoscaling_window", "10-3600"),
        ({"autoscaling_window": 3601}, "autoscaling_window", "10-3600"),
        ({"scale_down_delay": -1}, "scale_down_delay", "0-3600"),
        ({"scale_down_delay": 3601}, "scale_down_delay", "0-3600"),
        ({"target_utilization_percentage": 0}, "target_utilization_percentage", "1-100"),
        ({"target_utilization_percentage": 101}, "target_utilization_percentage", "1-100"),
        ({"min_replica": -1}, "min_replica", "at least 0"),
        ({"max_replica": 0}, "max_replica", "at least 1"),
        ({"min_replica": 4, "max_replica": 3}, "min_replica", "must not exceed max_replica"),
        ({"concurrency_target": 0}, "concurrency_target", "at least 1"),
        ({"max_scale_down_rate": 0}, "max_scale_down_rate", "1-100"),
        ({"autoscaling_window": "60"}, "autoscaling_window", "integer"),
        ({"scale_down_dela": 5}, "scale_down_dela", "unknown field"),
    ],
)
def test_settings_errors_name_field_rule_and_value(
    changes: dict[str, object], field: str, rule: str
) -> None:
    with pytest.raises(ValidationError) as err:
        FLAT.merged(changes)
    assert err.value.details["field"] == field
    assert rule in err.value.message
    assert field in err.value.message


def test_settings_none_leaves_a_field_as_it_is() -> None:
    assert FLAT.merged({"max_replica": None, "min_replica": 0}).max_replica == 10


def test_no_scale_down_before_a_whole_window_is_seen_even_without_a_delay() -> None:
    cfg = settings(min_replica=0, scale_down_delay=0)
    young = series(NOW - 5, NOW, 0, 1)
    assert decide(cfg, young, 1, NOW).replicas == 1
    assert decide(cfg, series(NOW - 61, NOW, 0, 1), 1, NOW).replicas == 0


def test_a_gap_in_the_figures_removes_nothing_and_wakes_nobody() -> None:
    """A gateway restarting left no samples: the window's average fell to 0 with nothing
    seen, and the cooldown ("changed within the window") looked at no sample, so every pass
    removed replicas down to zero; then the last, old sample's waiting request woke one."""
    cfg = settings(min_replica=0, scale_down_delay=0, max_replica=8)
    loaded = series(NOW - 200, NOW - 60, 8, 8)  # the last figures: 8 in flight, a minute ago
    decision = decide(cfg, loaded, 8, NOW)
    assert decision.replicas == 8 and "no demand figures" in decision.reason
    waiting = [*series(NOW - 200, NOW - 60, 0, 0), Sample(NOW - 60, 3, 3, 0)]
    assert decide(cfg, waiting, 0, NOW).replicas == 0  # an old wait is no request now
    # Fresh figures: the same lull scales down, and a request waiting now wakes one.
    assert decide(cfg, series(NOW - 200, NOW, 0, 8), 8, NOW).replicas < 8
    now_waiting = [*series(NOW - 200, NOW - 1, 0, 0), Sample(NOW, 3, 3, 0)]
    assert decide(cfg, now_waiting, 0, NOW).replicas == 1
