"""WebSocket deployments through the whole platform: push -> controller -> process engine ->
replica -> gateway ``.../websocket``, for a model class and for a custom server."""

from __future__ import annotations

import pytest
from test_platform_models import deploy
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from helpers.platform import Platform


def ws(platform: Platform, path: str) -> ClientConnection:
    url = platform.gateway_url.replace("http://", "ws://") + path
    headers = {"Authorization": f"Api-Key {platform.api_key}"}
    return connect(url, additional_headers=headers, open_timeout=30, close_timeout=10)


def test_a_websocket_model_class_on_every_route(platform: Platform) -> None:
    model_id, dep = deploy(platform, "websocket_echo")
    for route in ("environments/production/websocket", "production/websocket",
                  f"deployment/{dep['id']}/websocket"):  # fmt: skip
        with ws(platform, f"/models/{model_id}/{route}") as client:
            client.send("hello")
            assert client.recv(timeout=10) == "echo: hello"
            client.send(b"\x01\x02")  # text mode: the model reads text, so this is its error
            with pytest.raises(ConnectionClosed) as info:
                client.recv(timeout=10)
            assert info.value.rcvd is not None and info.value.rcvd.code == 1011
    with ws(platform, f"/models/{model_id}/production/websocket?mode=json") as client:
        client.send('["a", 1]')
        assert client.recv(timeout=10) == '{"echo":["a",1],"path":"/v1/websocket"}'
    with platform.gateway() as gw:
        plain = gw.get(f"/models/{model_id}/production/websocket")
        assert plain.status_code == 400 and plain.json()["code"] == "websocket_required"
        predict = gw.post(f"/models/{model_id}/production/predict", json={})
        assert predict.status_code == 404 and "/v1/websocket" in predict.json()["error"]


def test_websocket_routes_on_a_deployment_without_websockets(platform: Platform) -> None:
    model_id, _ = deploy(platform, "basic")
    with pytest.raises(InvalidStatus) as info:
        ws(platform, f"/models/{model_id}/production/websocket")
    assert info.value.response.status_code == 404
    assert b"transport.kind: websocket" in bytes(info.value.response.body or b"")
    with pytest.raises(InvalidStatus) as info:
        ws(platform, f"/models/{model_id}/environments/staging/websocket")
    assert info.value.response.status_code == 404


def test_a_custom_server_gets_websockets_at_its_predict_endpoint(platform: Platform) -> None:
    model_id, _ = deploy(platform, "websocket_custom_server")
    with ws(platform, f"/models/{model_id}/production/websocket?room=7") as client:
        client.send("hi")
        assert client.recv(timeout=10) == "custom /ws?room=7: hi"
        client.send(b"\x00raw")
        assert client.recv(timeout=10) == b"\x00raw"
