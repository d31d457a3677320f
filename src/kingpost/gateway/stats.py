"""The gateway's figures for the control plane: what each deployment holds now, and what
it answered, per gateway process; merged over processes by the reader.

The hot path pays one :meth:`DeploymentCounters.record` per answered request (two
increments and an addition on a per-deployment object it already holds); in-flight and
queued requests are not counted per request at all but read from the dispatcher when a
snapshot is taken. The controller pulls a snapshot from every worker's control socket
(``GET /stats``) and merges them with :func:`merge_snapshots`: the autoscaler's and the
metrics endpoint's input.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "STATUS_CLASSES",
    "DeploymentCounters",
    "DeploymentStats",
    "GatewayStats",
    "merge_snapshots",
]

STATUS_CLASSES = ("none", "1xx", "2xx", "3xx", "4xx", "5xx")
"""Index ``status // 100`` (0: no answer reached the client: it left, or was cut)."""


class DeploymentCounters:
    """Answers one gateway process gave for one deployment since it started."""

    __slots__ = ("by_class", "latency_sum_s")

    def __init__(self) -> None:
        self.by_class = [0, 0, 0, 0, 0, 0]
        self.latency_sum_s = 0.0

    def record(self, status: int, seconds: float) -> None:
        self.by_class[status // 100 if 100 <= status < 600 else 0] += 1
        self.latency_sum_s += seconds


@dataclass
class DeploymentStats:
    queued: int = 0
    inflight: dict[str, int] = field(default_factory=dict)
    """Requests in flight per replica id."""
    answered: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATUS_CLASSES, 0))
    latency_sum_s: float = 0.0

    @property
    def inflight_total(self) -> int:
        return sum(self.inflight.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "queued": self.queued,
            "inflight": dict(self.inflight),
            "answered": dict(self.answered),
            "latency_sum_s": self.latency_sum_s,
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
        )


@dataclass
class GatewayStats:
    deployments: dict[str, DeploymentStats] = field(default_factory=dict)
    workers: int = 1
    """Gateway processes the figures come from."""
    at: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "at": self.at,
            "workers": self.workers,
            "deployments": {d: s.to_json() for d, s in self.deployments.items()},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> GatewayStats:
        return cls(
            {str(d): DeploymentStats.from_json(s) for d, s in data["deployments"].items()},
            workers=int(data.get("workers", 1)),
            at=float(data.get("at", 0.0)),
        )


def merge_snapshots(snapshots: Iterable[GatewayStats]) -> GatewayStats:
    """The whole gateway's figures from each worker's: sums, per deployment and replica."""
    merged = GatewayStats(workers=0, at=0.0)
    for snap in snapshots:
        merged.workers += snap.workers
        merged.at = max(merged.at, snap.at)
        for dep, stats in snap.deployments.items():
            into = merged.deployments.setdefault(dep, DeploymentStats())
            into.queued += stats.queued
            for rid, n in stats.inflight.items():
                into.inflight[rid] = into.inflight.get(rid, 0) + n
            for cls_, n in stats.answered.items():
                into.answered[cls_] = into.answered.get(cls_, 0) + n
            into.latency_sum_s += stats.latency_sum_s
    return merged
