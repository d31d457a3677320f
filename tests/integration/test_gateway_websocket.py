"""The gateway's ``.../websocket`` routes in front of a real model server."""

from __future__ import annotations

import hashlib
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import httpx
import pytest
from test_gateway_proxy import AUTH, KEY, Running, _handshake
from test_server_harness import ServerProcess, ready_server
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from helpers.platform import wait_for
from helpers.wsraw import RawWebSocket
from kingpost.gateway.table import (
    DeploymentRoute,
    DeploymentState,
    ModelRoute,
    RoutingTable,
    Upstream,
)


@pytest.fixture(scope="module")
def model_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ready_server("websocket_echo", tmp_path_factory.mktemp("ws")) as (server, _):
        yield server


@pytest.fixture
def gw(model_server: ServerProcess) -> Iterator[Running]:
    running = Running()
    up = (Upstream("r1", "127.0.0.1", model_server.port),)

    def dep(dep_id: str, websocket_path: str | None, concurrency: int = 8) -> DeploymentRoute:
        return DeploymentRoute(
            dep_id, "m1", "/v1/models/model:predict", DeploymentState.SERVING, up,
            concurrency=concurrency, websocket_path=websocket_path,
        )  # fmt: skip

    running.version += 1
    table = RoutingTable(
        version=running.version,
        models={
            "m1": ModelRoute(
                "m1",
                "talk",
                {"production": (("ws", 1.0),), "one": (("single", 1.0),)},
                development="dev",
            )
        },
        model_names={"talk": "m1"},
        deployments={
            "ws": dep("ws", "/v1/websocket"),
            "dev": dep("dev", "/v1/websocket"),
            "single": dep("single", "/v1/websocket", concurrency=1),
            "plain": dep("plain", None),
        },
        api_key_hashes=frozenset({hashlib.sha256(KEY.encode()).hexdigest()}),
    )
    running.loop.call_soon_threadsafe(running.gateway.set_table, table)
    wait_for(lambda: running.gateway.table.version == table.version, 5, "table applied")
    try:
        yield running
    finally:
        running.close()


def ws(gw: Running, path: str, timeout: float = 10, **headers: str) -> ClientConnection:
    return connect(
        f"ws://127.0.0.1:{gw.port}{path}",
        additional_headers={**AUTH, **headers},
        open_timeout=timeout,
        close_timeout=10,
    )


def refused(gw: Running, path: str, **headers: str) -> httpx.Response:
    with pytest.raises(InvalidStatus) as info:
        ws(gw, path, **headers)
    response = info.value.response
    return httpx.Response(response.status_code, content=bytes(response.body or b""))


@pytest.mark.parametrize(
    "path",
    [
        "/models/talk/environments/production/websocket",
        "/models/talk/production/websocket",
        "/models/m1/deployment/ws/websocket",
        "/models/talk/development/websocket",
    ],
)
def test_each_websocket_route_reaches_the_model(gw: Running, path: str) -> None:
    with ws(gw, path) as client:
        assert client.response.status_code == 101
        assert len(client.response.headers["x-baseten-request-id"]) == 32
        for word in ("one", "two"):
            client.send(word)
            assert client.recv(timeout=10) == f"echo: {word}"
    with ws(gw, path + "?mode=json", **{"X-Baseten-Request-Id": "through-gw"}) as client:
        assert client.response.headers["x-baseten-request-id"] == "through-gw"
        client.send('{"n": 1}')
        assert client.recv(timeout=10) == '{"echo":{"n":1},"path":"/v1/websocket"}'


def test_close_codes_cross_the_gateway_both_ways(gw: Running) -> None:
    with ws(gw, "/models/talk/production/websocket") as client:
        client.send("close:4003:from the model")
        with pytest.raises(ConnectionClosed) as info:
            client.recv(timeout=10)
        assert info.value.rcvd is not None
        assert (info.value.rcvd.code, info.value.rcvd.reason) == (4003, "from the model")
    with ws(gw, "/models/talk/production/websocket") as client:
        client.send("raise")
        with pytest.raises(ConnectionClosed) as info:
            client.recv(timeout=10)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1011


def test_requests_that_are_not_handshakes_get_a_json_error(gw: Running) -> None:
    with httpx.Client(base_url=gw.url, headers=AUTH) as http:
        for method in ("GET", "POST"):
            r = http.request(method, "/models/talk/production/websocket", json={"a": 1})
            assert r.status_code == 400
            assert r.json()["code"] == "websocket_required"
            assert "Upgrade: websocket" in r.json()["error"]
        # The connection stays usable, and predict still goes to predict.
        r = http.post("/models/talk/production/predict", json={})
        assert r.status_code == 404 and "/v1/websocket" in r.json()["error"]


