"""The client side: parse requests with httptools, route, admit, stream to a replica.

One :class:`ClientConn` per client connection. Requests on a connection are
handled in order by one task (pipelining is answered in order); bodies stream
both ways with flow control; responses are re-framed (Content-Length kept,
otherwise chunked) and carry ``X-Baseten-Request-Id``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httptools

from kingpost.gateway.dispatch import Dispatcher, Rejected, Slot
from kingpost.gateway.routing import Miss, Target
from kingpost.gateway.upstream import HOP_BY_HOP, StreamConn, UpstreamConn

if TYPE_CHECKING:
    from kingpost.gateway.server import Gateway

__all__ = ["ClientConn"]

access_log = logging.getLogger("kingpost.gateway.access")
REPLAY_LIMIT = 64 * 1024
BODY_HIGH_WATER = 1024 * 1024
BUFFER_LIMIT = BODY_HIGH_WATER
"""A body up to this is read whole before its request takes a replica slot, and a larger
one (or a chunked one) until this much is in: a client that trickles its body in holds only
its own connection, until the body timeout ends it, not a slot others wait for."""
HEAD_LIMIT = 64 * 1024
"""Bytes a request head may take beyond the read it starts in (431 past it): httptools
has no limit and keeps a header's value growing for as long as the client sends it."""
_NO_BODY_STATUS = frozenset({204, 304})
_NOT_FORWARDED = HOP_BY_HOP | {
    b"authorization",
    b"proxy-authorization",
    b"content-length",
    b"expect",
    b"x-forwarded-for",  # sent again with the client's address appended
}
_BODY_UNEXPECTED = frozenset({b"GET", b"HEAD", b"DELETE", b"OPTIONS", b"TRACE"})
"""Methods whose bodies have no defined meaning (RFC 9110 9.3): many servers never read
one, and parse it as the next request. Forwarded, but the connection is not reused."""
_CONNECTION_OPTIONS = frozenset({b"close", b"keep-alive", b"upgrade"})
_CONNECTION_KEPT = _CONNECTION_OPTIONS | {b"host", b""}
"""``Connection`` tokens that name no header to drop (Host: the gateway must send one)."""


def _connection_tokens(value: bytes) -> set[bytes] | None:
    """The lowercased tokens of a ``Connection`` header, or None when it is a lone close,
    keep-alive or upgrade (the usual case: it names no other header, and no set is made)."""
    lowered = value.lower()
    if lowered in _CONNECTION_OPTIONS:
        return None
    return {t.strip() for t in lowered.split(b",")}


class _Sent:
    """The request is with a replica; its answer is relayed from callbacks."""


_SENT = _Sent()


class _Request:
    __slots__ = (
        "auth",
        "body_bytes",
        "body_sent",
        "chunked",
        "chunks",
        "complete",
        "content_length",
        "expect_continue",
        "forwarded_for",
        "head_bytes",
        "headers",
        "hop",
        "host",
        "http11",
        "keep_alive",
        "method",
        "refuse",
        "replay",
        "request_id",
        "rid",
        "small",
        "start",
        "tunnel_buf",
        "upgrade",
        "url",
        "waiter",
    )

    def __init__(self) -> None:
        self.url = b""
        self.method = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: deque[bytes] = deque()
        self.waiter: asyncio.Future[None] | None = None
        """Set while the forwarding side waits for more of the body."""
        self.complete = False
        self.keep_alive = True
        self.http11 = True
        self.content_length: bytes | None = None
        self.chunked = False
        self.expect_continue = False
        self.body_bytes = 0
        self.body_sent = False
        """Some of the body went to a replica: without the replay buffer, a retry lacks it."""
        self.replay: list[bytes] | None = []
        self.auth: bytes | None = None
        self.hop: frozenset[bytes] | None = None
        """Headers not to forward when ``Connection`` names more than the usual options."""
        self.host: bytes | None = None
        self.refuse: str | None = None
        """Why the head, well-formed for the parser, is still a bad request (400)."""
        self.request_id: bytes | None = None
        self.forwarded_for: bytes | None = None
        """The client's ``X-Forwarded-For`` values, joined; the client's address follows."""
        self.rid: str | None = None
        """The id the gateway uses: the client's ``X-Baseten-Request-Id`` or a new one."""
        self.start = 0.0
        self.small = False
        """The body has a length up to :data:`BUFFER_LIMIT`: wait for all of it, then take a
        slot and send it."""
        self.upgrade = False
        self.tunnel_buf = bytearray()
        self.head_bytes = -1
        """Bytes read for the head after the read it began in (-1 until that read ends)."""

    def wake(self) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None


