"""Log routes: a deployment's recent output (as before), and queries of the log store.

``GET /v1/logs`` answers :class:`~kingpost.logstore.LogQuery` over the store (replica and
build output, the gateway's access lines): by model, environment, deployment, replica,
time range, least level, text, request id and source. ``GET
/v1/deployments/{dep}/logs`` with ``tail`` alone answers as it always did (the engine's
files, the build's output); given any of the store's filters it queries the store for
that deployment.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter

from kingpost.errors import ValidationError
from kingpost.logstore import LogQuery, parse_level, parse_time, query

if TYPE_CHECKING:
    from kingpost.api.app import ControlPlane

__all__ = ["log_routes"]


def _query(
    plane: ControlPlane,
    *,
    model: str | None,
    environment: str | None,
    deployment: str | None,
    replica: str | None,
    since: str | None,
    until: str | None,
    level: str | None,
    search: str | None,
    request_id: str | None,
    source: str | None,
    limit: int,
) -> LogQuery:
    store = plane.store
    model_id = store.get_model(model).id if model is not None else None
    deployment_ids: frozenset[str] | None = None
    if environment is not None:
        if model is None:
            raise ValidationError(
                f"environment: needs a model (environment names are per model); got "
                f"environment {environment!r} and no model",
                field="environment",
                value=environment,
            )
        env = store.get_environment(model, environment)
        deployment_ids = frozenset({env.deployment_id} if env.deployment_id else ())
    if deployment is not None:
        dep_id = store.get_deployment(deployment, model).id
        deployment_ids = (
            frozenset({dep_id}) if deployment_ids is None else deployment_ids & {dep_id}
        )
    if source is not None and source not in ("gateway", "replica", "build"):
        raise ValidationError(
            f"source: must be one of gateway, replica, build; got {source!r}",
            field="source",
            value=source,
        )
    if search is not None and not search:
        raise ValidationError("search: must not be empty", field="search", value=search)
    return LogQuery(
        model_id=model_id,
        deployment_ids=deployment_ids,
        replica=replica or None,
        since=parse_time(since, "since") if since is not None else None,
        until=parse_time(until, "until") if until is not None else None,
        level=parse_level(level) if level is not None else None,
        search=search,
        request_id=request_id or None,
        source=source,
        limit=limit,
    )


def log_routes(router: APIRouter, plane: ControlPlane) -> None:
    store = plane.store
    root = plane.settings.logs_dir

    @router.get("/logs")
    def logs_query(
        model: str | None = None,
        environment: str | None = None,
        deployment: str | None = None,
        replica: str | None = None,
        since: str | None = None,
        until: str | None = None,
        level: str | None = None,
        search: str | None = None,
        request_id: str | None = None,
        source: str | None = None,
        limit: int = 1000,
    ) -> dict[str, Any]:
        q = _query(
            plane,
            model=model,
            environment=environment,
            deployment=deployment,
            replica=replica,
            since=since,
            until=until,
            level=level,
            search=search,
            request_id=request_id,
            source=source,
            limit=limit,
        )
        return {"lines": query(root, q)}

    @router.get("/deployments/{dep}/logs")
    def logs(
        dep: str,
        tail: int = 200,
        replica: str | None = None,
        since: str | None = None,
        until: str | None = None,
        level: str | None = None,
        search: str | None = None,
        request_id: str | None = None,
        source: str | None = None,
    ) -> dict[str, Any]:
        view = store.get_deployment(dep)
        filters = (replica, since, until, level, search, request_id, source)
        if any(f is not None for f in filters):
            q = _query(
                plane,
                model=None,
                environment=None,
                deployment=view.id,
                replica=replica,
                since=since,
                until=until,
                level=level,
                search=search,
                request_id=request_id,
                source=source,
                limit=max(1, min(tail, 10_000)),
            )
            return {"deployment_id": view.id, "lines": query(root, q)}
        lines = plane.controller.logs(view, max(1, min(tail, 10_000)))
        return {
            "deployment_id": view.id,
            "lines": [{"replica": ln.replica_id, "text": ln.text} for ln in lines],
        }
