"""Request figures for the console, from one scrape of the platform's ``/metrics``.

The platform keeps counters, not history: a page gets the running totals (requests,
5xx answers, the latency histogram, ready replicas) and its script turns two polls into
a rate, an error share and p50/p99 for its charts. Pure: samples in, totals out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kingpost.metrics.summary import Samples

__all__ = ["Totals", "totals", "totals_by_deployment", "totals_by_model"]


@dataclass
class Totals:
    requests: float = 0.0
    errors: float = 0.0
    """Answers of class 5xx."""
    ready: float = 0.0
    buckets: dict[float, float] = field(default_factory=dict)
    """Latency histogram: upper bound (s) -> cumulative count."""

    def merge(self, other: Totals) -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.ready += other.ready
        for le, n in other.buckets.items():
            self.buckets[le] = self.buckets.get(le, 0.0) + n

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "ready": self.ready,
            "buckets": [
                [le if le != float("inf") else None, n] for le, n in sorted(self.buckets.items())
            ],
        }


def _add(t: Totals, name: str, labels: dict[str, str], value: float) -> None:
    if name == "kingpost_requests_total":
        t.requests += value
        if labels.get("code_class") == "5xx":
            t.errors += value
    elif name == "kingpost_replicas" and labels.get("state") == "ready":
        t.ready += value
    elif name == "kingpost_request_duration_seconds_bucket":
        le = float(labels["le"])
        t.buckets[le] = t.buckets.get(le, 0.0) + value


def totals(samples: Samples, model: str, deployment: str | None = None) -> Totals:
    """One model's totals (by name), or one of its deployments' (by name)."""
    out = Totals()
    for (name, frozen), value in samples.items():
        labels = dict(frozen)
        if labels.get("model") != model:
            continue
        if deployment is not None and labels.get("deployment") != deployment:
            continue
        _add(out, name, labels, value)
    return out


def totals_by_model(samples: Samples) -> dict[str, Totals]:
    """Every model's totals, by model name."""
    out: dict[str, Totals] = {}
    for (name, frozen), value in samples.items():
        labels = dict(frozen)
        if "model" in labels:
            _add(out.setdefault(labels["model"], Totals()), name, labels, value)
    return out


def totals_by_deployment(samples: Samples) -> dict[tuple[str, str], Totals]:
    """Every deployment's totals, by (model name, deployment name)."""
    out: dict[tuple[str, str], Totals] = {}
    for (name, frozen), value in samples.items():
        labels = dict(frozen)
        if "model" in labels and "deployment" in labels:
            key = (labels["model"], labels["deployment"])
            _add(out.setdefault(key, Totals()), name, labels, value)
    return out
