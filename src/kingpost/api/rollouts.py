"""Environment routes: promotion settings, promotions and the rollouts they start.

Baseten's paths where it has them (``PATCH /v1/models/{model}/environments/{env}``,
``POST .../environments/{env}/promote``, ``POST .../environments/{env}/cancel_promotion``);
Kingpost's in the same style for what it adds (``GET .../promotion``,
``POST .../pause_promotion``, ``.../resume_promotion``, ``.../force_complete_promotion``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter

from kingpost.api.autoscaling import describe, environment_out
from kingpost.api.schemas import (
    DeploymentOut,
    EnvironmentOut,
    EnvironmentPatch,
    EnvironmentPromoteIn,
    EnvironmentUpdateOut,
    RolloutOut,
)
from kingpost.controller.rollout import PromotionSettings, merge_promotion_settings
from kingpost.errors import NotFoundError
from kingpost.store.autoscaling import update_environment_settings

if TYPE_CHECKING:
    from kingpost.api.app import ControlPlane

__all__ = ["rollout_routes"]

_ENV = "/models/{model}/environments/{env}"


def rollout_routes(router: APIRouter, plane: ControlPlane) -> None:
    store = plane.store

    def control(model: str, env: str, action: str) -> RolloutOut:
        out = RolloutOut.of(store.control_rollout(model, env, action))
        plane.controller.wake()
        return out

    @router.get(_ENV, response_model=EnvironmentOut)
    def get_environment(model: str, env: str) -> EnvironmentOut:
        view = store.get_environment(model, env)
        return environment_out(plane, view, rollout=store.latest_rollout(model, env))

    @router.patch(_ENV, response_model=EnvironmentUpdateOut)
    def update_environment(model: str, env: str, body: EnvironmentPatch) -> EnvironmentUpdateOut:
        """Baseten's one PATCH for an environment's promotion and autoscaling settings; its
        ``status``/``message`` say whether the autoscaling settings changed."""
        status, message = "UNCHANGED", "nothing to change"
        change = body.promotion_settings

        def merged(stored: Mapping[str, Any]) -> dict[str, Any]:
            # What is left out or null keeps its value, as in Baseten's update.
            return PromotionSettings.from_api(
                merge_promotion_settings(stored, change or {})
            ).to_api()

        if change is not None:  # checked whole before anything is stored: 400 naming it
            merged(store.get_environment(model, env).promotion_settings)
        if body.autoscaling_settings is not None:
            changes = body.autoscaling_settings.model_dump(exclude_none=True)
            status, message, _ = update_environment_settings(store, model, env, changes)
            plane.controller.wake()
        if change is not None:
            store.set_promotion_settings(model, env, merged)
            status, message = (
                "ACCEPTED",
                message if status == "ACCEPTED" else "promotion settings stored",
            )
        view = store.get_environment(model, env)
        out = environment_out(plane, view, rollout=store.latest_rollout(model, env))
        return EnvironmentUpdateOut(**out.model_dump(), status=status, message=message)

    @router.post(f"{_ENV}/promote", response_model=DeploymentOut)
    def promote_to_environment(model: str, env: str, body: EnvironmentPromoteIn) -> DeploymentOut:
        """Baseten's route promotes into an environment that exists (production always
        does there): a misspelt name is a 404, not a new environment nobody calls."""
        if env != "production":
            store.get_environment(model, env)  # 404 naming it and how to list them
        down = body.scale_down_previous_deployment
        out = describe(plane, store.promote(model, body.deployment_id, env, down))
        plane.controller.wake()
        return out

    @router.get(f"{_ENV}/promotion", response_model=RolloutOut)
    def promotion_status(model: str, env: str) -> RolloutOut:
        rollout = store.latest_rollout(model, env)
        if rollout is None:
            raise NotFoundError(
                f"environment {env!r} of model {model!r} has had no promotion while it "
                "served traffic",
                environment=env,
            )
        return RolloutOut.of(rollout)

    @router.post(f"{_ENV}/pause_promotion", response_model=RolloutOut)
    def pause_promotion(model: str, env: str) -> RolloutOut:
        return control(model, env, "pause")

    @router.post(f"{_ENV}/resume_promotion", response_model=RolloutOut)
    def resume_promotion(model: str, env: str) -> RolloutOut:
        return control(model, env, "resume")

    @router.post(f"{_ENV}/cancel_promotion", response_model=RolloutOut)
    def cancel_promotion(model: str, env: str) -> RolloutOut:
        return control(model, env, "cancel")

    @router.post(f"{_ENV}/force_complete_promotion", response_model=RolloutOut)
    def force_complete_promotion(model: str, env: str) -> RolloutOut:
        return control(model, env, "force_complete")
