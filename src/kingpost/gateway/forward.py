"""Forwarding one request to a replica: send it, relay the answer, retry, settle.

Two paths, one behaviour (``docs/architecture.md``, the gateway). :func:`try_now` sends a
complete request from the client's callbacks when nothing has to wait, and
:func:`landed` settles it from the replica's; everything else goes through
:func:`dispatch` in the connection's task: take a slot (queueing), :func:`forward` (a
pooled or new connection, the body streamed by :func:`send_body`), and one retry on
another replica if the first hung up before sending a byte and running the request there
can do no harm (:func:`may_resend`). Both end in :func:`settle`,
which decides the :class:`Outcome` from how the exchange ended (:class:`Ending`). A
:class:`ClientExchange` re-frames one replica response for the client. The connection
(parsing, pipelining, timeouts) is :class:`~kingpost.gateway.proxy.ClientConn`.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import deque
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from kingpost.gateway.dispatch import Dispatcher, Rejected, Slot, Waiter
from kingpost.gateway.framing import (
    BODY_UNEXPECTED,
    HOP_BY_HOP,
    IDEMPOTENT,
    NO_BODY_STATUS,
    connection_tokens,
    error_body,
    interim_head,
    request_head,
    response_header_lines,
)
from kingpost.gateway.routing import Miss, Target
from kingpost.gateway.tunnel import tunnel
from kingpost.gateway.upstream import UpstreamConn

if TYPE_CHECKING:
    from kingpost.gateway.proxy import ClientConn, Request

__all__ = [
    "REPLAY_LIMIT",
    "SENT",
    "ClientExchange",
    "Ending",
    "Handoff",
    "Outcome",
    "ParkedRequest",
    "Sent",
    "dispatch",
    "landed",
    "may_resend",
    "try_now",
]

access_log = logging.getLogger("kingpost.gateway.access")
REPLAY_LIMIT = 64 * 1024
"""Body bytes kept to send again when a request is retried on another replica."""
KEEPALIVE_RACE_S = 0.05
"""A pooled connection lost without a byte of answer this soon after the request was
written to it was most likely closed by the replica while idle, as the request crossed
its FIN (the keep-alive race): the replica never read the request. Later, it may be
running it."""


class Outcome(enum.StrEnum):
    """What a forwarded request leaves its client connection to do (and, but for retry,
    the ``outcome`` of its access-log line)."""

    OK = "ok"  # answered; the connection may carry the next request
    CLOSE = "close"  # the connection ends with this request (answered or not)
    RETRY = "retry"  # the replica took nothing: send the request to another one


class Ending(enum.StrEnum):
    """How the replica's side of one exchange ended."""

    ANSWERED = "answered"  # its whole answer was relayed
    LOST = "lost"  # its connection went before the answer ended
    TIMEOUT = "timeout"  # its answer did not begin within the response timeout


# Members as module globals: the hot path compares against these, and a class attribute
# lookup on an enum costs several times a global one.
_OK, _CLOSE, _RETRY = Outcome.OK, Outcome.CLOSE, Outcome.RETRY
_ANSWERED, _LOST, _TIMEOUT = Ending.ANSWERED, Ending.LOST, Ending.TIMEOUT


class Sent:
    """The request is with a replica; its answer is relayed from callbacks."""


SENT = Sent()


@dataclass(slots=True)
class Handoff:
    """A request the callbacks could not finish, and what the task needs to carry on."""

    req: Request
    target: Target
    dispatcher: Dispatcher
    """The deployment's dispatcher when the request was routed. A later table may have
    dropped the deployment; the request still settles (or is refused) with this one."""
    tried: frozenset[str] = frozenset()
    attempts: int = 2
    slot: Slot | None = None
    """A replica slot already taken for it. Whoever holds the handoff owns the slot until
    :func:`dispatch` takes it over; if the task is cancelled before it ever runs,
    :meth:`ClientConn.connection_lost` gives it back."""
    started: bool = False
    """:func:`dispatch` has run; before that, a client that leaves gets its access line
    from :meth:`ClientConn.connection_lost` (the cancelled task never logs it)."""


