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
    """Times the deployment went from no ready replica to one (a replica launched while it
    had none became ready)."""
    cold_start_sum_s: float = 0.0
    cold_start_buckets: list[int] = field(
        default_factory=lambda: [0] * (len(COLD_START_BUCKETS) + 1)
    )


@dataclass
class _Seen:
    phase: ReplicaPhase
    restarts: int
    cold: bool
    """No replica of its deployment was ready when it was first seen, and it has not been
    ready since."""


class ReplicaEvents:
    def __init__(self) -> None:
        self._seen: dict[str, _Seen] = {}
        self._ready: set[str] = set()
        """Deployments with a ready replica at the last pass."""
        self._lock = threading.Lock()
        self.deployments: dict[str, DeploymentEvents] = {}

    def observe(self, replicas: Mapping[str, Sequence[ReplicaStatus]], now: float) -> None:
        """One pass's replicas by deployment; ``now`` on the clock of ``started_at``.

        A cold start is counted once per deployment going from no ready replica to one,
        however many replicas of the scale-up follow it (they become ready while the first
        serves), timed from the earliest launch among those that got there first. Only
        replicas launched while the deployment had none ready count: a restarted replica's
        ``started_at`` is its first launch, so its recovery would time nothing real."""
        with self._lock:
            seen: dict[str, _Seen] = {}
            ready: set[str] = set()
            for dep_id, reps in replicas.items():
                ready_before = dep_id in self._ready
                ev = self.deployments.setdefault(dep_id, DeploymentEvents())
                woke: list[float] = []  # launches of cold replicas ready in this pass
                for r in reps:
                    before = self._seen.get(r.replica_id)
                    if before is None:
                        ev.starts += 1
                        before = _Seen(ReplicaPhase.STARTING, 0, not ready_before)
                    ev.restarts += max(0, r.restarts - before.restarts)
                    if r.phase == ReplicaPhase.FAILED and before.phase != ReplicaPhase.FAILED:
                        ev.failures += 1
                    cold = before.cold
                    if r.phase == ReplicaPhase.READY:
                        ready.add(dep_id)
                        if before.phase != ReplicaPhase.READY:
                            if cold and r.started_at > 0:
                                woke.append(r.started_at)
                            cold = False  # at most once per replica
                    seen[r.replica_id] = _Seen(r.phase, max(r.restarts, before.restarts), cold)
                if woke and not ready_before:
                    took = max(0.0, now - min(woke))
                    ev.cold_starts += 1
                    ev.cold_start_sum_s += took
                    i = sum(1 for b in COLD_START_BUCKETS if b < took)
                    ev.cold_start_buckets[i] += 1
            self._seen = seen
            self._ready = ready

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
