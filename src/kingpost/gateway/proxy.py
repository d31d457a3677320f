"""The client side: parse requests with httptools, route, admit, answer in order.

One :class:`ClientConn` per client connection, the way uvicorn's httptools protocol is
built: this module parses requests (:class:`Request`), keeps their answers in order
(pipelining) and bounds the client's time (head, idle and body timeouts). Sending a
request to a replica, relaying its answer, retrying and settling are ``forward.py``; the
raw tunnel after a protocol upgrade is ``tunnel.py``; header framing is ``framing.py``.
Bodies stream both ways with flow control; responses are re-framed (Content-Length kept,
otherwise chunked) and carry ``X-Baseten-Request-Id``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import httptools

from kingpost.gateway.forward import (
    REPLAY_LIMIT,
    ClientExchange,
    Handoff,
    ParkedRequest,
    Sent,
    dispatch,
    try_now,
)
from kingpost.gateway.framing import (
    CONTINUE,
    connection_tokens,
    error_body,
    json_answer,
    named_by_connection,
)
from kingpost.gateway.routing import Miss, Target
from kingpost.gateway.tunnel import hold_for_tunnel, pass_half_close
from kingpost.gateway.upstream import StreamConn, UpstreamConn

if TYPE_CHECKING:
    from kingpost.gateway.server import Gateway

__all__ = [
    "BUFFER_LIMIT",
    "HEAD_LIMIT",
    "PIPELINE_LIMIT",
    "REQUEST_ID_LIMIT",
    "ClientConn",
    "Request",
]

access_log = logging.getLogger("kingpost.gateway.access")
REQUEST_ID_LIMIT = 128
"""The longest ``X-Baseten-Request-Id`` a client may choose (one of letters, digits and
``-_.:``); a longer or odd one is replaced by a new id, never trusted."""
_RID = re.compile(rb"[A-Za-z0-9][A-Za-z0-9._:-]*")
BODY_HIGH_WATER = 1024 * 1024
BUFFER_LIMIT = BODY_HIGH_WATER
"""A body up to this is read whole before its request takes a replica slot, and a larger
one (or a chunked one) until this much is in: a client that trickles its body in holds only
its own connection, until the body timeout ends it, not a slot others wait for."""
HEAD_LIMIT = 64 * 1024
"""Bytes a request head may take beyond the read it starts in (431 past it): httptools
has no limit and keeps a header's value growing for as long as the client sends it."""
PIPELINE_LIMIT = 16
"""Requests a connection may have parsed and waiting for their turn (pipelining): past it,
or while the client does not read its answers (the transport's write buffer past its
high-water mark), the gateway reads no more from it until the queue is down to half and
the answers drain. A client that pipelines without reading holds a bounded queue, not as
many requests, or answers, as it sends."""


