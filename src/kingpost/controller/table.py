"""Building the gateway's routing table from store rows and ready replicas (pure)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from kingpost.engines.base import ReplicaStatus
from kingpost.gateway.table import (
    DeploymentRoute,
    DeploymentState,
    ModelRoute,
    RoutingTable,
    Upstream,
)
from kingpost.metrics.platform import deployment_labels
from kingpost.store import (
    DeploymentStatus,
    DeploymentView,
    DesiredState,
    EnvironmentView,
    KeyScopes,
    ModelView,
)

if TYPE_CHECKING:
    from kingpost.controller.specs import ServerShape

__all__ = ["build_table", "public_message"]

_FAILED = (DeploymentStatus.FAILED, DeploymentStatus.BUILD_FAILED)
_FS_ROOTS = (
    "bin|boot|data|dev|etc|home|lib|lib64|media|mnt|opt|proc|root|run|sbin|srv|sys|tmp|usr|var"
)
_PATH_CHAR = r"[^\s'\"`:,;()\[\]{}<>]"
_PATHS = re.compile(rf"(?<![\w.:/~-])(?:~|/(?:{_FS_ROOTS}))(?:/{_PATH_CHAR}*)+")


def public_message(message: str, private: Sequence[str] = ()) -> str:
    """``message`` as the gateway may show it to callers: server file paths (under the usual
    file system roots, the home directory, or ``private``) become ``<path>``. The store and
    the logs keep the whole message."""
    for prefix in private:
        if prefix and prefix != "/":
            message = re.sub(rf"{re.escape(prefix)}(?:/{_PATH_CHAR}*)*", "<path>", message)
    return _PATHS.sub("<path>", message)


def _route(
    dep: DeploymentView,
    ready: Sequence[ReplicaStatus],
    shape: ServerShape | None,
    response_timeout_s: float,
    private: Sequence[str],
    hold: tuple[float, int] = (60.0, 1000),
    environment: str = "",
) -> DeploymentRoute:
    upstreams = tuple(
        Upstream(r.replica_id, r.endpoint.host, r.endpoint.port, r.endpoint.netns)
        for r in ready
        if r.endpoint is not None
    )
    if dep.desired_state != DesiredState.ACTIVE:
        state, message = DeploymentState.INACTIVE, f"deployment {dep.name} is deactivated"
    elif dep.status in _FAILED and not upstreams:
        why = public_message(dep.message, private)
        state, message = DeploymentState.INACTIVE, f"deployment {dep.name} failed: {why}"
    elif upstreams:
        state, message = DeploymentState.SERVING, ""
    else:
        state, message = DeploymentState.WAKING, f"deployment {dep.name} is {dep.status}"
    return DeploymentRoute(
        deployment_id=dep.id,
        model_id=dep.model_id,
        predict_path=shape.predict_path if shape is not None else "/",
        state=state,
        upstreams=upstreams,
        concurrency=shape.concurrency if shape is not None else 1,
        websocket_path=shape.websocket_path if shape is not None else None,
        message=message[:500],
        response_timeout_s=response_timeout_s,
        hold_timeout_s=hold[0],
        queue_limit=hold[1],
        name=dep.name,
        environment=environment,
    )


def _weights(
    pairs: Sequence[tuple[str, float]] | None, pointed: str, routes: Mapping[str, DeploymentRoute]
) -> tuple[tuple[str, float], ...]:
    known = tuple((d, w) for d, w in pairs or () if d in routes and w > 0)
    serving = tuple((d, w) for d, w in known if routes[d].upstreams)
    return serving or known or ((pointed, 1.0),)


def build_table(
    *,
    version: int,
    domain: str,
    models: Sequence[ModelView],
    deployments: Sequence[DeploymentView],
    environments: Sequence[EnvironmentView],
    ready: Mapping[str, Sequence[ReplicaStatus]],
    shapes: Mapping[str, ServerShape | None],
    keys: KeyScopes,
    response_timeout_s: float = 600.0,
    private_paths: Sequence[str] = (),
    splits: Mapping[tuple[str, str], Sequence[tuple[str, float]]] | None = None,
    hold_timeout_s: float = 60.0,
    queue_limit: int = 1000,
) -> RoutingTable:
    """The table for the gateway. Deployment messages it shows callers lose server file
    paths (see :func:`public_message`; ``private_paths``: the Kingpost home and the like).

    ``splits``: (model id, environment) -> weighted deployments, for an environment a
    rollout is moving; an entry whose deployment has no ready replica is left out while
    another has one, so a split never sends a request where nothing can answer it."""
    labels = deployment_labels(list(models), list(deployments), list(environments))
    routes = {
        d.id: _route(
            d,
            ready.get(d.id, ()),
            shapes.get(d.id),
            response_timeout_s,
            private_paths,
            (hold_timeout_s, queue_limit),
            labels[d.id].environment,
        )
        for d in deployments
    }
    model_routes: dict[str, ModelRoute] = {}
    for m in models:
        envs: dict[str, tuple[tuple[str, float], ...]] = {
            e.name: _weights((splits or {}).get((m.id, e.name)), e.deployment_id, routes)
            for e in environments
            if e.model_id == m.id and e.deployment_id is not None and e.deployment_id in routes
        }
        dev = next((d.id for d in deployments if d.model_id == m.id and d.is_development), None)
        model_routes[m.id] = ModelRoute(m.id, m.name, envs, dev)
    return RoutingTable(
        version=version,
        domain=domain,
        models=model_routes,
        model_names={m.name: m.id for m in models},
        deployments=routes,
        api_key_hashes=keys.admin,
        invoke_keys=dict(keys.invoke),
    )
