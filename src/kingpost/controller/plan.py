"""Pure reconcile decisions: ``plan(want, replicas) -> Plan``.

No I/O, no clock reads: the loop gathers state, calls :func:`plan`, and applies
the returned actions. Tested table-driven in ``tests/unit/test_controller_plan.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kingpost.engines.base import ReplicaPhase, ReplicaStatus
from kingpost.store.models import DeploymentStatus

__all__ = ["Plan", "Want", "plan"]

_LIVE = (ReplicaPhase.STARTING, ReplicaPhase.READY, ReplicaPhase.NOT_READY, ReplicaPhase.RESTARTING)
BUILD_FAILED_PREFIX = "BUILD_FAILED:"


@dataclass(frozen=True)
class Want:
    """What one deployment should be, as far as replicas go."""

    active: bool
    """Desired state is ACTIVE and every prerequisite (secrets, env, weights) is met."""
    replicas: int
    """Replicas wanted when active."""
    generation: int = 0
    """The deployment's current activation: failed replicas started for an older one are
    replaced, not reported (the user re-activated the deployment after a failure)."""
    was_active: bool = False
    """The deployment has served before (so a loss of ready replicas is UNHEALTHY)."""
    replace_older: bool = False
    """Live replicas of an older generation are replaced: new ones start, and the old ones
    serve until as many new ones are ready (a development deployment's swap)."""
    routed: frozenset[str] | None = None
    """Replicas the published routing table sends traffic to (``None``: not known). With
    it, an older replica leaves the table before it is stopped, once the new ones are in."""


@dataclass(frozen=True)
class Plan:
    start: int = 0
    """How many new replicas to start."""
    stop: tuple[str, ...] = ()
    """Replica ids to stop."""
    status: DeploymentStatus | None = None
    """Observed status to record (None: leave as is, e.g. while preparing)."""
    message: str = ""
    ready: tuple[ReplicaStatus, ...] = field(default=())
    """Replicas that get traffic."""


def plan(want: Want, replicas: list[ReplicaStatus]) -> Plan:
    if not want.active:
        return Plan(stop=tuple(r.replica_id for r in replicas if r.phase != ReplicaPhase.STOPPED))
    stale = [
        r for r in replicas if r.phase == ReplicaPhase.FAILED and r.generation < want.generation
    ]
    current = [r for r in replicas if r not in stale and r.phase != ReplicaPhase.STOPPED]
    failed = [r for r in current if r.phase == ReplicaPhase.FAILED]
    live = [r for r in current if r.phase in _LIVE]
    ready = tuple(r for r in live if r.phase == ReplicaPhase.READY)
    stop = [r.replica_id for r in stale]
    older: list[ReplicaStatus] = []
    if want.replace_older:
        older = [r for r in live if r.generation < want.generation]
        live = [r for r in live if r not in older]
        failed = [r for r in failed if r.generation >= want.generation]
        ready = tuple(r for r in ready if r not in older)
    # Scale down: drop the least useful replicas first (not ready before ready).
    excess = len(live) - want.replicas
    if excess > 0:
        order = sorted(live, key=lambda r: (r.phase == ReplicaPhase.READY, r.started_at))
        stop.extend(r.replica_id for r in order[:excess])
        live = [r for r in live if r.replica_id not in stop]
        ready = tuple(r for r in ready if r.replica_id not in stop)
    # A failed replica is not retried by itself: the engine already gave up on it.
    start = max(0, want.replicas - len(live) - len(failed))
    status, message = _observe(want, ready, live, failed)
    routed = want.routed
    if (
        older
        and len(ready) >= want.replicas
        and (routed is None or all(r.replica_id in routed for r in ready))
    ):
        # Replaced: the new ones serve now. An older one still routed gets no more traffic
        # and is stopped once the table without it is out.
        stop.extend(r.replica_id for r in older if routed is None or r.replica_id not in routed)
    elif older:  # they serve until then
        ready = (*ready, *(r for r in older if r.phase == ReplicaPhase.READY))
    if older and status not in (DeploymentStatus.FAILED, DeploymentStatus.BUILD_FAILED):
        # ACTIVE once the older ones are gone: then only the new ones answer.
        status = DeploymentStatus.DEPLOYING
        message = "replacing the running replica, which serves until the new one is ready"
    return Plan(start=start, stop=tuple(stop), status=status, message=message, ready=ready)


def _observe(
    want: Want,
    ready: tuple[ReplicaStatus, ...],
    live: list[ReplicaStatus],
    failed: list[ReplicaStatus],
) -> tuple[DeploymentStatus, str]:
    if want.replicas == 0 and not live:
        return DeploymentStatus.SCALED_TO_ZERO, ""
    if ready:
        return DeploymentStatus.ACTIVE, ""
    if failed and not live:
        msg = failed[0].message
        if msg.startswith(BUILD_FAILED_PREFIX):
            return DeploymentStatus.BUILD_FAILED, msg[len(BUILD_FAILED_PREFIX) :].strip()
        return DeploymentStatus.FAILED, msg
    if want.was_active:
        return DeploymentStatus.UNHEALTHY, "no replica is ready"
    return DeploymentStatus.DEPLOYING, ""
