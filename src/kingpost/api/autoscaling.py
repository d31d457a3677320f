"""Autoscaling routes, as Baseten's management API names them.

``PATCH /v1/models/{model}/deployments/{dep}/autoscaling_settings`` changes settings in
place and answers ``{"status": "ACCEPTED" | "UNCHANGED", "message"}``; an environment's
(``PATCH /v1/models/{model}/environments/{env}``, body ``{"autoscaling_settings": {...}}``)
is one route with its promotion settings, in ``api/rollouts.py``;
``POST /v1/models/{model}/deployments/{dep}/wake`` wakes a deployment scaled to zero.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter
from pydantic import BaseModel

from kingpost.api.gpus import replica_devices
from kingpost.api.schemas import AutoscalingIn, DeploymentOut, EnvironmentOut
from kingpost.store import DeploymentView, EnvironmentView, RolloutView
from kingpost.store.autoscaling import (
    effective_settings,
    update_deployment_settings,
)

if TYPE_CHECKING:
    from kingpost.api.app import ControlPlane

__all__ = ["UpdateOut", "autoscaling_routes", "describe", "describe_all", "environment_out"]


class UpdateOut(BaseModel):
    status: str
    message: str


def describe(
    plane: ControlPlane, view: DeploymentView, envs: list[EnvironmentView] | None = None
) -> DeploymentOut:
    """A deployment as the API shows it, with its settings and the autoscaler's counts."""
    out = DeploymentOut.of(view)
    if envs is None:
        envs = plane.store.list_environments(view.model_id)
    settings, source = effective_settings(view, envs)
    out.autoscaling_settings, out.autoscaling_settings_from = settings.to_json(), source
    counts = plane.controller.scaler.counts(view.id)
    if counts is not None:
        out.replicas_wanted, out.replicas_starting = counts.wanted, counts.starting
        out.replicas_ready, out.scaling_reason = counts.ready, counts.reason
    out.gpus = replica_devices(plane, view.id)
    out.active_replica_count = out.replicas_ready or 0
    return out


def environment_out(
    plane: ControlPlane,
    env: EnvironmentView,
    envs: list[EnvironmentView] | None = None,
    rollout: RolloutView | None = None,
) -> EnvironmentOut:
    """An environment as the API shows it: Baseten's ``current_deployment`` whole."""
    current = None
    if env.deployment_id is not None:
        current = describe(plane, plane.store.get_deployment(env.deployment_id), envs)
    return EnvironmentOut.of(env, rollout, current)


def describe_all(plane: ControlPlane, views: list[DeploymentView]) -> list[DeploymentOut]:
    by_model: dict[str, list[EnvironmentView]] = {}
    out = []
    for v in views:
        if v.model_id not in by_model:
            by_model[v.model_id] = plane.store.list_environments(v.model_id)
        out.append(describe(plane, v, by_model[v.model_id]))
    return out


def autoscaling_routes(router: APIRouter, plane: ControlPlane) -> None:
    store = plane.store

    def _changes(body: AutoscalingIn) -> dict[str, Any]:
        return body.model_dump(exclude_none=True)

    @router.patch(
        "/models/{model}/deployments/{dep}/autoscaling_settings", response_model=UpdateOut
    )
    def update_deployment(model: str, dep: str, body: AutoscalingIn) -> UpdateOut:
        status, message, _ = update_deployment_settings(store, model, dep, _changes(body))
        plane.controller.wake()
        return UpdateOut(status=status, message=message)

    @router.post("/models/{model}/deployments/{dep}/wake")
    def wake(model: str, dep: str) -> dict[str, Any]:
        view = store.get_deployment(dep, model)
        plane.controller.wake_deployment(view.id)
        return {}