def try_now(client: ClientConn, req: Request) -> bool | Handoff | Sent:
    """Answer or send a complete request without waiting, if nothing has to wait."""
    target = client.route(req)
    if isinstance(target, Miss):  # an async route the URL check missed: a Task answers it
        client.pending.appendleft(req)
        client.start_task()
        return SENT
    if not isinstance(target, Target):
        return target
    assert req.rid is not None
    gw = client.gw
    dispatcher = gw.dispatcher(target.deployment.deployment_id)
    try:
        slot = dispatcher.try_acquire()
    except Rejected as rej:
        return client.reject(req, rej.status, rej.message, rej.code, req.rid, target)
    if slot is None:
        # Queued without a Task: the release that frees a slot sends it (ParkedRequest).
        parked = ParkedRequest(client, req, target, dispatcher)
        try:
            parked.waiter = dispatcher.park(parked)
        except Rejected as rej:
            return client.reject(req, rej.status, rej.message, rej.code, req.rid, target)
        client.busy = True
        client.parked = parked
        return SENT
    return send_now(client, req, target, dispatcher, slot)


def send_now(
    client: ClientConn, req: Request, target: Target, dispatcher: Dispatcher, slot: Slot
) -> Handoff | Sent:
    """Write a complete request to the replica of ``slot`` (held by the caller until
    handed on) over an idle pooled connection; without one, a Task opens one."""
    conn = client.gw.pool.take_idle(slot.key)
    if conn is None:
        return Handoff(req, target, dispatcher, slot=slot)  # to open a connection
    assert req.rid is not None
    req.replica = slot.upstream.replica_id
    exchange = ClientExchange(client, req, req.rid, target.deployment.response_timeout_s)
    exchange.landing = (dispatcher, slot, conn, target)
    client.busy = True
    client.upstream = conn
    conn.begin(exchange)
    head = request_head(req, target.path, req.rid, client.peer_address())
    if client.gw.tracer is not None:
        head = client.gw.tracer.inject(req, head)
    conn.write(head + b"".join(req.chunks))
    req.chunks.clear()
    return SENT


class ParkedRequest:
    """A complete request from the callback path that found every slot taken: it waits
    in the deployment's queue as a :class:`~kingpost.gateway.dispatch.Parked`, and the
    :meth:`Dispatcher.release` that frees a slot (run when the answer before it ends) sends
    it in the same call. The replica gets its next request without waiting for a Task to
    be woken on a later loop turn, and the request costs no Task and no future."""

    __slots__ = ("client", "dispatcher", "req", "target", "waiter")

    def __init__(
        self, client: ClientConn, req: Request, target: Target, dispatcher: Dispatcher
    ) -> None:
        self.client, self.req, self.target, self.dispatcher = client, req, target, dispatcher
        self.waiter: Waiter | None = None

    def give(self, slot: Slot) -> None:
        client, req = self.client, self.req
        client.parked = None
        if client.closed:  # gone without connection_lost yet: the slot goes on at once
            client.busy = False
            assert req.rid is not None
            client.gw.log_access(req.rid, 0, "client_left", req.start, self.target, req)
            self.dispatcher.release(slot)
            return
        try:
            sent = send_now(client, req, self.target, self.dispatcher, slot)
        except Exception:
            # Raised inside another request's release: end only this client's connection.
            access_log.exception("sending queued request %s failed", req.rid)
            upstream = client.upstream
            if upstream is not None and upstream.exchange is not None:
                upstream.close()  # its loss lands the exchange, which releases the slot
            else:
                self.dispatcher.release(slot)
            client.busy = False
            if client.transport is not None:
                client.transport.close()
            return
        if isinstance(sent, Handoff):
            client.start_task(sent)

    def refuse(self, rej: Rejected) -> None:
        client, req = self.client, self.req
        client.parked = None
        client.busy = False
        if client.closed:
            return
        assert req.rid is not None
        keep = client.reject(req, rej.status, rej.message, rej.code, req.rid, self.target)
        if client.after(req, keep):
            client.serve_next()

    def leave(self) -> None:
        """The client left while it waited: out of the queue, and its access line."""
        if self.waiter is not None:
            self.dispatcher.unpark(self.waiter)
        assert self.req.rid is not None
        self.client.gw.log_access(
            self.req.rid, 0, "client_left", self.req.start, self.target, self.req
        )


