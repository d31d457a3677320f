"""The gateway's figures for the control plane: what each deployment holds now, and what
it answered, per gateway process; merged over processes by the reader.

The hot path pays one :meth:`DeploymentCounters.record` per answered request (a few
increments, additions and one ``bisect`` per latency on a per-deployment object it already
holds: no lock, no system call, no clock read of its own); in-flight and queued requests
are not counted per request at all but read from the dispatcher when a snapshot is taken.
Latencies go into fixed buckets (:data:`LATENCY_BUCKETS`), so workers' histograms add up.
The controller pulls a snapshot from every worker's control socket (``GET /stats``) and
merges them with :func:`merge_snapshots`: the autoscaler's input, and (pulled again at each
scrape) that of the control plane's ``/metrics``.
"""

from __future__ import annotations

import os
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

__all__ = [
    "LATENCY_BUCKETS",
    "ROUTE_KINDS",
    "STATUS_CLASSES",
    "DeploymentCounters",
    "DeploymentStats",
    "GatewayStats",
    "merge_snapshots",
]

STATUS_CLASSES = ("none", "1xx", "2xx", "3xx", "4xx", "5xx")
"""Index ``status // 100`` (0: no answer reached the client: it left, or was cut)."""


ROUTE_KINDS = ("predict", "sync", "async", "websocket")
"""The gateway's route kinds (:attr:`~kingpost.gateway.routing.Target.kind`)."""

LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip
"""Upper bounds (seconds, ``le``) of the latency histograms' buckets; one more counts the
rest (``+Inf``). Fixed, so every worker's and every scrape's buckets line up."""


def _classes() -> list[int]:
    return [0, 0, 0, 0, 0, 0]


def _buckets() -> list[int]:
    return [0] * (len(LATENCY_BUCKETS) + 1)


