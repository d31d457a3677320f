"""Starlette's ``Request`` and ``Response`` for model code that asks for them.

Imported only when a model method takes a request or returns a response; the
hot path never loads starlette.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from kingpost.server.http import Connection, HttpRequest, status_line
from kingpost.server.model import LOOP_STOPPERS

__all__ = [
    "connection_scope",
    "http_exception",
    "is_response",
    "is_streaming_response",
    "make_request",
    "send_response",
]


def connection_scope(
    req: HttpRequest, conn: Connection, kind: str, spec_version: str
) -> dict[str, Any]:
    """The ASGI scope keys an HTTP request and a WebSocket share (``kind``: "http" or
    "websocket"); each caller adds its own."""
    sockname, peer = conn.sockname(), conn.peer()
    return {
        "type": kind,
        "asgi": {"version": "3.0", "spec_version": spec_version},
        "http_version": "1.1",
        "scheme": "ws" if kind == "websocket" else "http",
        "path": req.path,
        "raw_path": req.path.encode("latin-1"),
        "query_string": req.query,
        "root_path": "",
        "headers": req.raw_headers,
        "server": tuple(sockname[:2]) if sockname else None,
        "client": tuple(peer[:2]) if peer else None,
    }


def make_request(req: HttpRequest, conn: Connection) -> Any:
    """A ``starlette.requests.Request`` over an already received request."""
    from starlette.requests import Request

    scope = connection_scope(req, conn, "http", "2.3")
    scope["method"] = req.method
    request = Request(scope, _receiver(req, conn))
    # The body is all here: ``body()``/``json()`` return it even after an
    # ``is_disconnected()`` check has taken the one body message from ``receive``.
    request._body = req.body
    return request


def _receiver(req: HttpRequest, conn: Connection) -> Any:
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": req.body, "more_body": False}
        # Shielded: ``is_disconnected()`` polls from inside a cancelled scope, and starlette
        # cancels a streamed response's listener when it ends; that cancellation must stay
        # with the waiter, not cancel the connection's future (which would read as the
        # client having left, and end this request's stream and every later one).
        await asyncio.shield(conn.closed)
        return {"type": "http.disconnect"}

    return receive


def is_response(obj: Any) -> bool:
    module = sys.modules.get("starlette.responses")
    return module is not None and isinstance(obj, module.Response)


def is_streaming_response(obj: Any) -> bool:
    module = sys.modules.get("starlette.responses")
    return module is not None and isinstance(obj, module.StreamingResponse)


def http_exception(exc: BaseException) -> tuple[int, Any] | None:
    """(status, detail) of a starlette/FastAPI ``HTTPException``, else ``None``."""
    module = sys.modules.get("starlette.exceptions")
    if module is not None and isinstance(exc, module.HTTPException):
        return int(exc.status_code), exc.detail
    return None


async def send_response(
    response: Any,
    req: HttpRequest,
    conn: Connection,
    extra_headers: list[tuple[bytes, bytes]],
) -> int:
    """Run a starlette response as an ASGI app onto ``conn``; returns its status."""
    state: dict[str, Any] = {"status": 200, "headers": [], "chunked": False, "started": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            state["status"] = int(message["status"])
            state["headers"] = [(bytes(k).lower(), bytes(v)) for k, v in message["headers"]]
            return
        if message["type"] != "http.response.body":
            return
        body: bytes = message.get("body", b"")
        more: bool = message.get("more_body", False)
        if not state["started"]:
            state["started"] = True
            _start(state, conn, extra_headers, body, more)
            if not state["chunked"]:
                return
        if state["chunked"]:
            await conn.stream_write(body)
            if not more:
                conn.stream_end()
        elif body and conn.transport is not None:
            conn.transport.write(body)

    request = make_request(req, conn)
    iterator = getattr(response, "body_iterator", None)
    if iterator is not None:
        response.body_iterator = _contained(iterator)
    await response(request.scope, request.receive, send)
    return int(state["status"])


async def _contained(iterator: Any) -> Any:
    """The body of a streamed response, with ``sys.exit()`` in it made a plain error.

    Starlette streams it in a task of its own, and ``SystemExit`` leaving an asyncio task
    stops the event loop: the whole replica, not the one response."""
    try:
        async for chunk in iterator:
            yield chunk
    except LOOP_STOPPERS as exc:
        raise RuntimeError(f"the response body raised {type(exc).__name__}") from exc


def _start(
    state: dict[str, Any],
    conn: Connection,
    extra: list[tuple[bytes, bytes]],
    body: bytes,
    more: bool,
) -> None:
    headers: list[tuple[bytes, bytes]] = state["headers"] + extra
    if state["status"] >= 300:
        headers += [(b"x-baseten-error-source", b"04"), (b"x-baseten-error-code", b"700")]
    has_length = any(k == b"content-length" for k, _ in headers)
    if more and not has_length:
        # A stream: its first part is written by the caller, as every later one, by
        # ``stream_write`` (no chunk framing for an HTTP/1.0 client, no body for HEAD).
        state["chunked"] = True
        conn.stream_start(state["status"], headers)
        return
    if not has_length:
        headers.append((b"content-length", str(len(body)).encode()))
    if not conn.keep_alive:
        headers.append((b"connection", b"close"))
    start = status_line(state["status"]) + b"".join(k + b": " + v + b"\r\n" for k, v in headers)
    conn.raw_write(start + b"\r\n", body)