def landed(client: ClientConn, exchange: ClientExchange, ending: Ending) -> None:
    """The end of a request :func:`try_now` sent: settle it and serve the next one."""
    assert exchange.landing is not None
    dispatcher, slot, conn, target = exchange.landing
    req = exchange.req
    client.upstream = None
    if client.closed:  # the client left; nobody to answer or retry for
        dispatcher.release(slot)
        conn.close()
        client.busy = False
        assert req.rid is not None
        client.gw.log_access(req.rid, exchange.status, "client_left", req.start, target, req)
        return
    outcome = settle(client, req, conn, exchange, True, ending)
    if conn.returning is not None and dispatcher.has_waiters():
        # The connection rejoins the pool once the read that ended its answer is parsed:
        # the slot is freed then too, so that the request queued for it (a ParkedRequest)
        # is sent at once on this connection instead of a Task opening another.
        conn.after_read = partial(dispatcher.release, slot)
    else:
        dispatcher.release(slot)
    if outcome is _RETRY:
        if not retries_itself(req):  # else dispatch answers the 502 without retrying
            dispatcher.counters.retries += 1
        client.start_task(
            Handoff(req, target, dispatcher, frozenset({slot.upstream.replica_id}), 1)
        )
        return
    assert req.rid is not None
    client.gw.log_access(req.rid, exchange.status or 502, outcome, req.start, target, req)
    client.busy = False
    if client.after(req, outcome is not _CLOSE):
        client.serve_next()


NO_RETRY = b"x-kingpost-no-retry"
"""A request header: the sender retries on its own terms (the async workers, per
``inference_retry_config``), so the gateway does not send it to another replica when the
first took it and hung up. Asked only when a retry is due."""


def retries_itself(req: Request) -> bool:
    return any(name.lower() == NO_RETRY for name, _ in req.headers)


async def dispatch(client: ClientConn, h: Handoff) -> bool:
    """Take a replica slot, forward, and retry once elsewhere if the replica hung up; False
    when the client connection must close."""
    gw, req, target, tried, dispatcher = client.gw, h.req, h.target, h.tried, h.dispatcher
    slot, h.slot = h.slot, None  # from here the slot is released by the finally below
    h.started = True
    rid = req.rid
    assert rid is not None
    for attempt in range(h.attempts):
        if tried and slot is None and retries_itself(req):
            break  # answered 502 below: the sender decides whether to run it again
        if attempt:
            dispatcher.counters.retries += 1
        try:
            if slot is None:
                try:
                    slot = await dispatcher.acquire(tried)
                except Rejected as rej:
                    return client.reject(req, rej.status, rej.message, rej.code, rid, target)
            try:
                outcome, status = await forward(
                    client, req, slot, target.path, rid, target.deployment.response_timeout_s
                )
            finally:
                dispatcher.release(slot)
        except asyncio.CancelledError:  # the client left, queued or mid-answer
            gw.log_access(rid, 0, "client_left", req.start, target, req)
            raise
        if outcome is not _RETRY:
            gw.log_access(rid, status, outcome, req.start, target, req)
            if outcome is _OK and not req.complete:
                # Answered before the body was all in, by a replica that then hung up: the
                # rest is read and dropped, or it piles up until reading stops for good.
                while await client.next_chunk(req) is not None:
                    pass
            return outcome is not _CLOSE
        tried, slot = tried | {slot.upstream.replica_id}, None
    return client.reject(
        req,
        502,
        "the replica closed the connection before answering",
        "bad_gateway",
        rid,
        target,
    )


