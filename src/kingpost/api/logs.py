"""Log routes: a deployment's recent output (as before), and queries of the log store.

``GET /v1/logs`` answers :class:`~kingpost.logstore.LogQuery` over the store (replica and
build output, the gateway's access lines): by model, environment, deployment, replica,
time range, least level, text, request id and source; ``order=oldest`` and ``after`` (a
line's cursor) page through every line in order, as ``kingpost logs --follow`` does. ``GET
/v1/deployments/{dep}/logs`` with ``tail`` alone answers as it always did (the engine's
files, the build's output); given any of the store's filters it queries the store for
that deployment.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends

from kingpost.errors import ValidationError
from kingpost.logstore import LogQuery, parse_level, parse_time, position, query

if TYPE_CHECKING:
    from kingpost.api.app import ControlPlane

__all__ = ["log_routes"]


@dataclass
class Filters:
    """The store's filters both routes take as query parameters (``Depends()``)."""

    replica: str | None = None
    since: str | None = None
    until: str | None = None
    level: str | None = None
    search: str | None = None
    request_id: str | None = None
    source: str | None = None

    def given(self) -> bool:
        return any(getattr(self, f.name) is not None for f in fields(self))


def _query(
    plane: ControlPlane,
    f: Filters,
    *,
    model: str | None,
    environment: str | None,
    deployment: str | None,
    limit: int,
    order: str = "newest",
    after: str | None = None,
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
    if f.source is not None and f.source not in ("gateway", "replica", "build"):
        raise ValidationError(
            f"source: must be one of gateway, replica, build; got {f.source!r}",
            field="source",
            value=f.source,
        )
    if f.search is not None and not f.search:
        raise ValidationError("search: must not be empty", field="search", value=f.search)
    if order not in ("newest", "oldest"):
        raise ValidationError(
            f"order: must be newest or oldest; got {order!r}", field="order", value=order
        )
    return LogQuery(
        model_id=model_id,
        deployment_ids=deployment_ids,
        replica=f.replica or None,
        since=parse_time(f.since, "since") if f.since is not None else None,
        until=parse_time(f.until, "until") if f.until is not None else None,
        level=parse_level(f.level) if f.level is not None else None,
        search=f.search,
        request_id=f.request_id or None,
        source=f.source,
        limit=limit,
        oldest_first=order == "oldest",
        after=position(plane.settings.logs_dir, after) if after is not None else None,
    )


def log_routes(router: APIRouter, plane: ControlPlane) -> None:
    store = plane.store
    root = plane.settings.logs_dir

    @router.get("/logs")
    def logs_query(
        f: Annotated[Filters, Depends()],
        model: str | None = None,
        environment: str | None = None,
        deployment: str | None = None,
        limit: int = 1000,
        order: str = "newest",
        after: str | None = None,
    ) -> dict[str, Any]:
        q = _query(
            plane,
            f,
            model=model,
            environment=environment,
            deployment=deployment,
            limit=limit,
            order=order,
            after=after,
        )
        return {"lines": query(root, q)}

    @router.get("/deployments/{dep}/logs")
    def logs(dep: str, f: Annotated[Filters, Depends()], tail: int = 200) -> dict[str, Any]:
        view = store.get_deployment(dep)
        if f.given():
            limit = max(1, min(tail, 10_000))
            q = _query(plane, f, model=None, environment=None, deployment=view.id, limit=limit)
            return {"deployment_id": view.id, "lines": query(root, q)}
        lines = plane.controller.logs(view, max(1, min(tail, 10_000)))
        return {
            "deployment_id": view.id,
            "lines": [{"replica": ln.replica_id, "text": ln.text} for ln in lines],
        }
