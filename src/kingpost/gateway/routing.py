"""Pure routing: (table, Host, path) -> where a request goes, or why it can't.

Baseten's surface: a model is addressed by host ``model-{id}.{domain}`` or by the
path prefix ``/models/{id_or_name}``; under it ``/environments/{env}/predict``,
``/environments/{env}/websocket``, ``/environments/{env}/sync/{path}``,
``/production/...``, ``/deployment/{id}/...`` and ``/development/...``; ``.../wake``
(Baseten's) wakes the deployment it names and is answered 202 ``{}`` by the gateway.

A ``websocket`` route is only for WebSocket handshakes, which routing cannot see (the
answer is kept per URL): it resolves to a :class:`Miss` for any other request that carries
the :class:`Target` of a handshake in ``upgrade``. Requests for other routes never look
at it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from kingpost.gateway.table import DeploymentRoute, DeploymentState, ModelRoute, RoutingTable

__all__ = ["AsyncOp", "Miss", "Target", "resolve"]


@dataclass(frozen=True)
class Target:
    deployment: DeploymentRoute
    path: str
    """Path (with query) to send to the server."""
    model_id: str
    weighted: bool = False
    """The deployment was drawn from a weighted split (a canary): the next request to the
    same URL may go elsewhere, so this answer must not be reused."""
    kind: str = "predict"
    """The route kind the metrics count it under (``gateway.stats.ROUTE_KINDS``)."""


@dataclass(frozen=True)
class AsyncOp:
    """An async inference route, answered by the gateway from the store
    (``gateway/asyncroutes.py``), never by a replica."""

    kind: str
    """``predict`` (enqueue), ``queue_status``, ``request`` (status or cancel), ``result``."""
    deployment_id: str | None = None
    environment: str | None = None
    """The environment ``predict`` named (``production`` for ``/production/...``)."""
    request_id: str | None = None


@dataclass(frozen=True)
class Miss:
    status: int
    message: str
    code: str = "not_found"
    weighted: bool = False
    """As for :class:`Target`: the answer came after a draw from a weighted split."""
    upgrade: Target | None = None
    """For a ``websocket`` route: where a WebSocket handshake goes instead of this error."""
    model_id: str | None = None
    """The model the request was for, when the path named one that exists."""
    wake: str | None = None
    """For a ``wake`` route: the deployment to wake (answered 202 ``{}`` at once)."""
    async_op: AsyncOp | None = None
    """For an async inference route: what to do (see :class:`AsyncOp`)."""


def _model_from_host(table: RoutingTable, host: str) -> ModelRoute | None:
    name = host.split(":", 1)[0].lower()
    if not name.startswith("model-"):
        return None
    first, _, rest = name.partition(".")
    if rest != table.domain and not rest.endswith("." + table.domain) and rest:
        return None
    return table.models.get(first[len("model-") :])


def _model_ref(table: RoutingTable, ref: str) -> ModelRoute | None:
    model = table.models.get(ref)
    if model is None:
        model_id = table.model_names.get(ref)
        model = table.models.get(model_id) if model_id else None
    return model


def _pick(pairs: tuple[tuple[str, float], ...]) -> str:
    if len(pairs) == 1:
        return pairs[0][0]
    r, acc = random.random() * sum(w for _, w in pairs), 0.0
    for dep_id, weight in pairs:
        acc += weight
        if r < acc:
            return dep_id
    return pairs[-1][0]


def resolve(table: RoutingTable, host: str, path: str, query: str = "") -> Target | Miss:
    model = _model_from_host(table, host)
    parts = path.lstrip("/").split("/", 3) if model is not None else []
    if model is None:
        head = path.lstrip("/").split("/", 2)
        if len(head) < 3 or head[0] != "models":
            return Miss(
                404,
                f"no route for {path!r}: use /models/{{model}}/... "
                f"or host model-{{id}}.{table.domain}",
            )
        model = _model_ref(table, head[1])
        if model is None:
            return Miss(404, f"model {head[1]!r} not found")
        parts = head[2].split("/", 3)
    found = _under_model(table, model, parts, query)
    return replace(found, model_id=model.model_id) if isinstance(found, Miss) else found


def _under_model(
    table: RoutingTable, model: ModelRoute, parts: list[str], query: str
) -> Target | Miss:
    kind = parts[0] if parts else ""
    if kind == "environments" and len(parts) >= 3:
        env, action, rest = parts[1], parts[2], parts[3] if len(parts) > 3 else ""
        pairs = model.environments.get(env)
        if not pairs:
            return Miss(404, f"environment {env!r} of model {model.name!r} has no deployment")
        found = _action(table, model, _pick(pairs), action, rest, query, len(pairs) > 1)
        return _with_environment(found, env)
    if kind in ("production", "development") and len(parts) >= 2:
        action, rest = parts[1], "/".join(parts[2:])
        if kind == "production":
            pairs = model.environments.get("production")
            if not pairs:
                return Miss(404, f"model {model.name!r} has no production deployment")
            dep_id = _pick(pairs)
            weighted = len(pairs) > 1
        else:
            if model.development is None:
                return Miss(404, f"model {model.name!r} has no development deployment")
            dep_id, weighted = model.development, False
        found = _action(table, model, dep_id, action, rest, query, weighted)
        return _with_environment(found, "production") if kind == "production" else found
    if kind == "deployment" and len(parts) >= 3:
        dep_id, action, rest = parts[1], parts[2], parts[3] if len(parts) > 3 else ""
        return _action(table, model, dep_id, action, rest, query)
    if kind == "async_request" and len(parts) >= 2 and parts[1]:
        tail = "/".join(parts[2:])
        if tail in ("", "result"):  # Baseten's status (and cancel); Kingpost's result
            op = AsyncOp("result" if tail else "request", request_id=parts[1])
            return Miss(200, "", "async", async_op=op)
    return Miss(404, f"no route {'/'.join(parts)!r} under model {model.name!r}")


def _action(
    table: RoutingTable,
    model: ModelRoute,
    dep_id: str,
    action: str,
    rest: str,
    query: str,
    weighted: bool = False,
) -> Target | Miss:
    dep = table.deployments.get(dep_id)
    if dep is None or dep.model_id != model.model_id:
        return Miss(
            404, f"deployment {dep_id!r} of model {model.name!r} not found", weighted=weighted
        )
    suffix = f"?{query}" if query else ""
    if action == "predict" and not rest:
        return Target(dep, dep.predict_path + suffix, model.model_id, weighted)
    if action == "sync":
        if rest.lstrip("/").lower().startswith(("_kingpost/", "%5fkingpost/")):
            # The control plane's own paths on a replica (its reload) are never forwarded.
            return Miss(404, f"no route sync/{rest!r}: paths under /_kingpost/ are reserved",
                        weighted=weighted)  # fmt: skip
        return Target(dep, "/" + rest + suffix, model.model_id, weighted, "sync")
    if action == "websocket" and not rest:
        return _websocket(dep, model, suffix, weighted)
    if action == "wake" and not rest:  # Baseten's: start a deployment scaled to zero
        if dep.state == DeploymentState.INACTIVE:
            return Miss(404, dep.message or "deployment is inactive", weighted=weighted)
        return Miss(202, "", "wake", weighted, wake=dep.deployment_id)
    if action in ("async_predict", "async_queue_status") and not rest:
        if action == "async_predict" and dep.state == DeploymentState.INACTIVE:
            return Miss(404, dep.message or "deployment is inactive", weighted=weighted)
        kind = "predict" if action == "async_predict" else "queue_status"
        op = AsyncOp(kind, deployment_id=dep.deployment_id)
        return Miss(200, "", "async", weighted, async_op=op)
    return Miss(
        404,
        f"no route {action!r}: use predict, websocket, wake or sync/{{path}}",
        weighted=weighted,
    )


def _with_environment(found: Target | Miss, env: str) -> Target | Miss:
    if not isinstance(found, Miss) or found.async_op is None or found.async_op.kind != "predict":
        return found
    return replace(found, async_op=replace(found.async_op, environment=env))


def _websocket(dep: DeploymentRoute, model: ModelRoute, suffix: str, weighted: bool) -> Miss:
    if dep.websocket_path is None:
        return Miss(
            404,
            f"deployment {dep.deployment_id!r} of model {model.name!r} does not serve "
            "WebSockets: its config.yaml needs `runtime.transport.kind: websocket` (and a model "
            "class with `async def websocket`, or a custom server whose predict_endpoint "
            "takes WebSockets); use .../predict for HTTP",
            "not_websocket",
            weighted,
        )
    return Miss(
        400,
        "this route takes a WebSocket handshake (`GET` with `Connection: Upgrade` and "
        "`Upgrade: websocket`); connect with a WebSocket client, e.g. ws://…/websocket",
        "websocket_required",
        weighted,
        upgrade=Target(dep, dep.websocket_path + suffix, model.model_id, weighted, "websocket"),
    )
