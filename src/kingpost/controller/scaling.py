"""The autoscaler's soft state: a window of samples per deployment, the replicas wanted,
and the last decision's reason. The decision itself is the pure
:func:`~kingpost.controller.autoscale.decide`; this module only feeds and remembers it.

Nothing here is durable. After a restart the count starts from the replicas the engines
report (a deployment recorded SCALED_TO_ZERO with none stays at zero), and no replica is
removed until a whole ``scale_down_delay`` of samples has been seen again.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from kingpost.controller.autoscale import AutoscalingSettings, Decision, Sample, decide
from kingpost.engines.base import ReplicaPhase, ReplicaStatus
from kingpost.gateway.stats import GatewayStats
from kingpost.store import DeploymentStatus, DeploymentView

__all__ = ["DRAIN_MAX_S", "Drains", "ReplicaCounts", "Scaler"]

_STARTING = (ReplicaPhase.STARTING, ReplicaPhase.RESTARTING, ReplicaPhase.NOT_READY)
_PREPARING = (DeploymentStatus.BUILDING, DeploymentStatus.WAITING_FOR_WEIGHTS)


@dataclass(frozen=True)
class ReplicaCounts:
    """What ``deployments list/describe`` show of a deployment's scale."""

    wanted: int
    starting: int
    ready: int
    reason: str
    source: str | None = None
    """The environment whose settings govern, or None: the deployment's own."""


class Scaler:
    """Per deployment: samples (oldest first), the count wanted, the last reason.

    ``frozen`` holds the ids of deployments whose count a rollout owns (the rollout sets
    and clears it); their count stands while they are in it."""

    def __init__(self) -> None:
        self._samples: dict[str, deque[Sample]] = {}
        self._wanted: dict[str, int] = {}
        self._decisions: dict[str, Decision] = {}
        self._counts: dict[str, ReplicaCounts] = {}
        self._last_stats: GatewayStats | None = None
        self._lock = threading.Lock()
        self.frozen: set[str] = set()
        self.backlog: dict[str, int] = {}
        """Async requests queued in the store per deployment (``asyncq/worker.py``
        replaces it once per reconcile interval): demand like requests the gateway holds."""

    def observe(self, stats: GatewayStats | None, deployments: Iterable[str], now: float) -> None:
        """One sample per deployment from a newly pulled ``stats`` (none again for the same)."""
        if stats is None or stats is self._last_stats:
            return
        self._last_stats = stats
        with self._lock:
            for dep_id in deployments:
                held = stats.deployments.get(dep_id)
                inflight = held.inflight_total if held is not None else 0
                queued = (held.queued if held is not None else 0) + self.backlog.get(dep_id, 0)
                self._add(dep_id, Sample(now, inflight, queued, self._wanted.get(dep_id, 0)))

    def demand(self, dep_id: str, queued: int, now: float) -> None:
        """Requests wait for ``dep_id`` now (the gateway said so, or a wake was asked)."""
        with self._lock:
            self._add(dep_id, Sample(now, 0, max(1, queued), self._wanted.get(dep_id, 0)))

    def _add(self, dep_id: str, sample: Sample) -> None:
        self._samples.setdefault(dep_id, deque()).append(sample)

    def step(
        self,
        dep: DeploymentView,
        settings: AutoscalingSettings,
        replicas: Sequence[ReplicaStatus],
        now: float,
        source: str | None = None,
    ) -> int:
        """Decide the deployment's count now; remembers it and why."""
        live = [r for r in replicas if r.phase in (ReplicaPhase.READY, *_STARTING)]
        ready = sum(1 for r in live if r.phase == ReplicaPhase.READY)
        with self._lock:
            current = self._wanted.get(dep.id)
            if current is None:  # first sight (a push, or a restarted control plane)
                zero = dep.status == DeploymentStatus.SCALED_TO_ZERO and not live
                current = 0 if zero else max(len(live), settings.min_replica, 1)
                current = min(current, settings.max_replica)
            samples = self._samples.setdefault(dep.id, deque())
            keep = now - settings.autoscaling_window - settings.scale_down_delay - 5
            while samples and samples[0].at <= keep:
                samples.popleft()
            if not live and current > 0 and dep.status in _PREPARING:
                # Building (or mirroring weights) may outlast the delay: a deployment is
                # not scaled to zero before its first replica ever started.
                decision = Decision(current, f"holding {current}: {dep.status.lower()}")
            else:
                decision = decide(settings, samples, current, now, frozen=dep.id in self.frozen)
            self._wanted[dep.id] = decision.replicas
            self._decisions[dep.id] = decision
            self._counts[dep.id] = ReplicaCounts(
                decision.replicas, len(live) - ready, ready, decision.reason, source
            )
        return decision.replicas

    def hold(self, counts: dict[str, int], ended: dict[str, int] | None = None) -> None:
        """Deployments whose count a running rollout sets: frozen at that count. ``ended``:
        the final counts of rollouts that ended now, which autoscaling starts from (not
        from what it wanted before, nor from the rollout's step before the last)."""
        with self._lock:
            self.frozen = set(counts)
            self._wanted.update(ended or {})
            self._wanted.update(counts)

    def forget(self, keep: Iterable[str]) -> None:
        """Drop the state of deployments not in ``keep`` (deactivated, deleted)."""
        keep = set(keep)
        with self._lock:
            for table in (self._samples, self._wanted, self._decisions, self._counts):
                for dep_id in [d for d in table if d not in keep]:
                    del table[dep_id]

    def counts(self, dep_id: str) -> ReplicaCounts | None:
        with self._lock:
            return self._counts.get(dep_id)

    def wanted(self, dep_id: str, default: int) -> int:
        with self._lock:
            return self._wanted.get(dep_id, default)


DRAIN_MAX_S = 120.0
"""A replica draining longer than this (a stream that never ends) is stopped anyway."""
DRAIN_SETTLE_S = 0.1
"""Gateway figures must be this much younger than the drain's start to count: the table
without the replica (pushed, and acknowledged, later in the pass that began the drain)
has reached every gateway worker by then, and a request routed just before it is
counted in flight."""


class Drains:
    """Replicas removed by a scale-down: out of the routing table first, stopped once the
    gateway reports none of their requests in flight (in a snapshot taken after the table
    that dropped them was pushed), or after :data:`DRAIN_MAX_S`."""

    def __init__(self) -> None:
        self._since: dict[str, tuple[str, float]] = {}
        """Replica id -> (engine name, when draining began)."""

    def __contains__(self, replica_id: object) -> bool:
        return replica_id in self._since

    def __len__(self) -> int:
        return len(self._since)

    def begin(self, replica_id: str, engine: str, now: float) -> None:
        self._since.setdefault(replica_id, (engine, now))

    def done(self, stats: GatewayStats | None, now: float) -> list[tuple[str, str]]:
        """(engine, replica id) of each replica drained now; forgets them."""
        out = []
        for rid, (engine, since) in list(self._since.items()):
            fresh = stats is not None and stats.at >= since + DRAIN_SETTLE_S
            idle = fresh and not any(
                d.inflight.get(rid, 0) for d in (stats.deployments.values() if stats else ())
            )
            if idle or now - since >= DRAIN_MAX_S:
                out.append((engine, rid))
                del self._since[rid]
        return out
