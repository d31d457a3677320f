"""Baseten's ``.../websocket`` routes: from config to server shape to table to route."""

from __future__ import annotations

import pytest

from kingpost.config import parse_config
from kingpost.controller.specs import server_shape
from kingpost.gateway.routing import Miss, Target, resolve
from kingpost.gateway.server import Gateway
from kingpost.gateway.table import DeploymentRoute, DeploymentState, ModelRoute, RoutingTable


def _table() -> RoutingTable:
    def dep(dep_id: str, websocket_path: str | None) -> DeploymentRoute:
        return DeploymentRoute(
            dep_id, "m1", "/v1/models/model:predict", DeploymentState.SERVING,
            websocket_path=websocket_path,
        )  # fmt: skip

    return RoutingTable(
        version=1,
        models={
            "m1": ModelRoute(
                "m1",
                "talk",
                {"production": (("ws", 1.0),), "staging": (("plain", 1.0),)},
                development="dev",
            )
        },
        model_names={"talk": "m1"},
        deployments={
            "ws": dep("ws", "/v1/websocket"),
            "dev": dep("dev", "/v1/websocket"),
            "plain": dep("plain", None),
        },
    )


@pytest.mark.parametrize(
    ("host", "path", "deployment"),
    [
        ("", "/models/talk/environments/production/websocket", "ws"),
        ("", "/models/m1/production/websocket", "ws"),
        ("", "/models/talk/deployment/ws/websocket", "ws"),
        ("", "/models/talk/development/websocket", "dev"),
        ("model-m1.localhost:8080", "/environments/production/websocket", "ws"),
    ],
)
def test_websocket_routes_reach_the_deployments_websocket_path(
    host: str, path: str, deployment: str
) -> None:
    found = resolve(_table(), host, path, "mode=json")
    # Anything but a handshake is refused with a JSON error that says what to do ...
    assert isinstance(found, Miss) and found.status == 400
    assert found.code == "websocket_required" and "Upgrade: websocket" in found.message
    # ... and a handshake goes to the server's WebSocket path, query kept.
    target = found.upgrade
    assert isinstance(target, Target)
    assert target.deployment.deployment_id == deployment
    assert target.path == "/v1/websocket?mode=json"


@pytest.mark.parametrize(
    ("path", "status", "says"),
    [
        ("/models/talk/environments/staging/websocket", 404, "transport.kind: websocket"),
        ("/models/talk/deployment/plain/websocket", 404, "transport.kind: websocket"),
        ("/models/talk/environments/nope/websocket", 404, "environment 'nope'"),
        ("/models/talk/deployment/gone/websocket", 404, "deployment 'gone'"),
        ("/models/talk/production/websocket/extra", 404, "use predict, websocket, wake or sync"),
        ("/models/nobody/production/websocket", 404, "model 'nobody' not found"),
    ],
)
def test_websocket_routes_that_lead_nowhere(path: str, status: int, says: str) -> None:
    found = resolve(_table(), "", path)
    assert isinstance(found, Miss) and found.upgrade is None
    assert found.status == status and says in found.message


def test_the_gateway_keeps_a_websocket_answer_per_table() -> None:
    gw = Gateway(_table())
    url = b"/models/talk/production/websocket"
    first = gw.route(b"localhost", url)
    assert isinstance(first, Miss) and first.upgrade is not None
    assert gw.route(b"localhost", url) is first


def test_the_websocket_path_survives_the_control_socket() -> None:
    table = _table()
    again = RoutingTable.from_json(table.to_json())
    assert again.deployments["ws"].websocket_path == "/v1/websocket"
    assert again.deployments["plain"].websocket_path is None
    # A table from a controller that predates the field still loads.
    old = table.to_json()
    del old["deployments"]["ws"]["websocket_path"]
    assert RoutingTable.from_json(old).deployments["ws"].websocket_path is None


@pytest.mark.parametrize(
    ("config", "websocket_path"),
    [
        ("model_name: m\n", None),
        ("runtime:\n  transport:\n    kind: websocket\n", "/v1/websocket"),
        ("runtime:\n  is_websocket_endpoint: true\n", "/v1/websocket"),
        ("runtime:\n  transport:\n    kind: http\n", None),
        (
            "docker_server:\n  start_command: serve\n  server_port: 9000\n"
            "  predict_endpoint: /realtime\n  readiness_endpoint: /health\n"
            "  liveness_endpoint: /health\nruntime:\n  transport:\n    kind: websocket\n",
            "/realtime",
        ),
        (
            "docker_server:\n  start_command: serve\n  server_port: 9000\n"
            "  predict_endpoint: /realtime\n  readiness_endpoint: /health\n"
            "  liveness_endpoint: /health\n",
            None,
        ),
    ],
)
def test_which_deployments_serve_websockets(config: str, websocket_path: str | None) -> None:
    assert server_shape(parse_config(config).config).websocket_path == websocket_path
