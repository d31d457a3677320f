"""The metrics' pure parts: exposition text, histogram counting, replica events, the CLI's
summary (quantiles from bucket deltas), relabelling a replica's text."""

from __future__ import annotations

import math
import shutil
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kingpost.engines import ReplicaPhase, ReplicaStatus
from kingpost.gateway.stats import LATENCY_BUCKETS, DeploymentCounters, DeploymentStats
from kingpost.metrics.events import ReplicaEvents
from kingpost.metrics.listen import parse_listen
from kingpost.metrics.replicas import _relabel
from kingpost.metrics.summary import parse, quantile, summarize
from kingpost.metrics.text import Family, render


def test_rendered_text_parses_back_with_escaped_labels_and_cumulative_buckets() -> None:
    c = Family("kingpost_x_total", "counter", "Things.")
    c.add({"model": 'a"b\\c\nd'}, 3)
    h = Family("kingpost_t_seconds", "histogram", "Times.")
    h.histogram({"model": "m"}, (0.1, 1.0), [2, 1, 4], 9.5)
    empty = Family("kingpost_none", "gauge", "Nothing.")
    text = render([c, h, empty])
    assert "kingpost_none" not in text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    (sample,) = fams["kingpost_x"].samples
    assert sample.labels == {"model": 'a"b\\c\nd'} and sample.value == 3
    got = {(s.name, s.labels.get("le")): s.value for s in fams["kingpost_t_seconds"].samples}
    assert got[("kingpost_t_seconds_bucket", "0.1")] == 2
    assert got[("kingpost_t_seconds_bucket", "1.0")] == 3
    assert got[("kingpost_t_seconds_bucket", "+Inf")] == 7
    assert got[("kingpost_t_seconds_count", None)] == 7
    assert got[("kingpost_t_seconds_sum", None)] == 9.5


@pytest.mark.parametrize(("seconds", "index"), [(0.005, 0), (0.0051, 1), (299.0, 14), (301.0, 15)])
def test_a_latency_lands_in_the_first_bucket_whose_bound_holds_it(
    seconds: float, index: int
) -> None:
    c = DeploymentCounters()
    c.record(200, seconds, "sync", seconds / 2, 10, 20)
    assert c.latency_buckets[index] == 1 and sum(c.latency_buckets) == 1
    assert c.by_kind["sync"][2] == 1 and c.by_class[2] == 1
    assert (sum(c.upstream_buckets), c.bytes_in, c.bytes_out) == (1, 10, 20)
    c.record(502, 0.1, "predict")  # no replica answered: no upstream time
    assert sum(c.upstream_buckets) == 1


def test_worker_snapshots_add_up_bucket_by_bucket() -> None:
    a, b = DeploymentCounters(), DeploymentCounters()
    a.record(200, 0.01, "predict", 0.005, 5, 7)
    b.record(404, 20.0, "websocket")
    b.retries = 2
    merged = DeploymentStats.of(a, 0, {})
    merged.add(DeploymentStats.from_json(DeploymentStats.of(b, 1, {"r": 1}).to_json()))
    assert merged.requests == {
        "predict": {"none": 0, "1xx": 0, "2xx": 1, "3xx": 0, "4xx": 0, "5xx": 0},
        "websocket": {"none": 0, "1xx": 0, "2xx": 0, "3xx": 0, "4xx": 1, "5xx": 0},
    }
    assert sum(merged.latency_buckets) == 2 and sum(merged.upstream_buckets) == 1
    assert (merged.bytes_in, merged.bytes_out, merged.retries, merged.queued) == (5, 7, 2, 1)
    assert len(merged.latency_buckets) == len(LATENCY_BUCKETS) + 1


def _rep(rid: str, phase: ReplicaPhase, restarts: int = 0, at: float = 100.0) -> ReplicaStatus:
    return ReplicaStatus(rid, "d", phase, restarts=restarts, started_at=at)


def test_replica_events_count_starts_restarts_failures_and_one_cold_start() -> None:
    ev = ReplicaEvents()
    ev.observe({"d": [_rep("a", ReplicaPhase.STARTING)]}, 101.0)
    ev.observe({"d": [_rep("a", ReplicaPhase.READY)]}, 104.0)  # from zero: cold, 4 s
    ev.observe({"d": [_rep("a", ReplicaPhase.READY), _rep("b", ReplicaPhase.STARTING)]}, 105.0)
    ev.observe({"d": [_rep("a", ReplicaPhase.READY, 1), _rep("b", ReplicaPhase.READY)]}, 106.0)
    ev.observe({"d": [_rep("a", ReplicaPhase.FAILED, 3), _rep("b", ReplicaPhase.READY)]}, 107.0)
    d = ev.snapshot()["d"]
    assert (d.starts, d.restarts, d.failures, d.cold_starts) == (2, 3, 1, 1)
    assert d.cold_start_sum_s == 4.0 and sum(d.cold_start_buckets) == 1


