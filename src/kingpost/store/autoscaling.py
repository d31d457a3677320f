"""Autoscaling settings in the store: per deployment, and per environment.

A deployment's replica bounds are its ``min_replicas``/``max_replicas`` columns, the rest
its ``autoscaling_settings`` JSON. An environment may hold a whole set of its own, which
then applies to whichever deployment it points at (so a promotion hands the environment's
settings to the new deployment, as on Baseten). Changes apply in place: the controller
reads them at its next pass; nothing is redeployed or restarted.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import select

from kingpost.controller.autoscale import AutoscalingSettings
from kingpost.errors import NotFoundError, ValidationError
from kingpost.store.models import Environment, utcnow
from kingpost.store.repo import PRODUCTION, Store, _env_view, check_environment_name
from kingpost.store.views import DeploymentView, EnvironmentView

__all__ = [
    "deployment_settings",
    "effective_settings",
    "update_deployment_settings",
    "update_environment_settings",
]

log = logging.getLogger(__name__)

_warned: set[tuple[str, str, str]] = set()
"""(deployment, environment, stored settings) already warned about: the controller asks
for the settings at every pass, and one warning per stored set is enough."""


def deployment_settings(dep: DeploymentView) -> AutoscalingSettings:
    """The deployment's own settings (stored values that no longer validate fall back to
    the defaults field by field, so a bad row never stops the controller)."""
    base = AutoscalingSettings(min_replica=dep.min_replicas, max_replica=dep.max_replicas)
    out = base
    for name, value in dep.autoscaling_settings.items():
        try:
            out = out.merged({name: value})
        except Exception:
            continue
    return out


def effective_settings(
    dep: DeploymentView, environments: Sequence[EnvironmentView]
) -> tuple[AutoscalingSettings, str | None]:
    """The settings that govern ``dep`` and the environment they come from (None: its own).
    Several environments with settings pointing at one deployment: production's, else the
    first by name."""
    pointing = sorted(
        (e for e in environments if e.deployment_id == dep.id and e.autoscaling_settings),
        key=lambda e: (e.name != PRODUCTION, e.name),
    )
    own = deployment_settings(dep)
    if not pointing:
        return own, None
    env = pointing[0]
    return _over(own, dict(env.autoscaling_settings or {}), dep.id, env.name), env.name


def _over(
    own: AutoscalingSettings, stored: dict[str, Any], dep_id: str, env_name: str
) -> AutoscalingSettings:
    """An environment's stored set over a deployment's own settings, as a whole: it was
    validated whole when stored, and its fields only make sense together (merged one at a
    time, its ``min_replica`` 2 failed against the deployment's own ``max_replica`` 1 and
    was dropped). A set that no longer validates (an older release's rules) is merged
    field by field, each field that fails left out, with a warning saying which."""
    try:
        return own.merged(stored)
    except ValidationError as whole:
        settings, skipped = own, []
        for name, value in stored.items():
            try:
                settings = settings.merged({name: value})
            except ValidationError as exc:
                skipped.append(f"{name}={value!r} ({exc})")
        key = (dep_id, env_name, repr(sorted(stored.items())))
        if key not in _warned:
            _warned.add(key)
            log.warning(
                "environment %r's autoscaling settings do not apply as a whole to deployment "
                "%s (%s); applied field by field, leaving out: %s",
                env_name, dep_id, whole, "; ".join(skipped) or "nothing",
            )  # fmt: skip
        return settings


def _split(settings: AutoscalingSettings) -> tuple[int, int, dict[str, int]]:
    rest = settings.to_json()
    return rest.pop("min_replica"), rest.pop("max_replica"), rest


def update_deployment_settings(
    store: Store, model_ref: str, dep_ref: str, changes: Mapping[str, Any]
) -> tuple[str, str, DeploymentView]:
    """Apply ``changes`` (None values ignored) to a deployment's own settings: (status as
    Baseten answers it, ``ACCEPTED`` or ``UNCHANGED``; a message; the deployment)."""
    with store.db.session() as s:
        d = store._deployment(s, dep_ref, model_ref, lock=True)
        before = deployment_settings(store._view(s, d))
        after = before.merged(dict(changes))
        if d.is_development and (after.min_replica, after.max_replica) != (0, 1):
            field, value = (
                ("max_replica", after.max_replica)
                if after.max_replica != 1
                else ("min_replica", after.min_replica)
            )
            raise ValidationError(
                f"{field}: the development deployment runs one replica and scales to zero "
                f"when idle (min_replica 0, max_replica 1), as on Baseten; got {value}. "
                "Publish it (`kingpost deployments promote MODEL development`) to scale it",
                field=field,
                value=value,
            )
        lo, hi, rest = _split(after)
        d.min_replicas, d.max_replicas, d.autoscaling_settings = lo, hi, rest
        if after != before:
            d.updated_at = utcnow()
        view = store._view(s, d)
        envs = [
            e.name
            for e in s.scalars(select(Environment).where(Environment.deployment_id == d.id))
            if e.autoscaling_settings
        ]
    message = "applied in place" if after != before else "nothing changed"
    if envs:
        message += (
            f"; environment {envs[0]!r} points here with settings of its own, which govern "
            f"while it does (change those with PATCH /v1/models/{{model}}/environments/{envs[0]})"
        )
    return ("ACCEPTED" if after != before else "UNCHANGED"), message, view


def update_environment_settings(
    store: Store, model_ref: str, env_name: str, changes: Mapping[str, Any]
) -> tuple[str, str, EnvironmentView]:
    """Apply ``changes`` to an environment's settings; the first change starts from the
    settings of the deployment it points at (or the defaults)."""
    check_environment_name(env_name)
    with store.db.session() as s:
        model = store._model(s, model_ref, lock=True)
        env = s.scalar(
            select(Environment)
            .where(Environment.model_id == model.id, Environment.name == env_name)
            .with_for_update()
        )
        if env is None:
            raise NotFoundError(
                f"environment {env_name!r} not found on model {model.name!r}",
                environment=env_name,
            )
        if env.autoscaling_settings:
            before = AutoscalingSettings().merged(dict(env.autoscaling_settings))
        elif env.deployment_id is not None:
            dep = store._deployment(s, env.deployment_id)
            before = deployment_settings(store._view(s, dep))
        else:
            before = AutoscalingSettings()
        after = before.merged(dict(changes))
        changed = after != before or not env.autoscaling_settings
        env.autoscaling_settings = after.to_json()
        if changed:
            env.updated_at = utcnow()
        s.flush()
        view = _env_view(env)
    status = "ACCEPTED" if changed else "UNCHANGED"
    return status, "applied in place" if changed else "nothing changed", view
