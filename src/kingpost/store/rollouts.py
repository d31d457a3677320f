"""Rollout rows: created by a promotion into an environment that serves traffic, advanced
by the controller, steered by users (pause, resume, cancel, force-complete).

Functions here work inside a transaction the store opened (see ``repo.Store``), with the
model's row locked first as every change to a model's environments does.
"""

from __future__ import annotations

import secrets as _secrets
import string
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from kingpost.errors import ConflictError, NotFoundError
from kingpost.store.models import (
    Deployment,
    DeploymentStatus,
    DesiredState,
    Environment,
    Rollout,
    RolloutStatus,
    utcnow,
)
from kingpost.store.views import RolloutView

__all__ = [
    "RUNNING",
    "check_not_rolling",
    "control",
    "latest",
    "record",
    "roll_or_point",
    "rollout_view",
]

RUNNING = (RolloutStatus.IN_PROGRESS, RolloutStatus.PAUSED)
_SERVING = (DeploymentStatus.ACTIVE, DeploymentStatus.UNHEALTHY)
_CONTROLS = ("pause", "resume", "cancel", "force_complete")


def rollout_view(r: Rollout) -> RolloutView:
    return RolloutView(
        id=r.id,
        model_id=r.model_id,
        environment=r.environment,
        previous_deployment_id=r.previous_deployment_id,
        candidate_deployment_id=r.candidate_deployment_id,
        rolling=r.rolling,
        status=RolloutStatus(r.status),
        phase=r.phase,
        step=r.step,
        steps=r.steps,
        target_replicas=r.target_replicas,
        previous_initial_replicas=r.previous_initial_replicas,
        candidate_replicas=r.candidate_replicas,
        previous_replicas=r.previous_replicas,
        candidate_traffic_percent=r.candidate_traffic_percent,
        requested=r.requested,
        message=r.message,
        settings=dict(r.settings or {}),
        phase_since=r.phase_since,
        created_at=r.created_at,
        updated_at=r.updated_at,
        finished_at=r.finished_at,
    )


def _state(r: Rollout) -> dict[str, Any]:
    """What a 409 shows of the rollout it refers to."""
    return {
        "rollout_id": r.id,
        "status": r.status,
        "step": r.step,
        "steps": r.steps,
        "candidate_traffic_percent": r.candidate_traffic_percent,
        "requested": r.requested,
    }