R, S, F = ReplicaPhase.READY, ReplicaPhase.STARTING, ReplicaPhase.FAILED


@pytest.mark.parametrize(
    ("passes", "cold_starts", "sum_s"),
    [
        # From zero to three: the first ready is the cold start; the others become ready
        # while it serves (each of the three was counted, 10 + 20 + 30 s).
        ([(1, [("a", S), ("b", S), ("c", S)]), (10, [("a", R), ("b", S), ("c", S)]),
          (20, [("a", R), ("b", R), ("c", S)]), (30, [("a", R), ("b", R), ("c", R)])], 1, 10),
        # Two ready in the same pass: one cold start, from the earliest launch.
        ([(1, [("a", S), ("b", S)]), (10, [("a", R), ("b", R)])], 1, 10),
        # To zero and back: two.
        ([(5, [("a", R)]), (6, []), (7, [("b", S)]), (9, [("b", R)])], 2, 5 + 9),
        # The only replica restarts (liveness): its launch is long past, nothing to time.
        ([(5, [("a", R)]), (50, [("a", S, 1)]), (60, [("a", R, 1)])], 1, 5),
        # Started beside a ready one, which then fails: it was never cold.
        ([(5, [("a", R)]), (6, [("a", R), ("b", S)]), (7, [("a", F), ("b", S)]),
          (8, [("a", F), ("b", R)])], 1, 5),
    ],
)  # fmt: skip
def test_a_cold_start_is_a_deployment_going_from_no_ready_replica_to_one(
    passes: list[tuple[float, list[tuple[str, ReplicaPhase] | tuple[str, ReplicaPhase, int]]]],
    cold_starts: int,
    sum_s: float,
) -> None:
    """Every replica of a scale-up from zero was counted as a cold start, though all but
    the first became ready while another served."""
    ev = ReplicaEvents()
    for now, reps in passes:
        ev.observe(
            {"d": [_rep(rid, phase, *rest, at=0.0 + 1e-9) for rid, phase, *rest in reps]}, now
        )
    d = ev.snapshot()["d"]
    assert (d.cold_starts, sum(d.cold_start_buckets)) == (cold_starts, cold_starts)
    assert d.cold_start_sum_s == pytest.approx(sum_s)


def test_summary_rates_quantiles_and_filters() -> None:
    def scrape(n2xx: int, n5xx: int, buckets: tuple[int, int, int]) -> str:
        lab = 'model="m",deployment="d1",environment="production"'
        return (
            f'kingpost_requests_total{{{lab},route="predict",code_class="2xx"}} {n2xx}\n'
            f'kingpost_requests_total{{{lab},route="predict",code_class="5xx"}} {n5xx}\n'
            f'kingpost_request_duration_seconds_bucket{{{lab},le="0.1"}} {buckets[0]}\n'
            f'kingpost_request_duration_seconds_bucket{{{lab},le="1.0"}} {buckets[1]}\n'
            f'kingpost_request_duration_seconds_bucket{{{lab},le="+Inf"}} {buckets[2]}\n'
            f'kingpost_replicas{{{lab},state="ready"}} 2\n'
            f'kingpost_replicas{{{lab},state="starting"}} 1\n'
            f"kingpost_requests_queued{{{lab}}} 3\n"
        )

    before, after = parse(scrape(10, 0, (10, 10, 10))), parse(scrape(28, 2, (20, 30, 30)))
    (row,) = summarize(before, after, 2.0, "m", "production")
    assert (row.requests_per_s, row.error_rate, row.requests_total) == (10.0, 0.1, 30)
    assert row.p50_s == pytest.approx(0.1)  # rank 10 of 20: the first bucket's top
    assert row.p99_s == pytest.approx(0.1 + 0.9 * (19.8 - 10) / 10)
    assert (row.replicas_ready, row.replicas, row.queued) == (2, 3, 3)
    assert summarize(before, after, 2.0, "other") == []
    assert summarize(before, after, 2.0, None, "staging") == []
    assert quantile(0.5, {0.1: 0.0, math.inf: 0.0}) is None


