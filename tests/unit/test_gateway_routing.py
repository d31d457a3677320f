"""Routing by URL and Host, and the gateway's per-table memory of answers (one seam)."""

from __future__ import annotations

from collections import Counter

from kingpost.gateway.routing import Miss, Target, resolve
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