class DeploymentCounters:
    """Answers one gateway process gave for one deployment since it started."""

    __slots__ = (
        "by_kind",
        "bytes_in",
        "bytes_out",
        "latency_buckets",
        "latency_sum_s",
        "retries",
        "upstream_buckets",
        "upstream_sum_s",
    )

    def __init__(self) -> None:
        self.by_kind: dict[str, list[int]] = {k: _classes() for k in ROUTE_KINDS}
        """Answers per route kind, by status class (index ``status // 100``)."""
        self.latency_sum_s = 0.0
        self.latency_buckets = _buckets()
        """End to end (request parsed to answer settled), per bucket, not cumulative."""
        self.upstream_sum_s = 0.0
        self.upstream_buckets = _buckets()
        """Answers that reached a replica: from the request's sending to its answer's end."""
        self.bytes_in = 0
        """Request body bytes received from clients."""
        self.bytes_out = 0
        """Response bytes written to clients (heads included), for answers from replicas."""
        self.retries = 0
        """Requests sent again to another replica after the first hung up on them."""

    @property
    def by_class(self) -> list[int]:
        """Answers by status class, every route kind together."""
        return [sum(col) for col in zip(*self.by_kind.values(), strict=True)]

    def record(
        self,
        status: int,
        seconds: float,
        kind: str = "predict",
        upstream_s: float = -1.0,
        bytes_in: int = 0,
        bytes_out: int = 0,
        _find: Callable[[Sequence[float], float], int] = bisect_left,
        _bounds: tuple[float, ...] = LATENCY_BUCKETS,
    ) -> None:
        """One answer: ``upstream_s`` below 0 when no replica answered it. (``_find`` and
        ``_bounds`` are bound once, as locals: this runs once per request.)"""
        self.by_kind[kind][status // 100 if 100 <= status < 600 else 0] += 1
        self.latency_sum_s += seconds
        self.latency_buckets[_find(_bounds, seconds)] += 1
        if upstream_s >= 0.0:
            self.upstream_sum_s += upstream_s
            self.upstream_buckets[_find(_bounds, upstream_s)] += 1
        if bytes_in:
            self.bytes_in += bytes_in
        self.bytes_out += bytes_out


@dataclass
class DeploymentStats:
    queued: int = 0
    inflight: dict[str, int] = field(default_factory=dict)
    """Requests in flight per replica id."""
    answered: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATUS_CLASSES, 0))
    latency_sum_s: float = 0.0
    requests: dict[str, dict[str, int]] = field(default_factory=dict)
    """Answers per route kind, then status class (``answered`` sums the kinds)."""
    latency_buckets: list[int] = field(default_factory=_buckets)
    upstream_sum_s: float = 0.0
    upstream_buckets: list[int] = field(default_factory=_buckets)
    bytes_in: int = 0
    bytes_out: int = 0
    retries: int = 0

    @classmethod
    def of(cls, counters: DeploymentCounters, queued: int, inflight: dict[str, int]) -> Self:
        """A snapshot of ``counters`` (copies: the hot path keeps counting)."""
        return cls(
            queued=queued,
            inflight=inflight,
            answered=dict(zip(STATUS_CLASSES, counters.by_class, strict=True)),
            latency_sum_s=counters.latency_sum_s,
            requests={
                k: dict(zip(STATUS_CLASSES, v, strict=True))
                for k, v in counters.by_kind.items()
                if any(v)
            },
            latency_buckets=list(counters.latency_buckets),
            upstream_sum_s=counters.upstream_sum_s,
            upstream_buckets=list(counters.upstream_buckets),
            bytes_in=counters.bytes_in,
            bytes_out=counters.bytes_out,
            retries=counters.retries,
        )

    @property
    def inflight_total(self) -> int:
        return sum(self.inflight.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "queued": self.queued,
            "inflight": dict(self.inflight),
            "answered": dict(self.answered),
            "latency_sum_s": self.latency_sum_s,
            "requests": {k: dict(v) for k, v in self.requests.items()},
            "latency_buckets": list(self.latency_buckets),
            "upstream_sum_s": self.upstream_sum_s,
            "upstream_buckets": list(self.upstream_buckets),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "retries": self.retries,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DeploymentStats:
        answered = dict.fromkeys(STATUS_CLASSES, 0)
        answered.update({k: int(v) for k, v in dict(data.get("answered", {})).items()})
        return cls(
            queued=int(data.get("queued", 0)),
            inflight={str(k): int(v) for k, v in dict(data.get("inflight", {})).items()},
            answered=answered,
            latency_sum_s=float(data.get("latency_sum_s", 0.0)),
            requests={
                str(k): {str(c): int(n) for c, n in dict(v).items()}
                for k, v in dict(data.get("requests", {})).items()
            },
            latency_buckets=_bucket_list(data.get("latency_buckets")),
            upstream_sum_s=float(data.get("upstream_sum_s", 0.0)),
            upstream_buckets=_bucket_list(data.get("upstream_buckets")),
            bytes_in=int(data.get("bytes_in", 0)),
            bytes_out=int(data.get("bytes_out", 0)),
            retries=int(data.get("retries", 0)),
        )

    def add(self, other: DeploymentStats) -> None:
        """Add another worker's figures for the same deployment to these."""
        self.queued += other.queued
        for rid, n in other.inflight.items():
            self.inflight[rid] = self.inflight.get(rid, 0) + n
        for cls_, n in other.answered.items():
            self.answered[cls_] = self.answered.get(cls_, 0) + n
        self.latency_sum_s += other.latency_sum_s
        for kind, classes in other.requests.items():
            into = self.requests.setdefault(kind, dict.fromkeys(STATUS_CLASSES, 0))
            for cls_, n in classes.items():
                into[cls_] = into.get(cls_, 0) + n
        self.latency_buckets = [
            a + b for a, b in zip(self.latency_buckets, other.latency_buckets, strict=True)
        ]
        self.upstream_sum_s += other.upstream_sum_s
        self.upstream_buckets = [
            a + b for a, b in zip(self.upstream_buckets, other.upstream_buckets, strict=True)
        ]
        self.bytes_in += other.bytes_in
        self.bytes_out += other.bytes_out
        self.retries += other.retries


def _bucket_list(value: Any) -> list[int]:
    """Buckets from JSON; missing, or of another length (a gateway of another version):
    zeros, rather than sums that would not line up."""
    if not isinstance(value, list) or len(value) != len(LATENCY_BUCKETS) + 1:
        return _buckets()
    return [int(n) for n in value]


@dataclass
class GatewayStats:
    deployments: dict[str, DeploymentStats] = field(default_factory=dict)
    workers: int = 1
    """Gateway processes the figures come from."""
    at: float = field(default_factory=time.time)
    labels: dict[str, dict[str, str]] = field(default_factory=dict)
    """Per deployment id: its metrics labels (model, deployment, environment) as the
    routing table names them, for the gateway's own ``/metrics``."""
    control_age_s: float = -1.0
    """Seconds since a control plane last pushed a table (the most over workers; below 0:
    not known)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "at": self.at,
            "workers": self.workers,
            "deployments": {d: s.to_json() for d, s in self.deployments.items()},
            "labels": {d: dict(v) for d, v in self.labels.items()},
            "control_age_s": self.control_age_s,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> GatewayStats:
        return cls(
            {str(d): DeploymentStats.from_json(s) for d, s in data["deployments"].items()},
            workers=int(data.get("workers", 1)),
            at=float(data.get("at", 0.0)),
            labels={
                str(d): {str(k): str(v) for k, v in dict(lab).items()}
                for d, lab in dict(data.get("labels", {})).items()
            },
            control_age_s=float(data.get("control_age_s", -1.0)),
        )


def merge_snapshots(snapshots: Iterable[GatewayStats]) -> GatewayStats:
    """The whole gateway's figures from each worker's: sums, per deployment and replica."""
    merged = GatewayStats(workers=0, at=0.0, control_age_s=-1.0)
    for snap in snapshots:
        merged.workers += snap.workers
        merged.at = max(merged.at, snap.at)
        merged.labels.update(snap.labels)
        merged.control_age_s = max(merged.control_age_s, snap.control_age_s)
        for dep, stats in snap.deployments.items():
            merged.deployments.setdefault(dep, DeploymentStats()).add(stats)
    return merged