def test_an_environment_finds_the_deployments_it_points_at_whatever_their_label() -> None:
    """The ``environment`` label holds one environment (production first), so a deployment
    both production and staging point at was missing from ``--environment staging``."""
    lab = 'model="m",deployment="deployment-1",environment="production"'
    text = f'kingpost_requests_total{{{lab},route="predict",code_class="2xx"}} %d\n'
    before, after = parse(text % 10), parse(text % 30)
    (row,) = summarize(before, after, 2.0, None, "staging", {("m", "deployment-1")})
    assert (row.deployment, row.environment, row.requests_per_s) == ("deployment-1", "staging", 10)
    (row,) = summarize(before, after, 2.0, "m", "production", {("m", "deployment-1")})
    assert row.environment == "production"
    assert summarize(before, after, 2.0, None, "staging", set()) == []
    assert summarize(before, after, 2.0, "other", "staging", {("m", "deployment-1")}) == []


def test_a_replicas_text_gets_its_labels_and_keeps_its_own_under_exported() -> None:
    text = (
        "# HELP calls_total Calls.\n# TYPE calls_total counter\n"
        'calls_total{model="inner"} 4\ncalls_created 1.7e9\n'
    )
    into: dict[str, Family] = {}
    _relabel(text, {"model": "m", "replica": "r1"}, into)
    (fam,) = into.values()
    assert fam.name == "calls_total" and fam.type == "counter"
    assert fam.samples == [
        ("calls_total", {"model": "m", "replica": "r1", "exported_model": "inner"}, 4.0)
    ]


def test_a_replicas_multi_line_help_is_escaped_and_the_scrape_parses() -> None:
    """``prometheus_client`` unescapes ``\\n`` in a help line when it parses a replica's
    text; rendered raw, the next line was read as a sample and the whole scrape failed
    (promtool, Prometheus and ``kingpost metrics`` alike)."""
    from prometheus_client import CollectorRegistry, Counter, generate_latest

    reg = CollectorRegistry()
    help_text = "Tokens generated.\nCounts prompt and completion\\ tokens."
    Counter("tokens", help_text, registry=reg).inc(5)
    into: dict[str, Family] = {}
    _relabel(generate_latest(reg).decode(), {"model": "m", "replica": "r1"}, into)
    assert into["tokens_total"].help == help_text
    text = render(into.values())
    escaped = "Tokens generated.\\nCounts prompt and completion\\\\ tokens."
    assert f"# HELP tokens_total {escaped}\n" in text
    (fam,) = text_string_to_metric_families(text)
    assert fam.documentation == help_text
    assert parse(text)[("tokens_total", frozenset({("model", "m"), ("replica", "r1")}))] == 5
    promtool = shutil.which("promtool")  # Debian's prometheus package (integration tests need it)
    if promtool is not None:
        check = [promtool, "check", "metrics"]
        out = subprocess.run(check, input=text, capture_output=True, text=True)
        assert out.returncode == 0 and not out.stdout.strip(), out.stdout + out.stderr


@pytest.mark.parametrize(
    ("value", "want"),
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        (":9464", ("0.0.0.0", 9464)),
        ("[::1]:80", ("::1", 80)),
    ],
)
def test_the_listen_address_parses(value: str, want: tuple[str, int]) -> None:
    assert parse_listen(value) == want


@pytest.mark.parametrize("value", ["9464", "host:", "host:0", "host:70000", "host:http"])
def test_a_bad_listen_address_names_the_setting_and_the_value(value: str) -> None:
    with pytest.raises(ValueError, match=rf"KINGPOST_METRICS_LISTEN.*{value!r}"):
        parse_listen(value)


def test_the_setting_refuses_a_bad_listen_address_with_its_name_and_value() -> None:
    from pydantic import ValidationError

    from kingpost.settings import Settings

    with pytest.raises(ValidationError, match=r"KINGPOST_METRICS_LISTEN.*'localhost'"):
        Settings(metrics_listen="localhost")
    assert Settings(metrics_listen="127.0.0.1:9464").metrics_listen == "127.0.0.1:9464"
    # The gateway's own listener: the same rule, its own setting named.
    with pytest.raises(ValidationError, match=r"KINGPOST_GATEWAY_METRICS_LISTEN.*'gw'"):
        Settings(gateway_metrics_listen="gw")
    assert Settings(gateway_metrics_listen="[::1]:9465").gateway_metrics_listen == "[::1]:9465"
