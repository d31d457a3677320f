"""The console's last hour of figures: sampled totals, the window, and the models list's
change since the oldest sample."""

from __future__ import annotations

from kingpost.console.figures import Totals
from kingpost.console.history import History, last_hour
from kingpost.metrics.summary import Samples, parse


def _samples(a: int, a_5xx: int, b: int, ready: int = 1) -> Samples:
    return parse(
        "\n".join(
            [
                "# TYPE kingpost_requests_total counter",
                f'kingpost_requests_total{{model="m",deployment="a",code_class="2xx"}} {a}',
                f'kingpost_requests_total{{model="m",deployment="a",code_class="5xx"}} {a_5xx}',
                f'kingpost_requests_total{{model="m",deployment="b",code_class="2xx"}} {b}',
                "# TYPE kingpost_replicas gauge",
                f'kingpost_replicas{{model="m",deployment="a",state="ready"}} {ready}',
                "",
            ]
        )
    )


class Feed:
    """Samples handed out in turn, at the clock's times."""

    def __init__(self, *samples: Samples | None) -> None:
        self.samples = list(samples)
        self.now = 1000.0

    def source(self) -> Samples | None:
        return self.samples.pop(0)

    def clock(self) -> float:
        return self.now


def test_samples_keep_each_deployments_totals_for_the_window_and_no_longer() -> None:
    feed = Feed(_samples(1, 0, 2), None, _samples(5, 1, 2, ready=2), _samples(9, 1, 4))
    history = History(feed.source, step_s=60, keep_s=120, clock=feed.clock)
    history.sample()
    feed.now += 60
    history.sample()  # the metrics were unavailable: a gap, not a point
    feed.now += 60
    history.sample()
    series = history.series("m", "a")
    assert [(t, f.requests, f.errors, f.ready) for t, f in series] == [
        (1000.0, 1, 0, 1),
        (1120.0, 6, 1, 2),
    ]
    assert [f.requests for _, f in history.series("m")] == [3, 8]  # both deployments
    assert history.series("other") == [(1000.0, Totals()), (1120.0, Totals())]
    feed.now += 61  # the first point is now older than the window
    history.sample()
    assert [t for t, _ in history.series("m")] == [1120.0, 1181.0]


def test_the_models_list_counts_since_the_oldest_sample_and_survives_a_counter_reset() -> None:
    assert last_hour(None, {"m": Totals(requests=5)}) is None
    feed = Feed(_samples(10, 2, 5))
    history = History(feed.source, clock=feed.clock)
    assert last_hour(history, {"m": Totals(requests=5)}) is None  # nothing sampled yet
    history.sample()
    now = {"m": Totals(requests=40, errors=3), "new": Totals(requests=2)}
    assert last_hour(history, now) == 1000.0
    assert (now["m"].requests, now["m"].errors) == (23, 1)  # 40 - (10 + 2 + 5), 3 - 2
    assert now["new"].requests == 2  # a model the oldest sample did not know: all of it
    restarted = {"m": Totals(requests=4, errors=0)}  # the gateway's counters began again
    last_hour(history, restarted)
    assert (restarted["m"].requests, restarted["m"].errors) == (4, 0)