async def forward(
    client: ClientConn, req: Request, slot: Slot, path: str, rid: str, timeout_s: float
) -> tuple[Outcome, int]:
    """Proxy one request; returns what the client connection does next, and the status
    the client got (0: none)."""
    gw = client.gw
    req.replica = slot.upstream.replica_id
    if client.closed:
        return _CLOSE, 0  # the client left while the request waited: nobody to answer
    try:
        if req.upgrade:
            conn, reused = await gw.pool.connect(slot.key), False
        else:
            conn, reused = await gw.pool.get(slot.key)
    except (OSError, TimeoutError):
        return _RETRY, 0
    exchange = ClientExchange(client, req, rid, timeout_s)
    exchange.done = done = asyncio.get_running_loop().create_future()
    conn.begin(exchange)
    client.upstream = conn
    try:
        head = request_head(req, path, rid, client.peer_address())
        if gw.tracer is not None:
            head = gw.tracer.inject(req, head)
        if req.complete and not req.chunked:
            # The whole body is here already (the common small request): one write.
            req.body_sent = req.body_sent or bool(req.chunks)
            conn.write(head + b"".join(req.chunks))
            req.chunks.clear()
        else:
            exchange.sending = True
            conn.write(head)
            await send_body(client, req, conn)
            # Answered before it had the whole body: whether the replica read the rest as
            # body or as another request, its connection cannot be trusted again.
            exchange.early = exchange.finished
            exchange.sending = False
            exchange.sent_at = time.perf_counter()  # its answer is due from here
        ending = await done
        if conn.upgraded and exchange.status == 101:
            await tunnel(client, req, conn)
            return _CLOSE, 101
    except asyncio.CancelledError:
        conn.close()
        raise
    finally:
        client.upstream = None
    if req.upgrade:
        if ending is _LOST and settle(client, req, conn, exchange, False, ending) is _RETRY:
            return _RETRY, 0  # the replica took nothing: another may take the handshake
        if ending is _TIMEOUT:
            settle(client, req, conn, exchange, False, ending)
        conn.close()
        # Refused or lost: after an upgrade request the stream is raw.
        return _CLOSE, exchange.status or 502
    return settle(client, req, conn, exchange, reused, ending), exchange.status or 502


def settle(
    client: ClientConn,
    req: Request,
    conn: UpstreamConn,
    exchange: ClientExchange,
    reused: bool,
    ending: Ending,
) -> Outcome:
    """After the replica's answer (or its loss): what the client connection does next."""
    if ending is _TIMEOUT:
        conn.close()
        assert client.transport is not None
        keep = req.complete and not req.upgrade
        client.transport.write(
            error_body(
                504,
                f"the replica did not begin its answer within {exchange.timeout_s:g}s "
                "(the deployment's response timeout)",
                "gateway_timeout",
                exchange.rid.decode("latin-1"),
                close=not (keep and req.keep_alive),
                head=req.method == b"HEAD",
            )
        )
        return _OK if keep else _CLOSE
    if ending is _LOST:
        conn.close()
        # Retried only if the replica sent nothing at all: even part of a response head
        # means it took the request, and running it twice is not the gateway's call. Nor
        # is a body the replay buffer no longer holds sent again with a part missing.
        message = "the replica closed the connection"
        if not conn.got_bytes and (req.replay is not None or (not reused and not req.body_sent)):
            lost_after_s = time.perf_counter() - exchange.sent_at
            if may_resend(req.method, not exchange.early, reused, lost_after_s):
                if req.replay is not None:
                    req.chunks = deque(req.replay)
                    req.replay = list(req.replay)
                return _RETRY
            message = (
                "the replica closed the connection while running the request "
                f"({lost_after_s:.3g}s after it was sent), before any answer; not retried "
                f"on another replica because it may have run ({req.method.decode('latin-1')} "
                "is not idempotent)"
            )
        if not exchange.started:
            assert client.transport is not None
            client.transport.write(
                error_body(
                    502,
                    message,
                    "bad_gateway",
                    exchange.rid.decode("latin-1"),
                    close=True,  # this connection ends here
                    head=req.method == b"HEAD",
                )
            )
        return _CLOSE
    if (
        exchange.upstream_keep_alive
        and req.complete
        and not exchange.early
        and not (req.body_bytes and req.method in BODY_UNEXPECTED)
    ):
        client.gw.pool.put(conn)
    else:
        conn.close()
    return _CLOSE if exchange.must_close else _OK