def _new_id() -> str:
    return "ro" + "".join(_secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _running(s: Session, model_id: str, env_name: str) -> Rollout | None:
    return s.scalar(
        select(Rollout).where(
            Rollout.model_id == model_id,
            Rollout.environment == env_name,
            Rollout.status.in_(RUNNING),
        )
    )


def latest(s: Session, model_id: str, env_name: str) -> Rollout | None:
    return s.scalar(
        select(Rollout)
        .where(Rollout.model_id == model_id, Rollout.environment == env_name)
        .order_by(Rollout.created_at.desc())
        .limit(1)
    )


def roll_or_point(
    s: Session,
    env: Environment,
    dep: Deployment,
    model_name: str,
    scale_down_previous: bool | None = None,
) -> None:
    """Promote ``dep`` into ``env``: at once when nothing serves there, else as a rollout
    that keeps traffic on the serving deployment until ``dep`` is ready. With
    ``scale_down_previous`` the deployment it replaces is deactivated once it is out of
    the environment (true) or left running (false); None: after a rolling promotion only."""
    running = _running(s, env.model_id, env.name)
    if running is not None:
        raise ConflictError(
            f"environment {env.name!r} of model {model_name!r} has a promotion "
            f"{running.status} (rollout {running.id}); wait for it to end, or end it with "
            f"`kingpost rollouts cancel|force-complete {model_name} --environment {env.name}`",
            environment=env.name,
            **_state(running),
        )
    previous = s.get(Deployment, env.deployment_id) if env.deployment_id else None
    serving = (
        previous is not None
        and previous.id != dep.id
        and previous.desired_state == DesiredState.ACTIVE
        and previous.status in _SERVING
    )
    if not serving or previous is None:
        if env.deployment_id != dep.id:
            env.deployment_id, env.updated_at = dep.id, utcnow()
            if previous is not None and previous.id != dep.id and scale_down_previous:
                s.flush()  # the environment no longer points at it
                _deactivate_unless_pointed_at(s, previous.id, utcnow())
        return
    settings = dict(env.promotion_settings or {})
    s.add(
        Rollout(
            id=_new_id(),
            model_id=env.model_id,
            environment=env.name,
            previous_deployment_id=previous.id,
            candidate_deployment_id=dep.id,
            rolling=bool(settings.get("rolling_deploy", False)),
            status=RolloutStatus.IN_PROGRESS,
            phase="STEP_DONE",
            step=0,
            steps=1,
            target_replicas=max(1, dep.min_replicas),
            previous_initial_replicas=max(1, previous.min_replicas),
            candidate_replicas=0,
            previous_replicas=max(1, previous.min_replicas),
            candidate_traffic_percent=0.0,
            message="",
            settings=settings,
            scale_down_previous=scale_down_previous,
        )
    )


def check_not_rolling(s: Session, dep: Deployment, model_name: str) -> None:
    """409 when ``dep`` is a side of a running rollout: deleting it then would leave the
    rollout's terminal write to point the environment at a deleted deployment (the
    candidate), or fail back to one (the previous). The caller holds ``dep``'s row, which
    :func:`record` takes before it moves an environment, so the two never interleave."""
    r = s.scalar(
        select(Rollout).where(
            Rollout.status.in_(RUNNING),
            (Rollout.candidate_deployment_id == dep.id)
            | (Rollout.previous_deployment_id == dep.id),
        )
    )
    if r is None:
        return
    side = "candidate" if r.candidate_deployment_id == dep.id else "previous deployment"
    raise ConflictError(
        f"deployment {dep.name!r} is the {side} of the promotion into {r.environment!r} "
        f"(rollout {r.id}, {r.status}); cancel the promotion first (`kingpost rollouts cancel "
        f"{model_name} --environment {r.environment}`, or POST /v1/models/{{model}}/"
        f"environments/{r.environment}/cancel_promotion) and delete it once the rollout has "
        "ended",
        deployment=dep.id,
        environment=r.environment,
        **_state(r),
    )


def control(s: Session, model_id: str, env_name: str, model_name: str, action: str) -> Rollout:
    """A user's pause, resume, cancel or force_complete; 409 with the current state when
    the rollout is not in a state that allows it."""
    if action not in _CONTROLS:
        raise NotFoundError(f"no rollout action {action!r}; use one of {list(_CONTROLS)}")
    r = latest(s, model_id, env_name)
    if r is None:
        raise NotFoundError(
            f"environment {env_name!r} of model {model_name!r} has had no promotion while "
            "it served traffic",
            environment=env_name,
        )
    status = RolloutStatus(r.status)
    legal = {
        "pause": status == RolloutStatus.IN_PROGRESS and r.requested is None,
        "resume": status == RolloutStatus.PAUSED
        or (status == RolloutStatus.IN_PROGRESS and r.requested == "pause"),
        "cancel": status in RUNNING and r.requested != "cancel",
        "force_complete": status in RUNNING and r.requested in (None, "pause"),
    }[action]
    if not legal:
        pending = f" with {r.requested} requested" if r.requested else ""
        raise ConflictError(
            f"cannot {action.replace('_', '-')} the rollout of {model_name!r} into "
            f"{env_name!r}: it is {status}{pending}",
            environment=env_name,
            **_state(r),
        )
    if action == "resume":
        r.requested = None
        r.status = RolloutStatus.IN_PROGRESS
    else:
        r.requested = action
    r.updated_at = utcnow()
    return r


def record(
    s: Session, rollout_id: str, fields: Mapping[str, Any], seen: tuple[str, str | None]
) -> Rollout | None:
    """Write the controller's next state unless a user changed the rollout since it read
    it (``seen``: the status and request it decided from); the row as written, or None.
    A finished rollout moves the environment (SUCCEEDED) and deactivates the side that
    lost, unless another environment points at it. A SUCCEEDED whose candidate is no
    longer desired ACTIVE (changed after the controller's snapshot) is written FAILED
    instead, the environment left where it is."""
    r = s.get(Rollout, rollout_id, with_for_update=True)
    if r is None or (str(r.status), r.requested) != seen:
        return None
    for key, value in fields.items():
        setattr(r, key, value)
    now = utcnow()
    r.updated_at = now
    status = RolloutStatus(r.status)
    if status in RUNNING:
        return r
    r.finished_at = now
    env = s.scalar(
        select(Environment).where(
            Environment.model_id == r.model_id, Environment.name == r.environment
        )
    )
    if status == RolloutStatus.SUCCEEDED and not _still_wanted(s, r.candidate_deployment_id):
        _fail(r, "the candidate deployment was deactivated or deleted as the promotion "
              "completed; the environment stays on the previous deployment")  # fmt: skip
        status = RolloutStatus.FAILED
    if status == RolloutStatus.SUCCEEDED:
        if env is not None:
            env.deployment_id, env.updated_at = r.candidate_deployment_id, now
        down = r.rolling if r.scale_down_previous is None else r.scale_down_previous
        loser = r.previous_deployment_id if down else None
    else:
        loser = r.candidate_deployment_id
    if loser is not None:
        _deactivate_unless_pointed_at(s, loser, now)
    return r


def _still_wanted(s: Session, dep_id: str) -> bool:
    """Whether the candidate is still desired ACTIVE, read under its row's lock: the
    controller decided from a snapshot, and a deactivation (or a delete, which
    :func:`check_not_rolling` refuses while the rollout runs, but which may have committed
    just before it started) since would have the environment point at what does not run."""
    d = s.get(Deployment, dep_id, with_for_update=True, populate_existing=True)
    return d is not None and d.desired_state == DesiredState.ACTIVE


def _fail(r: Rollout, message: str) -> None:
    """A terminal FAILED as ``controller/rollout.py``'s ``_finish`` writes it: all traffic
    and the replicas back on the previous deployment."""
    r.status, r.message = RolloutStatus.FAILED, message
    r.candidate_traffic_percent, r.candidate_replicas = 0.0, 0
    r.previous_replicas = r.previous_initial_replicas


def _deactivate_unless_pointed_at(s: Session, dep_id: str, now: datetime) -> None:
    if s.scalar(select(Environment.id).where(Environment.deployment_id == dep_id)) is not None:
        return
    d = s.get(Deployment, dep_id)
    if d is not None and d.desired_state == DesiredState.ACTIVE:
        d.desired_state, d.updated_at = DesiredState.INACTIVE, now


def epoch(value: datetime) -> float:
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()
