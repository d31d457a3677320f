"""Routing by URL and Host, and the gateway's per-table memory of answers (one seam)."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace

import pytest

from kingpost.gateway.routing import AsyncOp, Miss, Target, resolve
from kingpost.gateway.server import Gateway
from kingpost.gateway.table import DeploymentRoute, DeploymentState, ModelRoute, RoutingTable

PREDICT = b"/models/m/environments/production/predict"


def _table(version: int, split: tuple[tuple[str, float], ...]) -> RoutingTable:
    deployments = {
        d: DeploymentRoute(d, "m1", f"/{d}/predict", DeploymentState.SERVING)
        for d in ("d1", "d2", "dev")
    }
    return RoutingTable(
        version=version,
        models={"m1": ModelRoute("m1", "m", {"production": split}, development="dev")},
        model_names={"m": "m1"},
        deployments=deployments,
    )


def test_paths_and_hosts_reach_the_same_deployment() -> None:
    table = _table(1, (("d1", 1.0),))
    by_path = resolve(table, "localhost:8080", "/models/m/environments/production/predict")
    by_host = resolve(table, "model-m1.localhost", "/environments/production/predict")
    by_id = resolve(table, "", "/models/m1/deployment/d2/sync/v1/chat", "stream=1")
    dev = resolve(table, "", "/models/m/development/predict")
    assert isinstance(by_path, Target) and isinstance(by_host, Target)
    assert by_path.path == by_host.path == "/d1/predict"
    assert not by_path.weighted
    assert isinstance(by_id, Target) and by_id.path == "/v1/chat?stream=1"
    assert isinstance(dev, Target) and dev.deployment.deployment_id == "dev"
    missing = resolve(table, "", "/models/nope/production/predict")
    assert isinstance(missing, Miss) and missing.status == 404 and "nope" in missing.message


def test_answers_are_reused_until_the_next_table() -> None:
    gw = Gateway(_table(1, (("d1", 1.0),)))
    first = gw.route(b"localhost", PREDICT)
    assert gw.route(b"localhost", PREDICT) is first
    assert isinstance(first, Target) and first.deployment.deployment_id == "d1"
    # A promotion pushes a new table: the remembered answer must not outlive it.
    assert gw.set_table(_table(2, (("d2", 1.0),)))
    moved = gw.route(b"localhost", PREDICT)
    assert isinstance(moved, Target) and moved.deployment.deployment_id == "d2"
    # A miss is forgotten the same way once the model exists.
    gw.set_table(RoutingTable(version=3))
    assert isinstance(gw.route(b"localhost", PREDICT), Miss)
    gw.set_table(_table(4, (("d1", 1.0),)))
    assert isinstance(gw.route(b"localhost", PREDICT), Target)


def test_a_weighted_split_is_drawn_for_every_request() -> None:
    gw = Gateway(_table(1, (("d1", 0.5), ("d2", 0.5))))
    seen = Counter[str]()
    for _ in range(400):
        target = gw.route(b"localhost", PREDICT)
        assert isinstance(target, Target) and target.weighted
        seen[target.deployment.deployment_id] += 1
    # P(either side < 120 of 400 at p = 0.5) is below 1e-15.
    assert min(seen["d1"], seen["d2"]) > 120, seen


def test_many_distinct_urls_do_not_grow_memory_without_bound() -> None:
    gw = Gateway(_table(1, (("d1", 1.0),)))
    for i in range(5000):
        target = gw.route(b"localhost", PREDICT + b"?request=%d" % i)
        assert isinstance(target, Target) and target.path == f"/d1/predict?request={i}"
    assert len(gw._routes) <= 1024


def test_a_miss_from_a_weighted_draw_is_not_kept_either() -> None:
    # One side of the split is missing from the table (e.g. mid-update): its misses must not
    # stick to the URL and turn away the traffic meant for the side that serves.
    gw = Gateway(_table(1, (("d1", 0.5), ("gone", 0.5))))
    kinds = Counter(type(gw.route(b"localhost", PREDICT)).__name__ for _ in range(200))
    assert kinds["Target"] > 50 and kinds["Miss"] > 50, kinds


def test_a_miss_under_a_model_names_it_for_the_key_scope_check() -> None:
    table = _table(1, (("d1", 1.0),))
    for path in ("/models/m/environments/staging/predict", "/models/m1/deployment/zz/predict"):
        miss = resolve(table, "", path)
        assert isinstance(miss, Miss) and miss.model_id == "m1", path
    by_host = resolve(table, "model-m1.localhost", "/nowhere")
    assert isinstance(by_host, Miss) and by_host.model_id == "m1"
    for path in ("/models/nope/production/predict", "/elsewhere"):
        miss = resolve(table, "", path)
        assert isinstance(miss, Miss) and miss.model_id is None


def test_key_scopes_follow_the_table_and_drop_with_it() -> None:
    import hashlib

    from kingpost.gateway.table import ADMIN, KeyScope

    def digest(key: str) -> str:
        return hashlib.sha256(key.encode()).hexdigest()

    table = _table(1, (("d1", 1.0),))
    gw = Gateway(
        RoutingTable(
            **{
                **table.__dict__,
                "api_key_hashes": frozenset({digest("admin")}),
                "invoke_keys": {digest("inv"): frozenset({"m1"})},
            }
        )
    )
    assert gw.authorized(b"Api-Key admin") is ADMIN and ADMIN.allows(None)
    scope = gw.authorized(b"Bearer inv")
    assert scope == KeyScope(frozenset({"m1"}))
    assert scope.allows("m1") and not scope.allows("m2") and not scope.allows(None)
    assert gw.authorized(b"Api-Key nope") is None and gw.authorized(None) is None
    assert gw.set_table(_table(2, (("d1", 1.0),)))  # no keys: the cached answers go too
    assert gw.authorized(b"Bearer inv") is None and gw.authorized(b"Api-Key admin") is None


# The whole answer of resolve() for each URL shape, compared field by field (dataclass
# equality): which deployment, the server path with its remainder and query, the status,
# message and code of a miss, whether a weighted draw was made, and the model named.
DOMAIN = "kp.example.com"
NO_ROUTE = "no route for {!r}: use /models/{{model}}/... or host model-{{id}}." + DOMAIN
BAD_ACTION = "no route {!r}: use predict, websocket, wake or sync/{{path}}"
NOT_WEBSOCKET = (
    "deployment {!r} of model {!r} does not serve WebSockets: its config.yaml needs "
    "`runtime.transport.kind: websocket` (and a model class with `async def websocket`, or a "
    "custom server whose predict_endpoint takes WebSockets); use .../predict for HTTP"
)
HANDSHAKE = (
    "this route takes a WebSocket handshake (`GET` with `Connection: Upgrade` and "
    "`Upgrade: websocket`); connect with a WebSocket client, e.g. ws://…/websocket"
)


def _routes() -> RoutingTable:
    def dep(dep_id: str, model_id: str, websocket_path: str | None = None) -> DeploymentRoute:
        return DeploymentRoute(
            dep_id, model_id, f"/{dep_id}/predict", DeploymentState.SERVING,
            websocket_path=websocket_path,
        )  # fmt: skip

    deployments = [
        dep("d1", "m1"),
        dep("d2", "m1"),
        dep("dev", "m1"),
        dep("s1", "m3"),
        dep("s2", "m3", websocket_path="/ws"),
        dep("other", "m2"),
    ]
    return RoutingTable(
        version=1,
        domain=DOMAIN,
        models={
            "m1": ModelRoute(
                "m1",
                "m",
                {"production": (("d1", 1.0),), "canary": (("d1", 1.0), ("d2", 3.0)), "empty": ()},
                development="dev",
            ),
            "m2": ModelRoute("m2", "bare"),
            "m3": ModelRoute("m3", "split", {"production": (("s1", 1.0), ("s2", 3.0))}),
        },
        model_names={"m": "m1", "bare": "m2", "split": "m3"},
        deployments={d.deployment_id: d for d in deployments},
    )


def _to(dep_id: str, path: str, weighted: bool = False) -> Target:
    """The target, its route kind (for the metrics) told by its path in these tables."""
    dep = _routes().deployments[dep_id]
    bare = path.split("?", 1)[0]
    kind = "websocket" if bare == "/ws" else "predict" if bare.endswith("/predict") else "sync"
    return Target(dep, path, dep.model_id, weighted, kind)


def _miss(
    status: int,
    message: str,
    code: str = "not_found",
    weighted: bool = False,
    *,
    upgrade: Target | None = None,
    model_id: str | None = None,
    async_op: AsyncOp | None = None,
) -> Miss:
    return Miss(status, message, code, weighted, upgrade, model_id, async_op=async_op)


def _async(kind: str, model_id: str = "m1", weighted: bool = False, **op: str | None) -> Miss:
    return _miss(200, "", "async", weighted, model_id=model_id, async_op=AsyncOp(kind, **op))


ROUTES: list[tuple[str, str, str, Target | Miss]] = [
    # (host, path, query, answer); a draw from a split lands on its second side (see below).
    ("", "/models/m/production/predict", "", _to("d1", "/d1/predict")),
    ("", "/models/m1/production/predict", "a=1", _to("d1", "/d1/predict?a=1")),
    ("", "/models/m/production/sync/v1/chat/completions", "a=1",
     _to("d1", "/v1/chat/completions?a=1")),
    ("", "/models/m/production/sync/", "", _to("d1", "/")),
    ("", "/models/m/environments/production/sync/v1/chat/completions", "",
     _to("d1", "/v1/chat/completions")),
    ("", "/models/m/environments/canary/predict", "", _to("d2", "/d2/predict", weighted=True)),
    ("", "/models/split/production/predict", "", _to("s2", "/s2/predict", weighted=True)),
    ("", "/models/split/production/sync/a/b", "", _to("s2", "/a/b", weighted=True)),
    ("", "/models/m/development/predict", "", _to("dev", "/dev/predict")),
    ("", "/models/m/development/sync/v1/a/b", "", _to("dev", "/v1/a/b")),
    # The control plane's reload path on a replica is never forwarded.
    ("", "/models/m/development/sync/_kingpost/reload", "",
     _miss(404, "no route sync/'_kingpost/reload': paths under /_kingpost/ are reserved",
           model_id="m1")),
    ("", "/models/m/deployment/d2/sync//%5Fkingpost/reload", "",
     _miss(404, "no route sync/'/%5Fkingpost/reload': paths under /_kingpost/ are reserved",
           model_id="m1")),
    ("", "/models/m/deployment/d2/predict", "q=1", _to("d2", "/d2/predict?q=1")),
    ("", "/models/m/deployment/d2/sync/v1/a/b", "", _to("d2", "/v1/a/b")),
    ("model-m1." + DOMAIN, "/environments/production/sync/v1/a/b", "", _to("d1", "/v1/a/b")),
    ("model-m1." + DOMAIN, "/production/sync/v1/a/b", "", _to("d1", "/v1/a/b")),
    ("model-m1." + DOMAIN, "/deployment/d2/sync/v1/a/b", "", _to("d2", "/v1/a/b")),
    ("MODEL-M1.eu." + DOMAIN + ":8443", "/production/predict", "", _to("d1", "/d1/predict")),
    ("model-m1", "/development/predict", "", _to("dev", "/dev/predict")),
    # Misses: what the JSON error says, and the model it was for when the URL named one.
    ("", "/", "", _miss(404, NO_ROUTE.format("/"))),
    ("", "/models/m", "", _miss(404, NO_ROUTE.format("/models/m"))),
    ("", "/v1/models/m/predict", "", _miss(404, NO_ROUTE.format("/v1/models/m/predict"))),
    ("model-m1.evil.example", "/production/predict", "",
     _miss(404, NO_ROUTE.format("/production/predict"))),
    ("model-m1.x" + DOMAIN, "/production/predict", "",
     _miss(404, NO_ROUTE.format("/production/predict"))),
    ("model-nope." + DOMAIN, "/production/predict", "",
     _miss(404, NO_ROUTE.format("/production/predict"))),
    ("", "/models/nope/production/predict", "", _miss(404, "model 'nope' not found")),
    ("", "/models/bare/production/predict", "",
     _miss(404, "model 'bare' has no production deployment", model_id="m2")),
    ("", "/models/bare/development/predict", "",
     _miss(404, "model 'bare' has no development deployment", model_id="m2")),
    ("", "/models/m/environments/empty/predict", "",
     _miss(404, "environment 'empty' of model 'm' has no deployment", model_id="m1")),
    ("", "/models/m/environments/staging/predict", "",
     _miss(404, "environment 'staging' of model 'm' has no deployment", model_id="m1")),
    ("", "/models/m/foo/bar/baz", "",
     _miss(404, "no route 'foo/bar/baz' under model 'm'", model_id="m1")),
    ("", "/models/m/production", "", _miss(404, "no route 'production' under model 'm'",
                                           model_id="m1")),
    ("", "/models/m/deployment/d2", "", _miss(404, "no route 'deployment/d2' under model 'm'",
                                              model_id="m1")),
    ("", "/models/m/environments/canary", "",
     _miss(404, "no route 'environments/canary' under model 'm'", model_id="m1")),
    ("", "/models/m/deployment/other/predict", "",
     _miss(404, "deployment 'other' of model 'm' not found", model_id="m1")),
    ("", "/models/m/production/async_predict", "",
     _async("predict", deployment_id="d1", environment="production")),
    ("", "/models/m/environments/canary/async_predict", "",
     _async("predict", weighted=True, deployment_id="d2", environment="canary")),
    ("", "/models/m/deployment/d1/async_predict", "", _async("predict", deployment_id="d1")),
    ("", "/models/m/deployment/d1/async_queue_status", "",
     _async("queue_status", deployment_id="d1")),
    ("", "/models/m/production/async_queue_status", "",
     _async("queue_status", deployment_id="d1")),
    ("", "/models/m/async_request/abc", "", _async("request", request_id="abc")),
    ("", "/models/m/async_request/abc/result", "", _async("result", request_id="abc")),
    ("", "/models/m/async_request/abc/other", "",
     _miss(404, "no route 'async_request/abc/other' under model 'm'", model_id="m1")),
    ("", "/models/m/production/async_predict/x", "",
     _miss(404, BAD_ACTION.format("async_predict"), model_id="m1")),
    ("", "/models/m/environments/canary/predict/extra", "",
     _miss(404, BAD_ACTION.format("predict"), weighted=True, model_id="m1")),
    ("", "/models/m/production/stream", "", _miss(404, BAD_ACTION.format("stream"),
                                                  model_id="m1")),
    ("", "/models/m/production/websocket", "",
     _miss(404, NOT_WEBSOCKET.format("d1", "m"), "not_websocket", model_id="m1")),
    ("", "/models/m/environments/canary/websocket", "",
     _miss(404, NOT_WEBSOCKET.format("d2", "m"), "not_websocket", True, model_id="m1")),
    ("", "/models/split/production/websocket", "x=1",
     _miss(400, HANDSHAKE, "websocket_required", True, model_id="m3",
           upgrade=_to("s2", "/ws?x=1", weighted=True))),
    ("", "/models/split/deployment/s2/websocket", "",
     _miss(400, HANDSHAKE, "websocket_required", model_id="m3", upgrade=_to("s2", "/ws"))),
]  # fmt: skip


@pytest.mark.parametrize(("host", "path", "query", "answer"), ROUTES, ids=[r[1] for r in ROUTES])
def test_every_url_shape_resolves_to_its_whole_answer(
    monkeypatch: pytest.MonkeyPatch, host: str, path: str, query: str, answer: Target | Miss
) -> None:
    # A draw from a 1:3 split at 0.5 of the total weight lands on its second side.
    monkeypatch.setattr(random, "random", lambda: 0.5)
    assert resolve(_routes(), host, path, query) == answer


PICKS = [
    # (weights of a, b, c; the uniform draw; the side it picks): a cumulative walk, each
    # side owning [its start, its end) of the total.
    ((1.0, 1.0, 2.0), 0.0, "a"),
    ((1.0, 1.0, 2.0), 0.2, "a"),
    ((1.0, 1.0, 2.0), 0.25, "b"),  # exactly the end of a: the next side
    ((1.0, 1.0, 2.0), 0.4, "b"),
    ((1.0, 1.0, 2.0), 0.5, "c"),
    ((1.0, 1.0, 2.0), 0.99, "c"),
    ((0.0, 1.0, 0.0), 0.0, "b"),  # a side of weight 0 gets nothing
    ((0.0, 1.0, 0.0), 0.99, "b"),
    ((0.0, 0.0, 0.0), 0.5, "c"),  # all zero (a table mid-update): the last side, no error
]


@pytest.mark.parametrize(("weights", "draw", "side"), PICKS)
def test_a_weighted_pick_takes_the_side_the_draw_falls_in(
    monkeypatch: pytest.MonkeyPatch, weights: tuple[float, float, float], draw: float, side: str
) -> None:
    table = _routes()
    pairs = tuple(zip(("d1", "d2", "dev"), weights, strict=True))
    model = replace(table.models["m1"], environments={"split": pairs})
    table = replace(table, models={"m1": model})
    monkeypatch.setattr(random, "random", lambda: draw)
    found = resolve(table, "", "/models/m1/environments/split/predict")
    picked = {"d1": "a", "d2": "b", "dev": "c"}
    assert isinstance(found, Target) and found.weighted
    assert picked[found.deployment.deployment_id] == side


@pytest.mark.parametrize(
    "path",
    [
        "/models/m/deployment/d1/wake",
        "/models/m/production/wake",
        "/models/m/environments/production/wake",
        "/models/m/development/wake",
    ],
)
def test_wake_routes_name_the_deployment_to_wake(path: str) -> None:
    found = resolve(_routes(), "", path)
    assert isinstance(found, Miss) and found.status == 202
    assert found.wake == ("dev" if "development" in path else "d1")


def test_wake_of_an_inactive_deployment_is_404() -> None:
    table = _routes()
    inactive = replace(table.deployments["d1"], state=DeploymentState.INACTIVE, message="gone")
    table = replace(table, deployments={**table.deployments, "d1": inactive})
    found = resolve(table, "", "/models/m/deployment/d1/wake")
    assert isinstance(found, Miss) and (found.status, found.wake) == (404, None)
