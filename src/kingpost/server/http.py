"""A small HTTP/1.1 server on asyncio and httptools.

One :class:`Connection` per TCP connection; requests on a connection are
answered in order (pipelining is queued); keep-alive by default. Responses are
written as one buffer, or chunked for streams with write-side flow control.
The handler is ``async def handler(request, connection)`` and must answer
through :meth:`Connection.respond` or the ``stream_*`` methods.

A request that asks to switch protocols (``Connection: Upgrade``) ends HTTP on its
connection: the bytes after it go to whoever :meth:`Connection.take_raw` (a WebSocket
session), and if nothing does, the connection closes once that request is answered.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, cast

import httptools

from kingpost.server import eager

__all__ = ["Connection", "Handler", "HttpRequest", "status_line"]

log = logging.getLogger("kingpost.server.http")

MAX_PIPELINED = 16
RAW_HOLD_LIMIT = 64 * 1024
"""Bytes after an upgrade request held until its handler takes them; reading pauses above."""

_STATUS_LINES: dict[int, bytes] = {
    s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode("latin-1") for s in HTTPStatus
}


_date_second = 0
_date_line = b""


def status_line(status: int) -> bytes:
    """The status line and the ``date`` header every response from an origin server with a
    clock carries (RFC 9110 6.6.1; uvicorn under Truss sends it too), made once a second."""
    global _date_second, _date_line
    line = _STATUS_LINES.get(status)
    if line is None:
        line = f"HTTP/1.1 {status} Unknown\r\n".encode("latin-1")
    now = int(time.time())
    if now != _date_second:
        _date_second, _date_line = now, b"date: %s\r\n" % formatdate(now, usegmt=True).encode()
    return line + _date_line


class HttpRequest:
    """A fully received request. ``headers`` keys are lower-case."""

    __slots__ = (
        "body",
        "headers",
        "http10",
        "keep_alive",
        "method",
        "path",
        "query",
        "raw_headers",
    )

    def __init__(
        self,
        method: str,
        url: bytes,
        raw_headers: list[tuple[bytes, bytes]],
        body: bytes,
        keep_alive: bool,
        http10: bool = False,
    ) -> None:
        self.method = method
        self.http10 = http10
        """An HTTP/1.0 client: no chunked encoding, a stream ends when the connection does."""
        path, _, self.query = url.partition(b"?")
        self.path = path.decode("latin-1")
        self.raw_headers = raw_headers
        self.headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in raw_headers}
        self.body = body
        self.keep_alive = keep_alive


class _Raw:
    """Stands in for the HTTP parser after an upgrade request: bytes go to the connection's
    raw sink, or are held until a handler takes them."""

    __slots__ = ("conn", "held")

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.held = bytearray()

    def feed_data(self, data: bytes) -> None:
        sink = self.conn._sink
        if sink is not None:
            sink(data)
            return
        self.held += data
        transport = self.conn.transport
        if len(self.held) > RAW_HOLD_LIMIT and transport is not None:
            transport.pause_reading()


def _whole(
    status: int,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    content_type: bytes,
    close: bool,
    head: bool,
) -> bytes:
    """A complete response with a Content-Length (the body left out for HEAD)."""
    parts = [status_line(status), b"content-type: ", content_type, b"\r\n"]
    for name, value in headers:
        parts += [name, b": ", value, b"\r\n"]
    if close:
        parts.append(b"connection: close\r\n")
    parts += [b"content-length: ", str(len(body)).encode(), b"\r\n\r\n"]
    if not head:
        parts.append(body)
    return b"".join(parts)


Handler = Callable[[HttpRequest, "Connection"], Awaitable[None]]


class Connection(asyncio.Protocol):
    """One client connection: parse, dispatch in order, write responses."""

    def __init__(self, handler: Handler, loop: asyncio.AbstractEventLoop) -> None:
        self._handler = handler
        self._loop = loop
        self._http = httptools.HttpRequestParser(self)
        self._parser: Any = self._http
        """What ``data_received`` feeds: the HTTP parser, or a :class:`_Raw` after an upgrade."""
        self._sink: Callable[[bytes], None] | None = None
        """Where bytes go after a protocol upgrade (see :meth:`take_raw`)."""
        self.transport: asyncio.Transport | None = None
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._pending: deque[HttpRequest] = deque()
        self._busy = False
        self._keep_alive = True
        self._head = False
        """The current request is HEAD: headers only."""
        self._http10 = False
        self._refusal: bytes | None = None
        """A 400 for bytes that could not be parsed, owed after the requests before them."""
        self._write_paused: asyncio.Future[None] | None = None
        self.closed: asyncio.Future[None] = loop.create_future()
        self.started = False
        """Whether the current request's response headers went out."""

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.closed.done():
            self.closed.set_result(None)
        if self._write_paused is not None and not self._write_paused.done():
            self._write_paused.set_result(None)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._switched(data[int(exc.args[0]) :])
        except httptools.HttpParserError:
            self._fail(400, b'{"error":"malformed HTTP request"}')

    # No ``eof_received``: the default closes the connection when the client stops sending,
    # and that is the signal that it left. The server's client is the gateway, which never
    # half-closes; when a user's request is dropped it closes the connection, and a stream
    # waiting on the model must let its slot go then, not at its next write. uvicorn, under
    # Truss's own server, treats end of input the same way.

    def pause_writing(self) -> None:
        if self._write_paused is None or self._write_paused.done():
            self._write_paused = self._loop.create_future()

    def resume_writing(self) -> None:
        if self._write_paused is not None and not self._write_paused.done():
            self._write_paused.set_result(None)

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._body = []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        self._headers.append((name, value))
        if name == b"expect" and value.lower() == b"100-continue":
            self._continue()

    def _continue(self) -> None:
        """Invite the body now; behind an unanswered request the 100 would come out of
        order, so there the client sends it after its own wait (about a second)."""
        if self.transport is not None and not self._busy and not self._pending:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        request = HttpRequest(
            self._http.get_method().decode("latin-1"),
            self._url,
            self._headers,
            body,
            self._http.should_keep_alive(),
            self._http.get_http_version() == "1.0",
        )
        if self._busy:
            self._pending.append(request)
            if len(self._pending) >= MAX_PIPELINED and self.transport is not None:
                self.transport.pause_reading()
        else:
            self._dispatch(request)

    # dispatch
    def _dispatch(self, request: HttpRequest) -> None:
        self._busy = True
        self.started = False
        self._keep_alive = request.keep_alive
        self._head = request.method == "HEAD"
        self._http10 = request.http10
        eager.start(self._run(request), self._loop)

    async def _run(self, request: HttpRequest) -> None:
        try:
            await self._handler(request, self)
        except Exception:
            log.exception("unhandled error in the model server")
            self._internal_error()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                self._busy = False  # the server is stopping this request: let it go
                raise
            # Raised by model code, not a cancellation of this request: answer it.
            log.exception("model code raised CancelledError")
            self._internal_error()
        if self.transport is None:
            self._busy = False
            return
        if not self._keep_alive:
            self._busy = False
            self.transport.close()
            return
        if self._pending:
            if len(self._pending) < MAX_PIPELINED:
                self.transport.resume_reading()
            if asyncio.current_task() is None:
                self._dispatch(self._pending.popleft())
            else:
                # Not from inside this request's Task: the next request gets a Task (and
                # timeouts, cancel scopes) of its own. ``_busy`` holds the order meanwhile.
                self._loop.call_soon(self._dispatch_next)
            return
        self._busy = False
        self._after_last()

    def _switched(self, rest: bytes) -> None:
        """The request just parsed asked to switch protocols: what follows is not HTTP.

        Its handler may take the bytes (:meth:`take_raw`); either way the connection closes
        after its answer. Only the model's WebSocket route takes them: any other route
        answers as if the client had not asked, as RFC 9110 lets a server do."""
        raw = _Raw(self)
        self._parser = raw
        if rest:
            raw.feed_data(rest)
        if self._pending:
            self._pending[-1].keep_alive = False
        elif self._busy:
            self._keep_alive = False
        elif self._sink is None and self.transport is not None:
            self.transport.close()  # answered already, and nothing took the stream

    def take_raw(self, sink: Callable[[bytes], None]) -> None:
        """Send every byte after the current (upgrade) request to ``sink``, starting with
        any already received."""
        self._sink = sink
        raw = self._parser
        if isinstance(raw, _Raw) and raw.held:
            held, raw.held = bytes(raw.held), bytearray()
            if self.transport is not None:
                self.transport.resume_reading()
            sink(held)

    def _dispatch_next(self) -> None:
        if self.transport is None or not self._pending:
            self._busy = False
            return
        self._dispatch(self._pending.popleft())

    def _after_last(self) -> None:
        """Nothing in flight or queued: send an owed refusal."""
        if self.transport is not None and self._refusal is not None:
            self.transport.write(self._refusal)
            self.transport.close()

    def _internal_error(self) -> None:
        if not self.started:
            self.respond(500, [], b'{"error":"Internal Server Error"}')
        else:
            self._keep_alive = False  # the response is broken off; only closing says so

    def _fail(self, status: int, body: bytes) -> None:
        if self.transport is None:
            return
        refusal = _whole(status, [], body, b"application/json", close=True, head=False)
        if self._busy or self._pending:
            # Requests parsed before the bad bytes are answered first, in order.
            self._refusal = refusal
            self.transport.pause_reading()
            return
        self.transport.write(refusal)
        self.transport.close()

    # writing
    def respond(
        self,
        status: int,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        content_type: bytes = b"application/json",
    ) -> None:
        """Write a whole response (headers and body) at once."""
        self.started = True
        if self.transport is None:
            return
        close = not self._keep_alive
        self.transport.write(_whole(status, headers, body, content_type, close, self._head))

    def stream_start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        """Start a chunked response; ``headers`` must include the content type.

        An HTTP/1.0 client cannot read chunks: it gets the bytes as they come and the end
        of the response is the end of the connection."""
        self.started = True
        if self.transport is None:
            return
        parts = [status_line(status)]
        for name, value in headers:
            parts += [name, b": ", value, b"\r\n"]
        if self._http10:
            self._keep_alive = False
        if not self._keep_alive:
            parts.append(b"connection: close\r\n")
        parts.append(b"\r\n" if self._http10 else b"transfer-encoding: chunked\r\n\r\n")
        self.transport.write(b"".join(parts))

    async def stream_write(self, data: bytes) -> bool:
        """Write one chunk; ``False`` once the client is gone."""
        if self.transport is None:
            return False
        if data and not self._head:
            self.transport.write(data if self._http10 else b"%x\r\n%b\r\n" % (len(data), data))
        paused = self._write_paused
        if paused is not None and not paused.done():
            await paused
        return self.transport is not None

    async def drain(self) -> bool:
        """Wait while the client is not reading our writes; ``False`` once it is gone."""
        paused = self._write_paused
        if paused is not None and not paused.done():
            await paused
        return self.transport is not None

    def stream_end(self) -> None:
        if self.transport is not None and not self._head and not self._http10:
            self.transport.write(b"0\r\n\r\n")

    def raw_write(self, start: bytes, body: bytes) -> None:
        """Write pre-built header bytes and body (used by pass-through responses)."""
        self.started = True
        if self.transport is not None:
            self.transport.write(start if self._head else start + body)

    def close_after_response(self) -> None:
        self._keep_alive = False

    @property
    def keep_alive(self) -> bool:
        return self._keep_alive

    def peer(self) -> Any:
        return None if self.transport is None else self.transport.get_extra_info("peername")

    def sockname(self) -> Any:
        return None if self.transport is None else self.transport.get_extra_info("sockname")