def _error_body(
    status: int, message: str, code: str, request_id: str, close: bool = False
) -> bytes:
    body = json.dumps({"error": message, "code": code}).encode()
    reason = {
        400: "Bad Request",
        401: "Unauthorized",
        404: "Not Found",
        408: "Request Timeout",
        429: "Too Many Requests",
        431: "Request Header Fields Too Large",
        501: "Not Implemented",
        502: "Bad Gateway",
        503: "Service Unavailable",
        504: "Gateway Timeout",
    }.get(status, "Error")
    connection = "connection: close\r\n" if close else ""
    return (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nx-baseten-request-id: {request_id}\r\n"
        f"{connection}\r\n"
    ).encode() + body


class ClientConn(StreamConn):
    def __init__(self, gateway: Gateway) -> None:
        super().__init__()
        self.gw = gateway
        self.parser = httptools.HttpRequestParser(self)
        self.pending: deque[_Request] = deque()
        self.current: _Request | None = None
        self.task: asyncio.Task[None] | None = None
        self.busy = False
        """A request is being answered (from callbacks or by ``task``); the rest queue."""
        self.eof = False
        self.upstream: UpstreamConn | None = None
        self.handoff: _Handoff | None = None
        """What the task was started with, so a slot it never took over can be released."""
        self.tunnel: _Request | None = None
        """An upgrade request whose raw bytes are buffered until the replica answers."""
        self._paused_reading = False
        self.refusal: tuple[bytes, str, int, str, float] | None = None
        """An error answer owed after the answers before it: its bytes, and its request id,
        status, code and when it was decided, for its access line."""
        self._waiting: tuple[_Request | None, float] | None = None
        """What :meth:`close_if_stalled` last saw the connection wait for, and since when."""
        self.peer: bytes | None = None
        """The client's address, for ``X-Forwarded-For`` (looked up at the first request)."""
        self.body_wait: _Request | None = None
        """A request whose body is read whole (in the task) before it takes a slot."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.gw.clients.add(self)

    def close_if_stalled(self, now: float) -> None:
        """Close a connection that holds no request and has not sent a whole request head in
        ``head_timeout_s`` (a slowloris), or, after answered requests, none in
        ``idle_timeout_s``; end a request whose body comes slower than the gateway's body
        timeout and minimum rate allow, or whose replica has not begun its answer within
        the deployment's ``response_timeout_s``. Called by the gateway's periodic sweep
        (``now``: :func:`time.perf_counter`), not per request."""
        req, gw = self.current, self.gw
        # A body on its way, unless the gateway paused reading it (for the replica's sake).
        reading = req is not None and req.method and not req.complete
        if reading and not (self._paused_reading or self.closed):
            assert req is not None
            if now - req.start > gw.body_timeout_s + req.body_bytes / gw.body_min_rate:
                self._body_too_slow(req)
                return
        upstream = self.upstream
        if upstream is not None and isinstance(exchange := upstream.exchange, _Exchange):
            exchange.check_timeout(now)
        if self.busy or self.pending or self.closed or self.tunnel is not None or self.raw_sink:
            self._waiting = None
            return
        # req: None: nothing sent yet; complete: idle; else a head under way
        if self._waiting is None or self._waiting[0] is not req:
            self._waiting = (req, now)
            return
        limit = gw.idle_timeout_s if req is not None and req.complete else gw.head_timeout_s
        if now - self._waiting[1] >= limit and self.transport is not None:
            self.transport.close()

    def _body_too_slow(self, req: _Request) -> None:
        gw = self.gw
        message = (
            f"the request body came too slowly: {req.body_bytes} bytes in "
            f"{gw.body_timeout_s:.0f}s plus 1s per {gw.body_min_rate} bytes"
        )
        access_log.warning("%s (request %s)", message, req.rid or "not routed yet")
        if req in self.pending:  # not dispatched: refused after the answers owed before it
            self._fail_and_close(408, message, "request_timeout")
            return
        transport = self.transport
        if transport is None:
            return
        if self.body_wait is req:  # read before it takes a slot: nothing was sent for it
            rid = req.rid or gw.new_request_id()
            transport.write(_error_body(408, message, "request_timeout", rid, close=True))
            gw.log_access(rid, 408, "request_timeout", req.start, None)
        transport.close()  # its head is with a replica, or answered: only closing ends it

    # -- asyncio.Protocol ----------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self.forward_raw(data):
            return
        if self.tunnel is not None:
            self._hold_for_tunnel(data)
            return
        try:
            self.parser.feed_data(data)
            req = self.current
            if req is not None and not req.method:  # its head is still incomplete
                # The read a head begins in may hold earlier requests too: count from the next.
                req.head_bytes += len(data) if req.head_bytes >= 0 else 1
                if req.head_bytes > HEAD_LIMIT:
                    self._fail_and_close(431, "request line and headers are too large")
        except httptools.HttpParserUpgrade as exc:
            # WebSocket and other upgrades: the rest of the stream is raw bytes.
            req = self.pending[-1] if self.pending else self.current
            if req is None:
                self._fail_and_close(400, "upgrade without a request")
                return
            req.upgrade = True
            self.tunnel = req
            if req.chunked:  # httptools stops at the head: nothing here reads chunk framing
                req.refuse = "an Upgrade request's body must have a Content-Length"
            elif req.content_length not in (None, b"0"):
                req.complete = False  # its body comes first (see :meth:`_hold_for_tunnel`)
            self._hold_for_tunnel(data[int(exc.args[0]) :])
        except httptools.HttpParserError as exc:
            # Requests parsed before the bad bytes are still answered, then this error.
            self._fail_and_close(400, f"malformed HTTP request: {exc}")
        if self.pending and not self.busy:
            self._serve_next()

    def _hold_for_tunnel(self, data: bytes) -> None:
        """Keep what the client sent after its handshake until the tunnel opens; past
        :data:`REPLAY_LIMIT` stop reading (the client is sending before any 101)."""
        req = self.tunnel
        assert req is not None
        if not req.complete and data:
            # The body the upgrade request declared is part of it, sent with it whatever the
            # replica answers; tunnel bytes are only those after it.
            assert req.content_length is not None and self.current is req
            owed = int(req.content_length) - req.body_bytes
            self.on_body(data[:owed])
            if len(data) < owed:
                return
            self.on_message_complete()
            data = data[owed:]
        buf = req.tunnel_buf
        buf += data
        if len(buf) > REPLAY_LIMIT and not self._paused_reading and self.transport is not None:
            self._paused_reading = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        if self.tunnel is not None:
            # A handshake still waiting for its replica: WebSocket clients do not half-close,
            # so this one left. Closing cancels the wait, and no slot goes to an empty tunnel.
            return False
        if self.raw_sink is not None:
            # A live tunnel passes the half-close on; the replica decides when to end.
            upstream = self.upstream
            transport = upstream.transport if upstream is not None else None
            if transport is not None and transport.can_write_eof():
                transport.write_eof()
                return True
            return False
        # Half-closed client: answer what it asked, then close.
        self.eof = True
        if not self._drop_unfinished():
            return False
        if not self.busy and not self.pending:
            if self.transport is not None:
                self.transport.close()
            return False
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.mark_lost()
        self.gw.clients.discard(self)
        if self.task is not None and not self.task.done():
            self.task.cancel()
        handoff, self.handoff = self.handoff, None
        if handoff is not None and handoff.slot is not None:
            # The task was cancelled before it took the slot over: give it back here.
            handoff.dispatcher.release(handoff.slot)
            handoff.slot = None
        if self.current is not None:
            self.current.wake()
        if self.upstream is not None:
            self.upstream.close()  # its loss settles the exchange and frees the replica slot

    def _drop_unfinished(self) -> bool:
        """Forget a request that will never be complete (the client stopped sending or sent
        garbage). False when it is already on its way to a replica: only closing ends it."""
        req = self.current
        if req is None or req.complete:
            return True
        if req in self.pending:
            self.pending.remove(req)
        elif req.method:
            return False  # its head finished and it is not queued: it is being forwarded
        self.current = None
        return True

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.resume_reading()

    def _fail_and_close(self, status: int, message: str, code: str = "invalid_request") -> None:
        rid = self.gw.new_request_id()
        body = _error_body(status, message, code, rid, close=True)
        if self._drop_unfinished() and (self.busy or self.pending):
            # Earlier requests are still owed their answers, in order: read no more, answer
            # them, then send this error and close (see :meth:`_after`).
            self.refusal = (body, rid, status, code, time.perf_counter())
            self.eof = True
            if self.transport is not None:
                self.transport.pause_reading()
            return
        if self.transport is not None and not self.closed:
            self.transport.write(body)
            self.transport.close()
            self.gw.log_access(rid, status, code, time.perf_counter(), None)
        self.closed = True

    # -- httptools callbacks ----------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.current = _Request()

    def on_url(self, url: bytes) -> None:
        assert self.current is not None
        self.current.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self.current
        assert req is not None
        if not req.method:  # after the head, httptools reports a chunked body's trailer
            req.headers.append((name, value))  # fields here: they are dropped, not kept

    def on_headers_complete(self) -> None:
        req = self.current
        assert req is not None
        req.start = time.perf_counter()
        req.method = self.parser.get_method()
        req.keep_alive = self.parser.should_keep_alive()
        req.http11 = self.parser.get_http_version() == "1.1"
        for name, value in req.headers:
            lname = name.lower()
            if lname == b"content-length":
                req.content_length = value
                req.small = value.isdigit() and int(value) <= BUFFER_LIMIT
            elif lname == b"transfer-encoding" and b"chunked" in value.lower():
                req.chunked = True
            elif lname == b"authorization":
                req.auth = value
            elif lname == b"host":
                if req.host is not None:  # routed by one, read by the replica as the other
                    req.refuse = "more than one Host header"
                req.host = value
            elif lname == b"x-baseten-request-id":
                req.request_id = value
            elif lname == b"x-forwarded-for":
                ff = req.forwarded_for
                req.forwarded_for = value if ff is None else ff + b", " + value
            elif lname == b"expect" and value.lower() == b"100-continue":
                req.expect_continue = True
            elif lname == b"connection" and (tokens := _connection_tokens(value)) is not None:
                # Headers it names are for this hop only (RFC 9110 7.6.1): not forwarded.
                listed = tokens - _CONNECTION_KEPT
                if listed:
                    req.hop = (req.hop or _NOT_FORWARDED) | listed
        if req.host is None and req.http11:
            req.refuse = "an HTTP/1.1 request needs a Host header"
        self.pending.append(req)

    def on_body(self, body: bytes) -> None:
        req = self.current
        assert req is not None
        req.chunks.append(body)
        req.body_bytes += len(body)
        if req.replay is not None:
            if req.body_bytes <= REPLAY_LIMIT:
                req.replay.append(body)
            else:
                req.replay = None
        req.wake()
        if req.body_bytes > BODY_HIGH_WATER and not self._paused_reading and self.transport:
            self._paused_reading = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        req = self.current
        assert req is not None
        req.complete = True
        req.wake()

    # -- serving ---------------------------------------------------------------------------------
    def _serve_next(self) -> None:
        """Answer queued requests in order: right here while none has to wait, else in a task.

        The common request (small body already in, a free replica slot, an idle pooled
        connection) is written to the replica from this callback, and its answer is
        relayed from the replica's callbacks: no Task and no future per request. Anything
        that must wait (a body still arriving, a queue, a new connection, a retry) goes to
        :meth:`_serve`, which handles it and every request behind it.
        """
        while not self.busy and self.pending and not self.closed:
            req = self.pending[0]
            if req.chunked or req.upgrade or req.expect_continue or not (req.complete or req.small):
                self._start_task()
                return
            if not req.complete:
                return  # the rest of a small body is on its way; its arrival calls again
            self.pending.popleft()
            keep = self._try_now(req)
            if isinstance(keep, _Sent):
                return
            if isinstance(keep, _Handoff):
                self._start_task(keep)
                return
            if not self._after(req, keep):
                return

    def _start_task(self, handoff: _Handoff | None = None) -> None:
        self.busy = True
        self.handoff = handoff
        self.task = asyncio.ensure_future(self._serve(handoff))

    def _after(self, req: _Request, keep: bool) -> bool:
        """Close the connection when the answered request says so; True to carry on."""
        if not keep or not req.keep_alive or (self.eof and not self.pending):
            if self.transport is not None:
                if self.refusal is not None and keep and req.keep_alive:
                    body, rid, status, code, start = self.refusal
                    self.transport.write(body)  # after every answer owed before it
                    self.gw.log_access(rid, status, code, start, None)
                self.transport.close()
            self.closed = True
            return False
        if self._paused_reading and self.transport is not None:
            # Reading stopped for a large body that has now gone upstream in full.
            self._paused_reading = False
            self.transport.resume_reading()
        return True

    async def _serve(self, handoff: _Handoff | None = None) -> None:
        try:
            # First a request the callbacks started but could not finish, if any.
            if handoff is not None and not self._after(handoff.req, await self._dispatch(handoff)):
                return
            while self.pending and not self.closed:
                req = self.pending.popleft()
                if not self._after(req, await self._handle(req)):
                    return
        finally:
            self.busy = False

    async def next_chunk(self, req: _Request) -> bytes | None:
        while not req.chunks:
            if req.complete or self.closed:
                return None
            if self._paused_reading and self.transport is not None:
                self._paused_reading = False
                self.transport.resume_reading()
            req.waiter = asyncio.get_running_loop().create_future()
            await req.waiter
        return req.chunks.popleft()

    def _route(self, req: _Request) -> Target | bool:
        """Where ``req`` goes; or the error is written and whether the connection stays."""
        gw = self.gw
        if req.rid is None:
            req.rid = req.request_id.decode("latin-1") if req.request_id else gw.new_request_id()
        rid = req.rid
        if req.refuse is not None:  # RFC 9112 3.2
            return self._reject(req, 400, req.refuse, "invalid_request", rid)
        if gw.table.version == 0:  # the control plane has not pushed a table yet
            return self._reject(
                req,
                503,
                "the gateway is starting and has no routing table yet; retry shortly",
                "starting",
                rid,
            )
        scope = gw.authorized(req.auth)
        if scope is None:
            return self._reject(
                req,
                401,
                "missing or unknown API key: send `Authorization: Api-Key <key>`",
                "unauthorized",
                rid,
            )
        target = gw.route(req.host or b"", req.url)
        if not scope.allows(target.model_id):  # an invoke-only key, for another model
            what = f"model {target.model_id}" if target.model_id else "this route"
            return self._reject(
                req,
                403,
                f"this API key is invoke-only and may not call {what}; it may call "
                f"model(s) {', '.join(sorted(scope.models or ()))}",
                "forbidden",
                rid,
            )
        if isinstance(target, Miss):
            if req.upgrade and target.upgrade is not None:
                return target.upgrade  # a WebSocket route: only handshakes get through
            return self._reject(req, target.status, target.message, target.code, rid)
        return target

    def _try_now(self, req: _Request) -> bool | _Handoff | _Sent:
        """Answer or send a complete request without waiting, if nothing has to wait."""
        target = self._route(req)
        if not isinstance(target, Target):
            return target
        assert req.rid is not None
        dispatcher = self.gw.dispatcher(target.deployment.deployment_id)
        try:
            slot = dispatcher.try_acquire()
        except Rejected as rej:
            return self._reject(req, rej.status, rej.message, rej.code, req.rid, target)
        if slot is None:
            return _Handoff(req, target, dispatcher)  # to wait in the deployment's queue
        conn = self.gw.pool.take_idle(slot.key)
        if conn is None:
            return _Handoff(req, target, dispatcher, slot=slot)  # to open a connection
        exchange = _Exchange(self, req, req.rid, target.deployment.response_timeout_s)
        exchange.landing = (dispatcher, slot, conn, target)
        self.busy = True
        self.upstream = conn
        conn.begin(exchange)
        conn.write(self._request_head(req, target.path, req.rid) + b"".join(req.chunks))
        req.chunks.clear()
        return _SENT

    def _landed(self, exchange: _Exchange, result: str) -> None:
        """The end of a request :meth:`_try_now` sent: settle it and serve the next one."""
        assert exchange.landing is not None
        dispatcher, slot, conn, target = exchange.landing
        req = exchange.req
        self.upstream = None
        dispatcher.release(slot)
        if self.closed:  # the client left; nobody to answer or retry for
            conn.close()
            self.busy = False
            assert req.rid is not None
            self.gw.log_access(req.rid, exchange.status, "client_left", req.start, target)
            return
        outcome = self._settle(req, conn, exchange, True, result)
        if outcome == "retry":
            self._start_task(
                _Handoff(req, target, dispatcher, frozenset({slot.upstream.replica_id}), 1)
            )
            return
        assert req.rid is not None
        self.gw.log_access(req.rid, exchange.status or 502, outcome, req.start, target)
        self.busy = False
        if self._after(req, outcome != "close"):
            self._serve_next()

    async def _handle(self, req: _Request) -> bool:
        """Answer one request; False when the connection must close."""
        target = self._route(req)
        if not isinstance(target, Target):
            return target
        if req.expect_continue:
            assert self.transport is not None
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if not req.upgrade and not req.complete and req.body_bytes < BUFFER_LIMIT:
            # Read the body (or its first BUFFER_LIMIT bytes) before taking a slot.
            self.body_wait = req
            try:
                while not req.complete and req.body_bytes < BUFFER_LIMIT and not self.closed:
                    req.waiter = asyncio.get_running_loop().create_future()
                    await req.waiter
            finally:
                self.body_wait = None
            if self.closed:
                return False
        dispatcher = self.gw.dispatcher(target.deployment.deployment_id)
        return await self._dispatch(_Handoff(req, target, dispatcher))

    async def _dispatch(self, h: _Handoff) -> bool:
        """Take a replica slot, forward, and retry once elsewhere if the replica hung up."""
        gw, req, target, tried, dispatcher = self.gw, h.req, h.target, h.tried, h.dispatcher
        slot, h.slot = h.slot, None  # from here the slot is released by the finally below
        rid = req.rid
        assert rid is not None
        for _attempt in range(h.attempts):
            try:
                if slot is None:
                    try:
                        slot = await dispatcher.acquire(tried)
                    except Rejected as rej:
                        return self._reject(req, rej.status, rej.message, rej.code, rid, target)
                try:
                    outcome, status = await self._forward(
                        req, slot, target.path, rid, target.deployment.response_timeout_s
                    )
                finally:
                    dispatcher.release(slot)
            except asyncio.CancelledError:  # the client left, queued or mid-answer
                gw.log_access(rid, 0, "client_left", req.start, target)
                raise
            if outcome != "retry":
                gw.log_access(rid, status, outcome, req.start, target)
                if outcome == "ok" and not req.complete:
                    # Answered before the body was all in, by a replica that then hung up: the
                    # rest is read and dropped, or it piles up until reading stops for good.
                    while await self.next_chunk(req) is not None:
                        pass
                return outcome != "close"
            tried, slot = tried | {slot.upstream.replica_id}, None
        return self._reject(
            req,
            502,
            "the replica closed the connection before answering",
            "bad_gateway",
            rid,
            target,
        )

    def _reject(
        self,
        req: _Request,
        status: int,
        message: str,
        code: str,
        rid: str,
        target: Target | None = None,
    ) -> bool:
        assert self.transport is not None
        self.gw.log_access(rid, status, code, req.start, target)
        if req.upgrade:
            # After an upgrade request the client's stream is no longer HTTP (it may already
            # be sending frames): the refusal ends the connection.
            self.transport.write(_error_body(status, message, code, rid, close=True))
            return False
        self.transport.write(_error_body(status, message, code, rid))
        # The body, if any, was not read: the connection cannot be reused unless it's complete.
        return req.complete or (req.content_length in (None, b"0") and not req.chunked)

    async def _forward(
        self, req: _Request, slot: Slot, path: str, rid: str, timeout_s: float
    ) -> tuple[str, int]:
        """Proxy one request; returns "ok", "close" (client conn must close) or "retry", and
        the status the client got (0: none)."""
        gw = self.gw
        if self.closed:
            return "close", 0  # the client left while the request waited: nobody to answer
        try:
            if req.upgrade:
                conn, reused = await gw.pool.connect(slot.key), False
            else:
                conn, reused = await gw.pool.get(slot.key)
        except (OSError, TimeoutError):
            return "retry", 0
        exchange = _Exchange(self, req, rid, timeout_s)
        exchange.done = done = asyncio.get_running_loop().create_future()
        conn.begin(exchange)
        self.upstream = conn
        try:
            head = self._request_head(req, path, rid)
            if req.complete and not req.chunked:
                # The whole body is here already (the common small request): one write.
                req.body_sent = req.body_sent or bool(req.chunks)
                conn.write(head + b"".join(req.chunks))
                req.chunks.clear()
            else:
                exchange.sending = True
                conn.write(head)
                await self._send_body(req, conn)
                # Answered before it had the whole body: whether the replica read the rest as
                # body or as another request, its connection cannot be trusted again.
                exchange.early = exchange.finished
                exchange.sending = False
                exchange.sent_at = time.perf_counter()  # its answer is due from here
            result = await done
            if conn.upgraded and exchange.status == 101:
                await self._tunnel(req, conn)
                return "close", 101
        except asyncio.CancelledError:
            conn.close()
            raise
        finally:
            self.upstream = None
        if req.upgrade:
            if result == "lost" and self._settle(req, conn, exchange, False, result) == "retry":
                return "retry", 0  # the replica took nothing: another may take the handshake
            if result == "timeout":
                self._settle(req, conn, exchange, False, result)
            conn.close()
            # Refused or lost: after an upgrade request the stream is raw.
            return "close", exchange.status or 502
        return self._settle(req, conn, exchange, reused, result), exchange.status or 502

    def _settle(
        self, req: _Request, conn: UpstreamConn, exchange: _Exchange, reused: bool, result: str
    ) -> str:
        """After the replica's answer (or its loss): "ok", "close" or "retry"."""
        if result == "timeout":
            conn.close()
            assert self.transport is not None
            keep = req.complete and not req.upgrade
            self.transport.write(
                _error_body(
                    504,
                    f"the replica did not begin its answer within {exchange.timeout_s:g}s "
                    "(the deployment's response timeout)",
                    "gateway_timeout",
                    exchange.rid.decode("latin-1"),
                    close=not keep,
                )
            )
            return "ok" if keep else "close"
        if result == "lost":
            conn.close()
            # Retried only if the replica sent nothing at all: even part of a response head
            # means it took the request, and running it twice is not the gateway's call. Nor
            # is a body the replay buffer no longer holds sent again with a part missing.
            if not conn.got_bytes and (
                req.replay is not None or (not reused and not req.body_sent)
            ):
                if req.replay is not None:
                    req.chunks = deque(req.replay)
                    req.replay = list(req.replay)
                return "retry"
            if not exchange.started:
                assert self.transport is not None
                self.transport.write(
                    _error_body(
                        502,
                        "the replica closed the connection",
                        "bad_gateway",
                        exchange.rid.decode("latin-1"),
                        close=True,  # this connection ends here
                    )
                )
            return "close"
        if (
            exchange.upstream_keep_alive
            and req.complete
            and not exchange.early
            and not (req.body_bytes and req.method in _BODY_UNEXPECTED)
        ):
            self.gw.pool.put(conn)
        else:
            conn.close()
        return "close" if exchange.must_close else "ok"

    async def _tunnel(self, req: _Request, conn: UpstreamConn) -> None:
        """Pipe raw bytes both ways until either side closes (WebSocket after 101)."""
        client = self.transport
        assert client is not None and conn.transport is not None
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def finish() -> None:
            if not done.done():
                done.set_result(None)

        conn.on_close = self.on_close = finish
        conn.raw_sink = client.write
        conn.feeder = client  # the replica's full buffer pauses reading from the client
        if conn.leftover:
            client.write(conn.leftover)
        self.raw_sink = conn.write
        self.tunnel = None
        if req.tunnel_buf:
            conn.write(bytes(req.tunnel_buf))
        if self._paused_reading:
            self._paused_reading = False
            client.resume_reading()
        if client.is_closing() or conn.transport.is_closing():
            finish()
        try:
            await done
        finally:
            conn.close()
            client.close()

    def _peer(self) -> bytes:
        """The client's address as ``X-Forwarded-For`` gives it (b"" when unknown)."""
        peer = self.peer
        if peer is None:
            info = self.transport.get_extra_info("peername") if self.transport else None
            host = info[0] if isinstance(info, tuple) and info else None
            peer = self.peer = host.encode("latin-1") if isinstance(host, str) else b""
        return peer

    def _request_head(self, req: _Request, path: str, rid: str) -> bytes:
        lines = [req.method + b" " + path.encode("latin-1") + b" HTTP/1.1\r\n"]
        drop = _NOT_FORWARDED if req.hop is None else req.hop
        for name, value in req.headers:
            lname = name.lower()
            if req.upgrade and lname in (b"connection", b"upgrade"):
                lines.append(name + b": " + value + b"\r\n")
                continue
            if lname in drop:
                continue
            lines.append(name + b": " + value + b"\r\n")
        lines.append(b"x-baseten-request-id: " + rid.encode("latin-1") + b"\r\n")
        # What the client said it forwarded for, then the address that connected: the last
        # entry, the one a replica may trust, is never the client's own word.
        ff, peer = req.forwarded_for, self._peer()
        if ff is not None or peer:
            joined = peer if ff is None else (ff + b", " + peer if peer else ff)
            lines.append(b"x-forwarded-for: " + joined + b"\r\n")
        if req.host is None:  # HTTP/1.0 without Host: an HTTP/1.1 request needs one, empty
            lines.append(b"host: \r\n")  # when there is no authority (RFC 9112 3.2)
        if req.chunked:
            lines.append(b"transfer-encoding: chunked\r\n")
        elif req.content_length is not None:
            lines.append(b"content-length: " + req.content_length + b"\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)

    async def _send_body(self, req: _Request, conn: UpstreamConn) -> None:
        if not req.chunked and req.content_length in (None, b"0"):
            return
        while True:
            chunk = await self.next_chunk(req)
            if chunk is None:
                break
            req.body_sent = True  # taken from the queue: a retry can only replay it
            if conn.closed:
                return
            conn.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if req.chunked else chunk)
            await conn.drain()
        if req.chunked and not conn.closed:
            conn.write(b"0\r\n\r\n")


