"""``GET /v1/websocket``: a model's ``async def websocket(self, websocket)``, as Truss serves it.

What Truss's server does (``BasetenEndpoints.websocket`` in
truss/templates/server/truss_server.py), and so this one:

- a model that is not ready is refused before the handshake (here 503 with the readiness
  error; Truss's exception ends in uvicorn's bare 500);
- a model without ``websocket`` gets the connection accepted and closed at once with 1003
  and "WebSocket is not implemented on this deployment.";
- otherwise the connection is accepted *before* the model is called (it must not call
  ``accept()``), the model gets a ``starlette.websockets.WebSocket``, and when it returns
  the connection is closed with 1000 unless it closed it itself;
- a ``WebSocketDisconnect`` out of the model is the client leaving (logged at info);
  any other exception is logged with its traceback and closes with 1011 and
  "Internal Server Error (in model/chainlet).";
- ``predict_concurrency`` does not apply (the model is called outside the predict
  semaphore); messages are limited to 100 MiB (1009 above); the server pings every
  ``runtime.transport.ping_interval_seconds`` (20 s) and fails a connection whose pong
  does not come within ``ping_timeout_seconds`` (20 s) with 1011, as uvicorn does.

The ASGI side follows the spec (2.4): ``receive`` gives ``websocket.connect``, then
``websocket.receive`` messages, then ``websocket.disconnect`` with the close code (1006
when the connection dropped); ``send`` on a connection the client has closed raises an
``OSError`` (starlette turns it into ``WebSocketDisconnect(1006)``). When the server stops,
open sessions are closed with 1012 (service restart), as uvicorn does.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections import deque
from collections.abc import Callable, MutableMapping
from time import perf_counter
from typing import Any

from kingpost.server import codec, wsframes
from kingpost.server.compat import connection_scope
from kingpost.server.eager import on_task
from kingpost.server.http import Connection, HttpRequest, status_line
from kingpost.server.logs import log_event
from kingpost.server.model import MODEL_FAILURES, ModelHost, Status
from kingpost.server.wsframes import (
    ABNORMAL,
    INTERNAL_ERROR,
    NORMAL,
    SERVICE_RESTART,
    UNSUPPORTED_DATA,
    Close,
    Message,
    Ping,
    Pong,
    ProtocolError,
)

__all__ = ["PATH", "ClientDisconnected", "Session", "serve_websocket"]

log = logging.getLogger("kingpost.server")

PATH = "/v1/websocket"
MAX_MESSAGE = 100 * (1 << 20)
"""Truss's ``WS_MAX_MSG_SZ_BYTES``: uvicorn's ``ws_max_size`` in its server."""
CLOSE_TIMEOUT_S = 5.0
"""How long a close we sent waits for the client's before the connection is dropped."""
QUEUE_HIGH, QUEUE_LOW = 32, 8
"""Messages waiting for the model: reading pauses at the first, resumes at the second."""
NOT_IMPLEMENTED = "WebSocket is not implemented on this deployment."
NOT_READY = codec.error_body("Model with name model is not ready.")


class ClientDisconnected(OSError):
    """``send`` on a connection that is closed (the ASGI spec's server-specific OSError)."""


