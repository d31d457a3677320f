"""The development deployment's routes: apply a new upload of its project (live reload,
see :mod:`kingpost.controller.devloop`), and promotion, which publishes a new deployment
from its files."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter

from kingpost.api.schemas import DeploymentOut, DevelopmentSyncIn, DevelopmentSyncOut
from kingpost.errors import ConflictError, NotFoundError
from kingpost.store import DeploymentView, DesiredState, NewDeployment

if TYPE_CHECKING:
    from kingpost.api.app import ControlPlane

__all__ = ["development_deployment", "development_routes", "promote"]


def development_deployment(plane: ControlPlane, model: str) -> DeploymentView:
    """The model's development deployment; 404 naming how to create one."""
    found = [d for d in plane.store.list_deployments(model) if d.is_development]
    if not found:
        raise NotFoundError(
            f"model {model!r} has no development deployment; create it with "
            "`kingpost push --watch DIR`",
            model=model,
        )
    return found[0]


def development_routes(router: APIRouter, plane: ControlPlane) -> None:
    @router.post("/models/{model}/development/sync", response_model=DevelopmentSyncOut)
    def sync(model: str, body: DevelopmentSyncIn) -> DevelopmentSyncOut:
        from kingpost.controller.devloop import apply_project

        dep = development_deployment(plane, model)
        if dep.desired_state != DesiredState.ACTIVE:
            raise ConflictError(
                f"model {model!r}'s development deployment is {dep.desired_state}; activate "
                f"it (`kingpost deployments activate {model} development`) or push --watch "
                "again",
                deployment=dep.id,
            )
        config = _validated(plane, body.project_hash, dep.engine)
        done = apply_project(plane.controller, plane.store, dep, body.project_hash, config)
        plane.controller.wake()
        return DevelopmentSyncOut(
            kind=done.kind,
            ok=done.ok,
            changed=list(done.changed),
            removed=list(done.removed),
            why=done.why,
            took_s=done.took_s,
            error=done.error,
            traceback=done.traceback,
            replicas=list(done.replicas),
            deployment=DeploymentOut.of(done.deployment),
        )


def _validated(plane: ControlPlane, project_hash: str, engine: str) -> dict[str, object]:
    """The uploaded project's config.yaml document, checked as a push checks it (a
    ConfigError names the file and line)."""
    from kingpost.api.app import check_pushable
    from kingpost.config import load_config
    from kingpost.engines.registry import engine_kind

    app_dir = plane.settings.projects_dir / project_hash
    if not app_dir.is_dir():
        raise NotFoundError(
            f"project {project_hash} was not uploaded; PUT /v1/projects/{{sha}} first",
            project_hash=project_hash,
        )
    loaded = load_config(app_dir, engine=engine)
    check_pushable(plane, loaded.config, app_dir, engine_kind(engine, all_kinds=False))
    return dict(loaded.document())


def promote(
    plane: ControlPlane,
    model: str,
    deployment: str,
    environment: str,
    scale_down_previous: bool | None = None,
) -> DeploymentView:
    """Point ``environment`` at a deployment; the development deployment is never pointed
    at: a new, numbered deployment is published from its current files instead."""
    dep = plane.store.get_deployment(deployment, model)
    if not dep.is_development:
        return plane.store.promote(model, deployment, environment, scale_down_previous)
    name = plane.store.get_model(dep.model_id).name
    return plane.store.create_deployment(
        NewDeployment(
            model_name=name,
            project_hash=dep.project_hash,
            config=dep.config,
            engine=dep.engine,
            labels=dep.labels,
            environment=environment,
            scale_down_previous=scale_down_previous,
        )
    )