@dataclass(slots=True)
class _Handoff:
    """A request the callbacks could not finish, and what the task needs to carry on."""

    req: _Request
    target: Target
    dispatcher: Dispatcher
    """The deployment's dispatcher when the request was routed. A later table may have
    dropped the deployment; the request still settles (or is refused) with this one."""
    tried: frozenset[str] = frozenset()
    attempts: int = 2
    slot: Slot | None = None
    """A replica slot already taken for it. Whoever holds the handoff owns the slot until
    :meth:`ClientConn._dispatch` takes it over; if the task is cancelled before it ever
    runs, :meth:`ClientConn.connection_lost` gives it back."""


class _Exchange:
    """Re-frames one upstream response for the client."""

    def __init__(self, client: ClientConn, req: _Request, rid: str, timeout_s: float) -> None:
        self.client = client
        self.req = req
        self.rid = rid.encode("latin-1")
        self.timeout_s = timeout_s
        self.sent_at = time.perf_counter()
        self.done: asyncio.Future[str] | None = None
        """Set by a task that awaits the end; otherwise :attr:`landing` is used."""
        self.landing: tuple[Dispatcher, Slot, UpstreamConn, Target] | None = None
        """For a request sent from callbacks: what :meth:`ClientConn._landed` settles."""
        self.finished = False
        self.buf = bytearray()
        self.started = False
        self.chunked = False
        self.no_body = False
        self.upstream_keep_alive = True
        self.must_close = False
        self.close_delimited = False
        self.status = 0
        self.early = False
        """The answer ended before the request's body was all sent: the connection goes."""
        self.sending = False
        """The body is still being streamed to the replica: its answer is not due yet."""

    def on_response_head(
        self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], keep_alive: bool
    ) -> None:
        self.started = True
        self.status = status
        self.upstream_keep_alive = keep_alive
        buf = self.buf
        buf += b"HTTP/1.1 %d %s\r\n" % (status, reason or b"OK")
        mark = len(buf)
        length = None
        upstream_chunked = False
        hop: set[bytes] | None = None
        for name, value in headers:
            lname = name.lower()
            if status == 101 and lname in (b"connection", b"upgrade"):
                buf += name + b": " + value + b"\r\n"
                continue
            if lname in HOP_BY_HOP:
                upstream_chunked = upstream_chunked or (
                    lname == b"transfer-encoding" and b"chunked" in value.lower()
                )
                if lname == b"connection" and (tokens := _connection_tokens(value)) is not None:
                    hop = (hop or set()) | tokens
                continue
            if lname == b"content-length":
                length = value
            buf += name + b": " + value + b"\r\n"
        if hop is not None:
            # Headers the replica names in ``Connection`` were for its hop only (RFC 9110
            # 7.6.1), wherever they came: written again without them (rare).
            del buf[mark:]
            for name, value in headers:
                lname = name.lower()
                if lname not in HOP_BY_HOP and (lname not in hop or lname == b"content-length"):
                    buf += name + b": " + value + b"\r\n"
        buf += b"x-baseten-request-id: " + self.rid + b"\r\n"
        self.no_body = self.req.method == b"HEAD" or status in _NO_BODY_STATUS or status < 200
        self.close_delimited = not self.no_body and length is None and not upstream_chunked
        if not self.no_body and length is None:
            if self.req.http11:
                self.chunked = True
                buf += b"transfer-encoding: chunked\r\n"
            else:
                self.must_close = True
        if not self.req.keep_alive:
            self.must_close = True
        if self.must_close and status != 101:
            buf += b"connection: close\r\n"
        buf += b"\r\n"
        if self.req.method == b"HEAD":
            self.upstream_keep_alive = False
            self.on_response_end()

    def check_timeout(self, now: float) -> None:
        """Give up on a replica that has not begun its answer within ``timeout_s``: its
        connection goes (a late answer must reach nobody) and the client gets a 504."""
        if self.started or self.finished or self.sending:
            return  # (a body still on its way: the end of its sending restarts the clock)
        if now - self.sent_at < self.timeout_s:
            return
        conn = self.client.upstream
        if conn is not None and conn.exchange is self:
            conn.exchange = None
            conn.close()
        self.status = 504
        self._finish("timeout")

    def on_interim(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        # Passed on to HTTP/1.1 clients (RFC 9110 15.2), except 100 Continue: the gateway
        # answers ``Expect`` itself and does not send it upstream. Once one is passed on,
        # response bytes have reached the client and the request is no longer retried.
        if status == 100 or not self.req.http11:
            return
        self.started = True
        buf = self.buf
        buf += b"HTTP/1.1 %d %s\r\n" % (status, reason or b"Informational")
        for name, value in headers:
            if name.lower() not in HOP_BY_HOP:
                buf += name + b": " + value + b"\r\n"
        buf += b"\r\n"

    def on_response_body(self, data: bytes) -> None:
        if self.no_body:
            return
        if self.chunked:
            self.buf += b"%x\r\n%s\r\n" % (len(data), data)
        else:
            self.buf += data

    def on_response_end(self) -> None:
        if self.chunked:
            self.buf += b"0\r\n\r\n"
        self.flush()
        self._finish("ok")

    def on_upstream_lost(self, exc: BaseException | None) -> None:
        if self.started and self.close_delimited and exc is None:
            self.upstream_keep_alive = False
            self.on_response_end()  # the body ended with the connection, as HTTP/1.0 allows
            return
        self.flush()
        self._finish("lost")

    def _finish(self, result: str) -> None:
        if self.finished:
            return
        self.finished = True
        if self.done is not None:
            if not self.done.done():
                self.done.set_result(result)
            return
        try:
            self.client._landed(self, result)
        except Exception:  # a bug here must not strand the client: log it and hang up
            access_log.exception("settling request %s failed", self.rid.decode("latin-1"))
            self.client.busy = False
            if self.client.transport is not None:
                self.client.transport.close()

    def flush(self) -> None:
        if self.buf:
            transport = self.client.transport
            if transport is not None and not self.client.closed:
                transport.write(bytes(self.buf))
            self.buf.clear()


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()