class Session:
    """One accepted-or-about-to-be WebSocket: frames both ways, and its ASGI channel."""

    def __init__(self, conn: Connection, req: HttpRequest, rid: str, ping: tuple[float, float]):
        self.conn = conn
        self.req = req
        self.rid = rid
        self._loop = asyncio.get_running_loop()
        self._parser = wsframes.FrameParser(MAX_MESSAGE)
        self._inbox: deque[dict[str, Any]] = deque()
        self._waiters: list[asyncio.Future[None]] = []
        self._connect_sent = False
        self.accepted = False
        self.close_sent = False
        """A close frame went out (the model's, an echo of the client's, or a failure's)."""
        self._app_close: int | None = None
        """The code the model closed with, once it did."""
        self.final: dict[str, Any] | None = None
        """The ``websocket.disconnect`` message, once the connection is over."""
        self.ended: asyncio.Future[None] = self._loop.create_future()
        self._paused = False
        self._ping_interval, self._ping_timeout = ping
        self._timer: asyncio.TimerHandle | None = None
        conn.closed.add_done_callback(lambda _: self._end(ABNORMAL, ""))

    # -- the ASGI channel --------------------------------------------------------------------
    def scope(self) -> dict[str, Any]:
        offered = self.req.headers.get("sec-websocket-protocol", "")
        return {
            **connection_scope(self.req, self.conn, "websocket", "2.4"),
            "subprotocols": [p.strip() for p in offered.split(",") if p.strip()],
            "state": {},
        }

    async def receive(self) -> dict[str, Any]:
        if not self._connect_sent:
            self._connect_sent = True
            return {"type": "websocket.connect"}
        while True:
            if self._inbox:
                message = self._inbox.popleft()
                if self._paused and len(self._inbox) <= QUEUE_LOW:
                    self._paused = False
                    if self.conn.transport is not None:
                        self.conn.transport.resume_reading()
                return message
            if self.final is not None:
                return self.final
            if self._app_close is not None:  # as uvicorn: no waiting for the client's echo
                return {"type": "websocket.disconnect", "code": self._app_close, "reason": ""}
            waiter = self._loop.create_future()
            self._waiters.append(waiter)
            await waiter

    async def send(self, message: MutableMapping[str, Any]) -> None:
        kind = message["type"]
        if not self.accepted:
            if kind == "websocket.accept":
                self.accept(message.get("subprotocol"), message.get("headers") or ())
                return
            if kind == "websocket.close":  # refused before the handshake, as uvicorn does
                self.conn.respond(403, [], b"")
                self._end(ABNORMAL, "")
                return
            raise RuntimeError(f"Expected ASGI message 'websocket.accept' or 'websocket.close', "
                               f"but got {kind!r}")  # fmt: skip
        if self._app_close is not None:
            raise RuntimeError(f"Unexpected ASGI message {kind!r} after 'websocket.close'")
        if self.close_sent or self.final is not None or self.conn.transport is None:
            raise ClientDisconnected(f"the WebSocket is closed ({self.final_code()})")
        if kind == "websocket.send":
            data = message.get("bytes")
            if data is None:
                data = message.get("text")
            if data is None:
                raise RuntimeError("'websocket.send' needs 'text' or 'bytes'")
            self._write(wsframes.data_frame(data if isinstance(data, str) else bytes(data)))
            if not await self.conn.drain():
                raise ClientDisconnected("the client closed the WebSocket")
        elif kind == "websocket.close":
            code = int(message.get("code") or NORMAL)
            if not wsframes.sendable_close_code(code):
                raise ValueError(f"{code} is not a close code a server may send")
            self._app_close = code
            self.close(code, str(message.get("reason") or ""))
        else:
            raise RuntimeError(f"Unexpected ASGI message {kind!r} on an open WebSocket")

    # -- the protocol ------------------------------------------------------------------------
    def accept(self, subprotocol: str | None = None, extra: Any = ()) -> None:
        """Answer the handshake with 101 and take the connection's bytes from here on."""
        key = self.req.headers.get("sec-websocket-key", "")
        parts = [
            status_line(101),
            b"upgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: ",
            wsframes.accept_key(key).encode("ascii"),
            b"\r\n",
        ]
        if subprotocol:
            parts += [b"sec-websocket-protocol: ", subprotocol.encode("latin-1"), b"\r\n"]
        for name, value in extra:
            parts += [bytes(name), b": ", bytes(value), b"\r\n"]
        parts += [b"x-baseten-request-id: ", self.rid.encode("latin-1"), b"\r\n\r\n"]
        self.accepted = True
        self.conn.started = True
        self._write(b"".join(parts))
        self.conn.take_raw(self.data)
        self._arm(self._ping_interval, self._ping)

    def data(self, data: bytes) -> None:
        """Bytes from the client after the handshake."""
        if self.final is not None:
            return
        error: ProtocolError | None = None
        try:
            events = self._parser.feed(data)
        except ProtocolError as exc:
            events, error = exc.events, exc  # what came before the bad frame still counts
        for event in events:
            if isinstance(event, Message):
                self._deliver(event.data)
            elif isinstance(event, Ping):
                if not self.close_sent:
                    self._write(wsframes.pong_frame(event.payload))
            elif isinstance(event, Pong):
                if self._timer is not None and not self.close_sent:
                    self._arm(self._ping_interval, self._ping)  # answered: next ping later
            elif isinstance(event, Close):
                if not self.close_sent:
                    self.close_sent = True
                    self._write(wsframes.close_frame(event.code))  # the echo RFC 6455 asks
                self._end(event.code, event.reason)
                return
        if error is not None:
            log.warning("closing the WebSocket: %s", error.reason)
            self._fail(error.code, error.reason)

    def _deliver(self, data: str | bytes) -> None:
        if self.close_sent:
            return  # after our close, data is read and dropped (RFC 6455 5.5.1)
        key = "text" if isinstance(data, str) else "bytes"
        self._inbox.append({"type": "websocket.receive", key: data})
        if len(self._inbox) >= QUEUE_HIGH and not self._paused and self.conn.transport:
            self._paused = True
            self.conn.transport.pause_reading()
        self._wake()

    def close(self, code: int, reason: str = "") -> None:
        """Start the closing handshake; the client's close (or a timeout) ends it."""
        if self.close_sent or self.final is not None:
            return
        self.close_sent = True
        self._write(wsframes.close_frame(code, reason))
        self._arm(CLOSE_TIMEOUT_S, lambda: self._end(ABNORMAL, ""))
        self._wake()

    def going_away(self) -> None:
        """The server is stopping: close with 1012 now, as uvicorn does on shutdown."""
        self._fail(SERVICE_RESTART, "")

    def _fail(self, code: int, reason: str) -> None:
        if not self.close_sent:
            self.close_sent = True
            self._write(wsframes.close_frame(code, reason))
        self._end(code, reason)

    def _ping(self) -> None:
        if self.final is None and not self.close_sent:
            self._write(wsframes.ping_frame(os.urandom(4)))
            self._arm(self._ping_timeout, self._ping_unanswered)

    def _ping_unanswered(self) -> None:
        self._fail(INTERNAL_ERROR, "keepalive ping timeout")

    def _arm(self, delay: float, then: Callable[[], None]) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_later(delay, then)

    def _write(self, data: bytes) -> None:
        transport = self.conn.transport
        if transport is not None:
            transport.write(data)

    def _end(self, code: int, reason: str) -> None:
        """The connection is over: tell the model, drop the TCP connection (the server closes
        first, RFC 6455 7.1.1), stop the timers."""
        if self.final is None:
            self.final = {"type": "websocket.disconnect", "code": code, "reason": reason}
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.conn.transport is not None:
            self.conn.transport.close()
        if not self.ended.done():
            self.ended.set_result(None)
        self._wake()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def final_code(self) -> int:
        return int(self.final["code"]) if self.final is not None else ABNORMAL