def test_websocket_routes_that_lead_nowhere(gw: Running) -> None:
    plain = refused(gw, "/models/talk/deployment/plain/websocket")
    assert plain.status_code == 404 and plain.json()["code"] == "not_websocket"
    assert "transport.kind: websocket" in plain.json()["error"]
    assert refused(gw, "/models/talk/environments/staging/websocket").status_code == 404
    assert refused(gw, "/models/nobody/production/websocket").status_code == 404
    assert refused(gw, "/models/talk/production/websocket/more").status_code == 404
    assert (
        refused(gw, "/models/talk/production/websocket", Authorization="Api-Key no").status_code
        == 401
    )


def test_an_open_websocket_holds_a_replica_slot(gw: Running) -> None:
    # Each connection is one request in flight for the deployment's concurrency (Baseten's
    # concurrency target counts WebSocket connections the same way): with 1, a second
    # handshake waits in the queue until the first connection closes.
    path = "/models/talk/environments/one/websocket"
    with ThreadPoolExecutor(1) as pool, ws(gw, path) as first:
        first.send("a")
        assert first.recv(timeout=10) == "echo: a"
        queued = pool.submit(ws, gw, path, 20)
        with pytest.raises(FutureTimeout):
            queued.result(timeout=0.5)
        first.close()
        with queued.result(timeout=10) as second:
            second.send("b")
            assert second.recv(timeout=10) == "echo: b"


def test_the_server_sees_the_gateways_request_id(gw: Running, model_server: ServerProcess) -> None:
    with ws(gw, "/models/talk/production/websocket", **{"X-Baseten-Request-Id": "seen-1"}) as c:
        c.send("x")
        c.recv(timeout=10)
    wait_for(
        lambda: any(
            line.get("message") == "websocket accepted" and line.get("request_id") == "seen-1"
            for line in model_server.lines()
        ),
        10,
        "the model server's log line with the request id",
    )


@pytest.mark.parametrize("how", ["close", "half-close"])
def test_a_handshake_given_up_in_the_queue_takes_no_slot(gw: Running, how: str) -> None:
    # With concurrency 1 and the slot taken, a client sends a handshake and leaves before
    # its turn. When the slot frees, it must go to the next client that is still there, not
    # to a tunnel nobody reads.
    path = "/models/talk/environments/one/websocket"
    with ws(gw, path) as first:
        first.send("a")
        assert first.recv(timeout=10) == "echo: a"
        quitter = socket.create_connection(("127.0.0.1", gw.port))
        quitter.sendall(_handshake(path))
        time.sleep(0.3)  # queued behind `first`
        if how == "close":
            quitter.close()
        else:
            quitter.shutdown(socket.SHUT_WR)
        time.sleep(0.3)
    try:
        with ws(gw, path, timeout=5) as third:
            third.send("c")
            assert third.recv(timeout=10) == "echo: c"
    finally:
        quitter.close()


def test_a_client_half_close_reaches_the_replica(gw: Running) -> None:
    # A TCP tunnel passes a half-close on: the replica sees the end of the client's stream,
    # ends the WebSocket, and its slot is free for the next client.
    path = "/models/talk/environments/one/websocket"
    raw = RawWebSocket(gw.port)
    try:
        assert raw.open(_handshake(path)).startswith(b"HTTP/1.1 101")
        raw.sock.shutdown(socket.SHUT_WR)
        assert raw.at_eof()  # the replica closes its side once it sees the EOF
    finally:
        raw.close()
    with ws(gw, path, timeout=5) as after:
        after.send("d")
        assert after.recv(timeout=10) == "echo: d"


def test_a_websocket_sessions_bytes_from_the_replica_are_counted(gw: Running) -> None:
    """The access line and the metrics' byte counts are the session's frames both ways, not
    only the handshake's (a 101 head out, no body in)."""
    word = "x" * 100_000
    with ws(gw, "/models/talk/production/websocket") as client:
        client.send(word)
        assert client.recv(timeout=10) == f"echo: {word}"

    def counted() -> tuple[int, int]:
        figures = gw.gateway.stats().deployments.get("ws")
        return (figures.bytes_in, figures.bytes_out) if figures is not None else (0, 0)

    wait_for(lambda: counted()[1] > 0, 10, "the session's access line")
    bytes_in, bytes_out = counted()
    assert bytes_in >= len(word) and bytes_out >= len(word)