def may_resend(method: bytes, written: bool, reused: bool, lost_after_s: float) -> bool:
    """Whether a request whose replica hung up without a byte of answer may go to another
    replica (nginx's rule for non-idempotent methods). An idempotent one may
    (:data:`IDEMPOTENT`); any other only when it cannot have run: not all ``written``
    (a replica runs no request it has not read whole), or sent on a ``reused`` pooled
    connection lost within :data:`KEEPALIVE_RACE_S` (the replica closed it while idle).
    Otherwise the replica may have run it, and running a POST twice (a charge, a job) is
    not the gateway's call: the client gets a 502. A connection that could not be opened
    is retried before this is asked (``forward``)."""
    if method in IDEMPOTENT or not written:
        return True
    return reused and lost_after_s < KEEPALIVE_RACE_S


async def send_body(client: ClientConn, req: Request, conn: UpstreamConn) -> None:
    """Stream the rest of ``req``'s body to the replica as it arrives, with flow control."""
    if not req.chunked and req.content_length in (None, b"0"):
        return
    while True:
        chunk = await client.next_chunk(req)
        if chunk is None:
            break
        req.body_sent = True  # taken from the queue: a retry can only replay it
        if conn.closed:
            return
        conn.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if req.chunked else chunk)
        await conn.drain()
    if req.chunked and not conn.closed:
        conn.write(b"0\r\n\r\n")


class ClientExchange:
    """Re-frames one upstream response for the client (the upstream's ``Exchange``)."""

    def __init__(self, client: ClientConn, req: Request, rid: str, timeout_s: float) -> None:
        self.client = client
        self.req = req
        self.rid = rid.encode("latin-1")
        self.timeout_s = timeout_s
        self.sent_at = time.perf_counter()
        self.done: asyncio.Future[Ending] | None = None
        """Set by a task that awaits the end; otherwise :attr:`landing` is used."""
        self.landing: tuple[Dispatcher, Slot, UpstreamConn, Target] | None = None
        """For a request sent from callbacks: what :func:`landed` settles."""
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
                if lname == b"connection" and (tokens := connection_tokens(value)) is not None:
                    hop = (hop or set()) | tokens
                elif lname == b"x-kingpost-spans" and self.req.trace is not None:
                    self.req.trace[5] = value  # the model server's spans (tracing.py)
                continue
            if lname == b"content-length":
                length = value
            buf += name + b": " + value + b"\r\n"
        if hop is not None:
            # Headers the replica names in ``Connection`` were for its hop only (RFC 9110
            # 7.6.1), wherever they came: written again without them (rare).
            del buf[mark:]
            buf += response_header_lines(headers, hop)
        buf += b"x-baseten-request-id: " + self.rid + b"\r\n"
        self.no_body = self.req.method == b"HEAD" or status in NO_BODY_STATUS or status < 200
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
        self._finish(_TIMEOUT)

    def on_interim(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        # Passed on to HTTP/1.1 clients (RFC 9110 15.2), except 100 Continue: the gateway
        # answers ``Expect`` itself and does not send it upstream. Once one is passed on,
        # response bytes have reached the client and the request is no longer retried.
        if status == 100 or not self.req.http11:
            return
        self.started = True
        self.buf += interim_head(status, reason, headers)

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
        self._finish(_ANSWERED)

    def on_upstream_lost(self, exc: BaseException | None) -> None:
        if self.started and self.close_delimited and exc is None:
            self.upstream_keep_alive = False
            self.on_response_end()  # the body ended with the connection, as HTTP/1.0 allows
            return
        self.flush()
        self._finish(_LOST)

    def _finish(self, ending: Ending) -> None:
        if self.finished:
            return
        self.finished = True
        self.req.upstream_at = self.sent_at
        if self.done is not None:
            if not self.done.done():
                self.done.set_result(ending)
            return
        try:
            landed(self.client, self, ending)
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
                self.req.bytes_out += len(self.buf)
            self.buf.clear()