def _tokens(value: str) -> set[str]:
    return {t.strip().lower() for t in value.split(",")}


def _handshake_error(req: HttpRequest) -> tuple[int, str, list[tuple[bytes, bytes]]] | None:
    """Why ``req`` is not a WebSocket handshake RFC 6455 4.2.1 accepts, or ``None``."""
    headers = req.headers
    if "websocket" not in _tokens(headers.get("upgrade", "")) or "upgrade" not in _tokens(
        headers.get("connection", "")
    ):
        return (
            404,
            f"{PATH} takes a WebSocket handshake (`Connection: Upgrade`, `Upgrade: websocket`); "
            f"use a WebSocket client",
            [],
        )
    if headers.get("sec-websocket-version", "").strip() != "13":
        found = headers.get("sec-websocket-version")
        return 426, f"unsupported Sec-WebSocket-Version {found!r}; use 13", [
            (b"sec-websocket-version", b"13")
        ]  # fmt: skip
    if not wsframes.valid_key(headers.get("sec-websocket-key", "")):
        return 400, "missing or malformed Sec-WebSocket-Key (16 bytes in base64)", []
    return None


async def serve_websocket(
    req: HttpRequest,
    conn: Connection,
    rid: str,
    headers: list[tuple[bytes, bytes]],
    host: ModelHost,
    sessions: set[Session],
) -> int:
    """Answer ``GET /v1/websocket`` and run the session to its end; the status for metrics
    (101 once the protocol switched)."""
    refused = _handshake_error(req)
    if refused is not None:
        status, message, extra = refused
        if status != 404:
            conn.close_after_response()  # a refused handshake: what follows is not HTTP
        conn.respond(status, headers + extra + codec.CLIENT_ERROR, codec.error_body(message))
        return status
    if host.status is not Status.READY:
        conn.close_after_response()
        conn.respond(503, headers + codec.DOWNSTREAM_ERROR, NOT_READY)
        return 503
    ping = (host.config.ws_ping_interval, host.config.ws_ping_timeout)
    session = Session(conn, req, rid, ping)
    sessions.add(session)
    started = perf_counter()
    try:
        if host.websocket is None:
            log.error(NOT_IMPLEMENTED)
            session.accept()
            session.close(UNSUPPORTED_DATA, NOT_IMPLEMENTED)
        else:
            await _run_model(session, host)
        await session.ended
    finally:
        sessions.discard(session)
        session.close(NORMAL)
        log_event(log, logging.INFO, "websocket closed", code=session.final_code(),
                  duration_ms=round((perf_counter() - started) * 1000, 3))  # fmt: skip
    return 101


async def _run_model(session: Session, host: ModelHost) -> None:
    from starlette.websockets import WebSocket

    assert host.websocket is not None
    websocket = WebSocket(session.scope(), session.receive, session.send)
    await websocket.accept()
    log_event(log, logging.INFO, "websocket accepted", path=session.req.path)
    await on_task()
    try:
        await host.websocket.fn(websocket)
    except MODEL_FAILURES as exc:
        if _is_disconnect(exc):
            log.info("Client terminated websocket connection: `%s`.", exc)
        else:
            log.error(codec.MODEL_ERROR_MESSAGE, exc_info=exc)
            session.close(INTERNAL_ERROR, codec.MODEL_ERROR_MESSAGE)
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            session.going_away()
            raise
        log.error(codec.MODEL_ERROR_MESSAGE, exc_info=True)  # model code raised it
        session.close(INTERNAL_ERROR, codec.MODEL_ERROR_MESSAGE)
    session.close(NORMAL)  # a no-op when the model (or the client) closed already


def _is_disconnect(exc: BaseException) -> bool:
    module = sys.modules.get("starlette.websockets")
    return module is not None and isinstance(exc, module.WebSocketDisconnect)
