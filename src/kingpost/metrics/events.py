"""Replica starts, restarts, failures and cold starts, counted from the engines' polls.

The controller hands every pass's ``poll()`` results to :meth:`ReplicaEvents.observe`; what
changed since the last pass is counted per deployment. Soft state: the counts start at zero
with the control plane (Prometheus counters may reset; ``rate()`` handles it).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from kingpost.engines import ReplicaPhase, ReplicaStatus

__all__ = ["COLD_START_BUCKETS", "DeploymentEvents", "ReplicaEvents"]

COLD_START_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
"""Seconds, ``le``: a cold start takes from under a second (a warm model class) to many
minutes (a large image or model)."""


@dataclass
class DeploymentEvents:
    starts: int = 0
    """Replicas seen for the first time."""
    restarts: int = 0
    """Restarts the engines made of live replicas (their liveness failed, or they exited)."""
    failures: int = 0
    """Replicas that reached FAILED (the engine gave up on them)."""
    cold_starts: int = 0
    """Replicas that became ready while their deployment had no other ready replica."""
    cold_start_sum_s: float = 0.0
    cold_start_buckets: list[int] = field(
        default_factory=lambda: [0] * (len(COLD_START_BUCKETS) + 1)
    )


@dataclass
class _Seen:
    phase: ReplicaPhase
    restarts: int
    cold: bool
    """No replica of its deployment was ready when it was first seen."""


class ReplicaEvents:
    def __init__(self) -> None:
        self._seen: dict[str, _Seen] = {}
        self._lock = threading.Lock()
        self.deployments: dict[str, DeploymentEvents] = {}

    def observe(self, replicas: Mapping[str, Sequence[ReplicaStatus]], now: float) -> None:
        """One pass's replicas by deployment; ``now`` on the clock of ``started_at``."""
        with self._lock:
            seen: dict[str, _Seen] = {}
            for dep_id, reps in replicas.items():
                ready_before = any(
                    (s := self._seen.get(r.replica_id)) is not None
                    and s.phase == ReplicaPhase.READY
                    for r in reps
                )
                ev = self.deployments.setdefault(dep_id, DeploymentEvents())
                for r in reps:
                    before = self._seen.get(r.replica_id)
                    if before is None:
                        ev.starts += 1
                        before = _Seen(ReplicaPhase.STARTING, 0, not ready_before)
                    ev.restarts += max(0, r.restarts - before.restarts)
                    if r.phase == ReplicaPhase.FAILED and before.phase != ReplicaPhase.FAILED:
                        ev.failures += 1
                    cold = before.cold
                    if r.phase == ReplicaPhase.READY and before.phase != ReplicaPhase.READY:
                        if cold and r.started_at > 0:
                            took = max(0.0, now - r.started_at)
                            ev.cold_starts += 1
                            ev.cold_start_sum_s += took
                            i = sum(1 for b in COLD_START_BUCKETS if b < took)
                            ev.cold_start_buckets[i] += 1
                        cold = False  # one cold start per replica
                    seen[r.replica_id] = _Seen(r.phase, max(r.restarts, before.restarts), cold)
            self._seen = seen

    def snapshot(self) -> dict[str, DeploymentEvents]:
        with self._lock:
            return {
                d: DeploymentEvents(
                    e.starts,
                    e.restarts,
                    e.failures,
                    e.cold_starts,
                    e.cold_start_sum_s,
                    list(e.cold_start_buckets),
                )
                for d, e in self.deployments.items()
            }