class Request:
    """One client request as parsed, and how far its body has come in and gone out."""

    __slots__ = (
        "auth",
        "body_bytes",
        "body_sent",
        "bytes_out",
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
        "replica",
        "request_id",
        "rid",
        "small",
        "start",
        "trace",
        "tunnel_buf",
        "upgrade",
        "upstream_at",
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
        self.bytes_out = 0
        """Bytes of replicas' answers written to the client (access line and metrics)."""
        self.replica: str | None = None
        """The replica it was last sent to (for the access line)."""
        self.trace: list[Any] | None = None
        """With tracing on: trace id, parent, span ids and send time (``tracing.py``)."""
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
        self.upstream_at = -1.0
        """When the answering replica got the request (``perf_counter``; -1: none did)."""

    def wake(self) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class ClientConn(StreamConn):
    def __init__(self, gateway: Gateway) -> None:
        super().__init__()
        self.gw = gateway
        self.parser = httptools.HttpRequestParser(self)
        self.pending: deque[Request] = deque()
        self.current: Request | None = None
        self.task: asyncio.Task[None] | None = None
        self.busy = False
        """A request is being answered (from callbacks or by ``task``); the rest queue."""
        self.eof = False
        self.upstream: UpstreamConn | None = None
        self.handoff: Handoff | None = None
        """What the task was started with, so a slot it never took over can be released."""
        self.parked: ParkedRequest | None = None
        """A request waiting in its deployment's queue without a Task (see ``forward.py``)."""
        self.tunnel: Request | None = None
        """An upgrade request whose raw bytes are buffered until the replica answers."""
        self.paused_reading = False
        self.holding = False
        """Reading paused because answers are owed (see :data:`PIPELINE_LIMIT`); apart from
        :attr:`paused_reading` (a body) so that neither's end resumes the other's pause."""
        self.writing_paused = False
        """The client's write buffer is past its high-water mark: no next answer is begun."""
        self.refusal: tuple[bytes, str, int, str, float] | None = None
        """An error answer owed after the answers before it: its bytes, and its request id,
        status, code and when it was decided, for its access line."""
        self._waiting: tuple[Request | None, float] | None = None
        """What :meth:`close_if_stalled` last saw the connection wait for, and since when."""
        self.peer: bytes | None = None
        """The client's address, for ``X-Forwarded-For`` (looked up at the first request)."""
        self.body_wait: Request | None = None
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
        if reading and not (self.paused_reading or self.holding or self.closed):
            assert req is not None
            if now - req.start > gw.body_timeout_s + req.body_bytes / gw.body_min_rate:
                self._body_too_slow(req)
                return
        upstream = self.upstream
        if upstream is not None and isinstance(exchange := upstream.exchange, ClientExchange):
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

    def _body_too_slow(self, req: Request) -> None:
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
            head = req.method == b"HEAD"
            transport.write(error_body(408, message, "request_timeout", rid, True, head))
            gw.log_access(rid, 408, "request_timeout", req.start, None, req)
        transport.close()  # its head is with a replica, or answered: only closing ends it

    # -- asyncio.Protocol ----------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self.forward_raw(data):
            return
        if self.tunnel is not None:
            hold_for_tunnel(self, data)
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
                req.complete = False  # its body comes first (see :func:`hold_for_tunnel`)
            hold_for_tunnel(self, data[int(exc.args[0]) :])
        except httptools.HttpParserError as exc:
            # Requests parsed before the bad bytes are still answered, then this error.
            self._fail_and_close(400, f"malformed HTTP request: {exc}")
        pending = self.pending
        if pending:
            if not self.busy:
                self.serve_next()
            # Requests still queued: read no more while too many are, or while the client
            # does not read the answers (see PIPELINE_LIMIT).
            if (
                pending
                and not self.holding
                and (len(pending) >= PIPELINE_LIMIT or self.writing_paused)
            ):
                self._hold()

    def eof_received(self) -> bool:
        if self.tunnel is not None:
            # A handshake still waiting for its replica: WebSocket clients do not half-close,
            # so this one left. Closing cancels the wait, and no slot goes to an empty tunnel.
            return False
        if self.raw_sink is not None:
            return pass_half_close(self)  # a live tunnel: the replica decides when to end
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
        parked, self.parked = self.parked, None
        if parked is not None:
            parked.leave()  # out of the queue: a slot freed later goes to the next one
        handoff, self.handoff = self.handoff, None
        if handoff is not None and not handoff.started:
            # The task was cancelled before it ran: give its slot back, and write the
            # access line that dispatch() would have written.
            if handoff.slot is not None:
                handoff.dispatcher.release(handoff.slot)
                handoff.slot = None
            req = handoff.req
            assert req.rid is not None
            self.gw.log_access(req.rid, 0, "client_left", req.start, handoff.target, req)
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
        self.writing_paused = True
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        super().resume_writing()
        self.writing_paused = False
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.resume_reading()
        if self.closed:
            return
        if self.pending and not self.busy:
            self.serve_next()  # the answers it held back while the client did not read
        if self.holding:
            self._release()

    def _hold(self) -> None:
        """Read no more requests: enough are queued, or the client reads no answers (only
        with a request queued, so a body the answer in progress waits for still comes)."""
        if self.transport is not None and not self.closed:
            self.holding = True
            self.transport.pause_reading()

    def _release(self) -> None:
        """Read again once the queue is down to half and the client takes its answers (or
        nothing is queued for them to hold back); not past a pause of another reason."""
        pending = self.pending
        if len(pending) > PIPELINE_LIMIT // 2 or (self.writing_paused and pending):
            return
        self.holding = False
        if not (self.paused_reading or self.eof or self.closed) and self.transport is not None:
            self.transport.resume_reading()

    def _fail_and_close(self, status: int, message: str, code: str = "invalid_request") -> None:
        rid = self.gw.new_request_id()
        body = error_body(status, message, code, rid, close=True)
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
        self.current = Request()

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
            elif lname == b"connection" and (tokens := connection_tokens(value)) is not None:
                # Headers it names are for this hop only (RFC 9110 7.6.1): not forwarded.
                req.hop = named_by_connection(tokens, req.hop)
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
        if req.body_bytes > BODY_HIGH_WATER and not self.paused_reading and self.transport:
            self.paused_reading = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        req = self.current
        assert req is not None
        req.complete = True
        req.wake()

    # -- serving ---------------------------------------------------------------------------------
    def serve_next(self) -> None:
        """Answer queued requests in order: right here while none has to wait, else in a task.

        The common request (small body already in, a free replica slot, an idle pooled
        connection) is written to the replica from this callback, and its answer is
        relayed from the replica's callbacks: no Task and no future per request. Anything
        that must wait (a body still arriving, a queue, a new connection, a retry) goes to
        :meth:`_serve`, which handles it and every request behind it.
        """
        while not self.busy and self.pending and not (self.closed or self.writing_paused):
            req = self.pending[0]
            if (
                req.chunked
                or req.upgrade
                or req.expect_continue
                or not (req.complete or req.small)
                or b"/async_" in req.url  # answered from the store, on a thread (asyncroutes)
            ):
                self.start_task()
                return
            if not req.complete:
                return  # the rest of a small body is on its way; its arrival calls again
            self.pending.popleft()
            keep = try_now(self, req)
            if isinstance(keep, Sent):
                return
            if isinstance(keep, Handoff):
                self.start_task(keep)
                return
            if not self.after(req, keep):
                return

    def start_task(self, handoff: Handoff | None = None) -> None:
        self.busy = True
        self.handoff = handoff
        self.task = asyncio.ensure_future(self._serve(handoff))

    def after(self, req: Request, keep: bool) -> bool:
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
        if self.paused_reading and self.transport is not None:
            # Reading stopped for a large body that has now gone upstream in full.
            self.paused_reading = False
            if not self.holding:
                self.transport.resume_reading()
        if self.holding:
            self._release()
        return True

    async def _serve(self, handoff: Handoff | None = None) -> None:
        try:
            # First a request the callbacks started but could not finish, if any.
            if handoff is not None and not self.after(handoff.req, await dispatch(self, handoff)):
                return
            while self.pending and not self.closed:
                if self.writing_paused:
                    await self.drain()  # the client reads the answers before it gets more
                    continue
                req = self.pending.popleft()
                if not self.after(req, await self._handle(req)):
                    return
        finally:
            self.busy = False

    async def next_chunk(self, req: Request) -> bytes | None:
        while not req.chunks:
            if req.complete or self.closed:
                return None
            if self.paused_reading and self.transport is not None:
                self.paused_reading = False
                if not self.holding:
                    self.transport.resume_reading()
            req.waiter = asyncio.get_running_loop().create_future()
            await req.waiter
        return req.chunks.popleft()

    def route(self, req: Request) -> Target | Miss | bool:
        """Where ``req`` goes; or the error is written and whether the connection stays; or,
        for an async inference route, its :class:`Miss` (answered by :meth:`_handle`)."""
        gw = self.gw
        if req.rid is None:
            given = req.request_id
            # The client's id is kept only when it is a plain token (it reaches logs, the
            # replica's head and the answer's); anything else gets a new one.
            ok = given is not None and len(given) <= REQUEST_ID_LIMIT and _RID.fullmatch(given)
            req.rid = given.decode("ascii") if ok and given else gw.new_request_id()
        rid = req.rid
        if req.refuse is not None:  # RFC 9112 3.2
            return self.reject(req, 400, req.refuse, "invalid_request", rid)
        if gw.table.version == 0:  # the control plane has not pushed a table yet
            return self.reject(
                req,
                503,
                "the gateway is starting and has no routing table yet; retry shortly",
                "starting",
                rid,
            )
        scope = gw.authorized(req.auth)
        if scope is None:
            return self.reject(
                req,
                401,
                "missing or unknown API key: send `Authorization: Api-Key <key>`",
                "unauthorized",
                rid,
            )
        target = gw.route(req.host or b"", req.url)
        if not scope.allows(target.model_id):  # an invoke-only key, for another model
            what = f"model {target.model_id}" if target.model_id else "this route"
            return self.reject(
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
            if target.async_op is not None:
                return target
            if target.wake is not None:  # the control plane starts it (see note_demand)
                gw.note_demand(target.wake, 1)
                return self.reject(req, 202, "", "wake", rid, payload={})
            return self.reject(req, target.status, target.message, target.code, rid)
        return target

    async def _handle(self, req: Request) -> bool:
        """Answer one request; False when the connection must close."""
        target = self.route(req)
        if isinstance(target, Miss):  # an async route: answered from the store
            return await self.gw.answer_async(self, req, target)
        if not isinstance(target, Target):
            return target
        if req.expect_continue:
            assert self.transport is not None
            self.transport.write(CONTINUE)
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
        return await dispatch(self, Handoff(req, target, dispatcher))

    def reject(
        self,
        req: Request,
        status: int,
        message: str,
        code: str,
        rid: str,
        target: Target | None = None,
        payload: object = None,
    ) -> bool:
        """Answer ``req`` with the gateway's own error (or ``payload`` as JSON); whether the
        connection stays."""
        assert self.transport is not None
        self.gw.log_access(rid, status, code, req.start, target, req)
        body = {"error": message, "code": code} if payload is None else payload
        head = req.method == b"HEAD"  # headers only (RFC 9110 9.3.2)
        if req.upgrade:
            # After an upgrade request the client's stream is no longer HTTP (it may already
            # be sending frames): the refusal ends the connection.
            self.transport.write(json_answer(status, body, rid, close=True, head=head))
            return False
        # The body, if any, was not read: the connection cannot be reused unless it's
        # complete, and the answer says it ends (as it does when the client asked).
        keep = req.complete or (req.content_length in (None, b"0") and not req.chunked)
        close = not (keep and req.keep_alive)
        self.transport.write(json_answer(status, body, rid, close=close, head=head))
        return keep

    def peer_address(self) -> bytes:
        """The client's address as ``X-Forwarded-For`` gives it (b"" when unknown)."""
        peer = self.peer
        if peer is None:
            info = self.transport.get_extra_info("peername") if self.transport else None
            host = info[0] if isinstance(info, tuple) and info else None
            peer = self.peer = host.encode("latin-1") if isinstance(host, str) else b""
        return peer
