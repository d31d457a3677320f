"""What ``kingpost metrics`` shows, from two scrapes of ``/metrics``: per deployment,
requests per second, p50/p99 latency, error rate, replicas and queue over the interval.

Pure: parsed samples in, rows out (quantiles interpolated within buckets, as Prometheus's
``histogram_quantile`` does).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Row", "Samples", "parse", "quantile", "summarize"]

Key = tuple[str, str, str]
"""(model, deployment, environment)."""
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    from prometheus_client.parser import text_string_to_metric_families

    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = float(s.value)
    return out


@dataclass(frozen=True)
class Row:
    model: str
    deployment: str
    environment: str
    requests_per_s: float
    p50_s: float | None
    p99_s: float | None
    error_rate: float | None
    """Share of answers in the interval that were 5xx (None: no answers)."""
    replicas_ready: int
    replicas: int
    in_flight: int
    queued: int
    requests_total: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """The ``q`` quantile of a histogram given as cumulative counts per upper bound."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for b in bounds:
        count = buckets[b]
        if count >= rank:
            if math.isinf(b):
                return lower  # past the last finite bound: its bound is the best answer
            if count == below:
                return b
            return lower + (b - lower) * (rank - below) / (count - below)
        lower, below = b, count
    return None


def _by_key(samples: Samples, name: str, **match: str) -> dict[Key, float]:
    out: dict[Key, float] = {}
    for (n, labels), v in samples.items():
        if n != name:
            continue
        lab = dict(labels)
        if any(lab.get(k) != want for k, want in match.items()):
            continue
        key = (lab.get("model", ""), lab.get("deployment", ""), lab.get("environment", ""))
        out[key] = out.get(key, 0.0) + v
    return out


def _buckets(samples: Samples) -> dict[Key, dict[float, float]]:
    out: dict[Key, dict[float, float]] = {}
    for (n, labels), v in samples.items():
        if n != "kingpost_request_duration_seconds_bucket":
            continue
        lab = dict(labels)
        key = (lab.get("model", ""), lab.get("deployment", ""), lab.get("environment", ""))
        out.setdefault(key, {})[float(lab["le"])] = v
    return out


def summarize(
    before: Samples,
    after: Samples,
    seconds: float,
    model: str | None = None,
    environment: str | None = None,
    pointed_at: Collection[tuple[str, str]] | None = None,
) -> list[Row]:
    """Rows for the deployments in ``after`` (of ``model``/``environment`` when given).

    ``pointed_at``: the (model, deployment) names ``environment`` points at, as the API
    lists them; the series' ``environment`` label holds only one environment per
    deployment (``production`` first), so a deployment two environments point at is found
    for the other only this way. Its rows show ``environment``."""
    req_a = _by_key(after, "kingpost_requests_total")
    req_b = _by_key(before, "kingpost_requests_total")
    err_a = _by_key(after, "kingpost_requests_total", code_class="5xx")
    err_b = _by_key(before, "kingpost_requests_total", code_class="5xx")
    ready = _by_key(after, "kingpost_replicas", state="ready")
    replicas = _by_key(after, "kingpost_replicas")
    inflight = _by_key(after, "kingpost_requests_in_flight")
    queued = _by_key(after, "kingpost_requests_queued")
    hist_a, hist_b = _buckets(after), _buckets(before)
    keys = set(req_a) | set(replicas) | set(inflight)
    rows = []
    for key in sorted(keys):
        m, d, e = key
        if model is not None and m != model:
            continue
        if pointed_at is not None:
            if (m, d) not in pointed_at:
                continue
            e = environment or e
        elif environment is not None and e != environment:
            continue
        n = max(0.0, req_a.get(key, 0.0) - req_b.get(key, 0.0))
        errors = max(0.0, err_a.get(key, 0.0) - err_b.get(key, 0.0))
        ha, hb = hist_a.get(key, {}), hist_b.get(key, {})
        delta = {b: ha[b] - hb.get(b, 0.0) for b in ha}
        rows.append(
            Row(
                model=m,
                deployment=d,
                environment=e,
                requests_per_s=round(n / seconds, 3) if seconds > 0 else 0.0,
                p50_s=quantile(0.5, delta),
                p99_s=quantile(0.99, delta),
                error_rate=round(errors / n, 4) if n else None,
                replicas_ready=int(ready.get(key, 0)),
                replicas=int(replicas.get(key, 0)),
                in_flight=int(inflight.get(key, 0)),
                queued=int(queued.get(key, 0)),
                requests_total=int(req_a.get(key, 0)),
            )
        )
    return rows
