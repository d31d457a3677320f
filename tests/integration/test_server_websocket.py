"""The model server's ``/v1/websocket`` against a real WebSocket client and raw frames."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
from test_server_harness import FIXTURES, ServerProcess, ready_server, run_server
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from helpers.platform import wait_for
from helpers.wsraw import ACCEPT, RawWebSocket, close_payload, frame, handshake

PREDICT = "/v1/models/model:predict"
MODEL_ERROR = "Internal Server Error (in model/chainlet)."
NOT_IMPLEMENTED = "WebSocket is not implemented on this deployment."


def ws(server: ServerProcess, query: str = "", **headers: str) -> ClientConnection:
    url = server.url.replace("http://", "ws://") + "/v1/websocket" + query
    return connect(url, additional_headers=headers, open_timeout=10, close_timeout=10)


def closed_by_server(client: ClientConnection) -> tuple[int, str]:
    """Receive until the server closes; the (code, reason) of its close frame."""
    with pytest.raises(ConnectionClosed) as info:
        while True:
            client.recv(timeout=10)
    assert info.value.rcvd is not None, "the server dropped the connection without a close"
    return info.value.rcvd.code, info.value.rcvd.reason


def logged(server: ServerProcess, message: str, **fields: Any) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        for line in server.lines():
            if line.get("message") == message and all(line.get(k) == v for k, v in fields.items()):
                return line
        return None

    return wait_for(find, 10, f"log line {message!r} with {fields}")


def test_text_bytes_and_json_are_echoed_message_after_message(tmp_path: Path) -> None:
    with ready_server("websocket_echo", tmp_path) as (server, _):
        with ws(server, **{"X-Baseten-Request-Id": "ws-1"}) as client:
            assert client.response.status_code == 101
            assert client.response.headers["x-baseten-request-id"] == "ws-1"
            for word in ("hello", "world", "héllo ✓"):
                client.send(word)
                assert client.recv(timeout=10) == f"echo: {word}"
        with ws(server, "?mode=bytes") as client:
            for blob in (b"\x00\x01abc", bytes(range(256)) * 800):  # the second over 64 KiB
                client.send(blob)
                assert client.recv(timeout=10) == blob[::-1]
        with ws(server, "?mode=json") as client:
            for value in ({"a": [1, 2.5, None]}, "text", 7):
                client.send(json.dumps(value))
                assert json.loads(client.recv(timeout=10)) == {
                    "echo": value,
                    "path": "/v1/websocket",
                }
        logged(server, "websocket accepted", request_id="ws-1")
        logged(server, "websocket closed", request_id="ws-1", code=1000)


def test_the_client_closing_reaches_the_model_with_its_code(tmp_path: Path) -> None:
    with ready_server("websocket_echo", tmp_path) as (server, _):
        with ws(server, "?mode=json", **{"X-Baseten-Request-Id": "leaver"}) as client:
            client.send("1")
            client.recv(timeout=10)
            client.close(4002, "bye")
        logged(server, "client left", request_id="leaver", close_code=4002)
        logged(server, "websocket closed", request_id="leaver", code=4002)


def test_a_model_that_raises_closes_with_1011_and_logs_its_traceback(tmp_path: Path) -> None:
    with ready_server("websocket_echo", tmp_path) as (server, _):
        with ws(server, **{"X-Baseten-Request-Id": "boom-1"}) as client:
            client.send("raise")
            assert closed_by_server(client) == (1011, MODEL_ERROR)
        line = logged(server, MODEL_ERROR, request_id="boom-1")
        assert line["level"] == "ERROR"
        assert "raised on purpose in websocket()" in line["traceback"]
        assert "model.py" in line["traceback"]
        logged(server, "websocket closed", request_id="boom-1", code=1011)
        # The server is unharmed.
        with ws(server) as client:
            client.send("still here")
            assert client.recv(timeout=10) == "echo: still here"


def test_the_model_closes_with_its_own_code_or_returns(tmp_path: Path) -> None:
    with ready_server("websocket_echo", tmp_path) as (server, _):
        with ws(server) as client:
            client.send("close:4001:see you")
            assert closed_by_server(client) == (4001, "see you")
        with ws(server) as client:
            client.send("done")
            assert closed_by_server(client) == (1000, "")


def test_a_model_without_websocket_accepts_then_closes_with_1003(tmp_path: Path) -> None:
    with ready_server("basic", tmp_path) as (server, _), ws(server) as client:
        assert client.response.status_code == 101
        assert closed_by_server(client) == (1003, NOT_IMPLEMENTED)


def test_predict_on_a_websocket_model_and_plain_http_on_the_route(tmp_path: Path) -> None:
    with ready_server("websocket_echo", tmp_path) as (_, http):
        r = http.post(PREDICT, json={"x": 1})
        assert r.status_code == 404
        assert "/v1/websocket" in r.json()["error"]
        plain = http.get("/v1/websocket")
        assert plain.status_code == 404 and "WebSocket handshake" in plain.json()["error"]
        assert http.get("/v1/models/model").status_code == 200


def test_sessions_are_not_held_to_predict_concurrency(tmp_path: Path) -> None:
    # Truss calls `websocket` outside the predict semaphore: with predict_concurrency 1, a
    # second session is served while the first is open.
    with (
        ready_server("websocket_echo", tmp_path) as (server, _),
        ws(server) as first,
        ws(server) as second,
    ):
        second.send("b")
        assert second.recv(timeout=10) == "echo: b"
        first.send("a")
        assert first.recv(timeout=10) == "echo: a"


def test_a_model_still_loading_refuses_the_handshake(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    env = {"KINGPOST_TEST_LOAD_GATE": str(gate)}
    with run_server(FIXTURES / "websocket_echo", tmp_path, env=env) as server:
        with pytest.raises(InvalidStatus) as info:
            ws(server)
        assert info.value.response.status_code == 503
        assert b"not ready" in info.value.response.body
        gate.touch()

        def echoed() -> bool:
            try:
                with ws(server) as client:
                    client.send("up")
                    return client.recv(timeout=10) == "echo: up"
            except InvalidStatus:
                return False

        wait_for(echoed, 30, "the websocket once the model loaded")


def test_bad_handshakes_are_refused_with_the_rule_broken(tmp_path: Path) -> None:
    with ready_server("websocket_echo", tmp_path) as (server, _):
        raw = RawWebSocket(server.port)
        head = raw.open(handshake("/v1/websocket", version="8"))
        assert head.startswith(b"HTTP/1.1 426") and b"sec-websocket-version: 13" in head
        assert b"connection: close" in head
        raw.close()
        raw = RawWebSocket(server.port)
        assert raw.open(handshake("/v1/websocket", key="short")).startswith(b"HTTP/1.1 400")
        raw.close()


def test_frames_on_the_wire(tmp_path: Path) -> None:
    with ready_server("websocket_echo", tmp_path) as (server, _):
        raw = RawWebSocket(server.port)
        head = raw.open(handshake("/v1/websocket"))
        assert head.startswith(b"HTTP/1.1 101")
        assert f"sec-websocket-accept: {ACCEPT}".encode() in head
        # A fragmented text message with a ping between its parts, then a close.
        raw.send(frame(0x1, b"fra", fin=False) + frame(0x9, b"p1") + frame(0x0, b"gment"))
        assert raw.recv_frame() == (0xA, b"p1")
        assert raw.recv_frame() == (0x1, b"echo: fragment")
        raw.send(frame(0x8, close_payload(1000)))
        assert raw.recv_close() == (1000, "")
        assert raw.at_eof()
        raw.close()
        for bad, code in ((frame(0x1, b"x", mask=False), 1002), (frame(0x1, b"\xff"), 1007)):
            raw = RawWebSocket(server.port)
            raw.open(handshake("/v1/websocket"))
            raw.send(bad)
            assert raw.recv_close()[0] == code
            assert raw.at_eof()
            raw.close()
        # A whole message and a bad frame in one read: the connection fails with 1007 at
        # once, and the message before the bad frame still reaches the model ("raise" makes
        # it say so in the log).
        raw = RawWebSocket(server.port)
        raw.open(handshake("/v1/websocket", extra="X-Baseten-Request-Id: kept-1\r\n"))
        raw.send(frame(0x1, b"raise") + frame(0x1, b"\xfe"))
        assert raw.recv_close()[0] == 1007
        raw.close()
        line = logged(server, MODEL_ERROR, request_id="kept-1")
        assert "raised on purpose in websocket()" in line["traceback"]


def test_requests_before_an_upgrade_on_one_connection_are_answered_first(tmp_path: Path) -> None:
    with ready_server("websocket_echo", tmp_path) as (server, _):
        raw = RawWebSocket(server.port)
        head = raw.open(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n" + handshake("/v1/websocket"))
        assert head.startswith(b"HTTP/1.1 200")
        assert raw.buf.startswith(b"true")
        raw.buf = raw.buf[len(b"true") :]
        assert raw.head().startswith(b"HTTP/1.1 101")
        raw.send(frame(0x1, b"after"))
        assert raw.recv_frame() == (0x1, b"echo: after")
        raw.close()
        # An upgrade the server does not speak is answered as plain HTTP; as the client may
        # already be sending in the new protocol, the connection then closes.
        raw = RawWebSocket(server.port)
        head = raw.open(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        raw.buf = raw.buf[len(b"true") :]
        assert raw.at_eof()
        raw.close()


def test_unanswered_keepalive_pings_fail_the_connection(tmp_path: Path) -> None:
    project = tmp_path / "fast_pings"
    shutil.copytree(FIXTURES / "websocket_echo", project)
    config = project / "config.yaml"
    config.write_text(
        config.read_text() + "    ping_interval_seconds: 0.2\n    ping_timeout_seconds: 0.3\n"
    )
    with run_server(project, tmp_path) as server:
        wait_for(lambda: any(ln.get("message") == "model loaded" for ln in server.lines()))
        # A client that answers pings (the library does) stays connected past several.
        with ws(server) as client:
            pong_waiter = client.ping()
            assert pong_waiter.wait(10)
            for _ in range(3):
                client.send("x")
                assert client.recv(timeout=10) == "echo: x"
        raw = RawWebSocket(server.port)
        raw.open(handshake("/v1/websocket"))
        assert raw.recv_frame()[0] == 0x9  # pinged, and never answered
        assert raw.recv_close() == (1011, "keepalive ping timeout")
        raw.close()


def test_stopping_the_server_closes_sessions_with_1012(tmp_path: Path) -> None:
    with ready_server("websocket_echo", tmp_path) as (server, _), ws(server) as client:
        client.send("hi")
        client.recv(timeout=10)
        server.proc.send_signal(signal.SIGTERM)
        assert closed_by_server(client)[0] == 1012
        assert server.wait_exit() == 0
