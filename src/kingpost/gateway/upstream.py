"""Keep-alive connections to replicas, and the response side of an exchange.

An :class:`UpstreamConn` parses the replica's response with httptools and hands
each event to the current :class:`Exchange`, which re-frames it for the client.
Bytes produced while handling one read are flushed to the client in one write.

A response reaches only the request it answers. A replica may send what nobody asked
for: a second answer to one request (a server that read an ignored body as a request),
or half an answer on an idle connection. Such a connection is never used again: bytes
that arrive while no request waits, or a response that begins after the one awaited
ended in the same read, drop it; and a connection goes back to the pool only after the
whole read that ended its answer was parsed, so no request is sent on it in between.
What the proxy adds (closing after bodies a replica may not read) is in ``forward.py``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import defaultdict
from collections.abc import Callable
from typing import Any, Protocol, cast

import httptools

from kingpost.netns import socket_in_netns

__all__ = ["Exchange", "StreamConn", "UpstreamConn", "UpstreamPool"]

log = logging.getLogger("kingpost.gateway")

Key = tuple[str, int, str | None]
CONNECT_TIMEOUT_S = 5.0


class Exchange(Protocol):
    """The client side of one proxied request, fed by the upstream's parser."""

    def on_response_head(
        self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], keep_alive: bool
    ) -> None: ...
    def on_interim(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        """A 1xx response other than 101 (e.g. 103 Early Hints); the real one follows."""

    def on_response_body(self, data: bytes) -> None: ...
    def on_response_end(self) -> None: ...
    def on_upstream_lost(self, exc: BaseException | None) -> None: ...
    def flush(self) -> None: ...


class StreamConn(asyncio.Protocol):
    """What both ends of a proxied exchange share: the transport, write flow control,
    and the raw mode a protocol upgrade switches to."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.raw_sink: Callable[[bytes], None] | None = None
        """Once set (after an upgrade), every byte received goes here unparsed."""
        self.on_close: Callable[[], None] | None = None
        self._can_write = asyncio.Event()
        self._can_write.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    async def drain(self) -> None:
        if not self._can_write.is_set():
            await self._can_write.wait()

    def forward_raw(self, data: bytes) -> bool:
        """Pass ``data`` on unparsed when in raw mode; True when it was."""
        if self.raw_sink is None:
            return False
        self.raw_sink(data)
        return True

    def mark_lost(self) -> None:
        self.closed = True
        self._can_write.set()
        if self.on_close is not None:
            self.on_close()


class UpstreamConn(StreamConn):
    def __init__(self, key: Key) -> None:
        super().__init__()
        self.key = key
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: Exchange | None = None
        self.got_bytes = False
        self.upgraded = False
        """The replica switched protocols (101): bytes now flow raw both ways."""
        self.leftover = b""
        """Raw bytes the replica sent after its 101, kept until the tunnel takes them."""
        self.feeder: asyncio.Transport | None = None
        """In a tunnel, the client transport whose bytes this connection writes."""
        self._reason = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._interim = False
        self.feeding = False
        """A read is being parsed: a connection put back now waits in :attr:`returning`."""
        self.returning: UpstreamPool | None = None
        """The pool to join once the read being parsed is done (see :meth:`UpstreamPool.put`)."""
        self.after_read: Callable[[], None] | None = None
        """Run once the read being parsed is done, after the connection is pooled: the
        release of the replica slot its answer held (``forward.landed``)."""

    # -- asyncio.Protocol --------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self.forward_raw(data):
            return
        if self.exchange is None:
            self._unsolicited(f"{len(data)} bytes")  # no request waits: this answers none
            return
        self.got_bytes = True
        self.feeding = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self.upgraded = True
            self.leftover = data[int(exc.args[0]) :]
            # Raw from here on: until the tunnel takes over, later bytes join the leftover.
            self.raw_sink = self._keep
        except httptools.HttpParserError as exc:
            self._lose(exc)  # (and on: a slot freed in this read must still be released)
        finally:
            self.feeding = False
        if self.exchange is not None:
            self.exchange.flush()
        if self.returning is not None:
            pool, self.returning = self.returning, None
            pool.put(self)
        if self.after_read is not None:
            then, self.after_read = self.after_read, None
            then()

    def _unsolicited(self, what: str) -> None:
        """The replica sent bytes no request asked for: whatever comes next on this
        connection cannot be trusted to answer the next request. Drop it."""
        if not self.closed:
            host, port, _netns = self.key
            log.warning(
                "replica %s:%d sent %s that no request asked for; its connection is "
                "dropped (a server that read a request's body as another request?)",
                host,
                port,
                what,
            )
        self.close()

    def _keep(self, data: bytes) -> None:
        self.leftover += data

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.feeder is not None:
            self.feeder.pause_reading()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.feeder is not None:
            self.feeder.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.mark_lost()
        self._lose(exc)

    def _lose(self, exc: BaseException | None) -> None:
        exchange, self.exchange = self.exchange, None
        self.closed = True
        if self.transport is not None:
            self.transport.close()
        if exchange is not None:
            exchange.on_upstream_lost(exc)

    # -- httptools callbacks -------------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.exchange is None:  # a response after the awaited one ended, in the same read
            self._unsolicited("a second response")
        self._headers = []
        self._reason = b""

    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        # An interim response (100-199 but 101) ends its own message; the final one follows.
        self._interim = 100 <= status < 200 and status != 101
        if self.exchange is None:
            return
        if self._interim:
            self.exchange.on_interim(status, self._reason, self._headers)
        else:
            self.exchange.on_response_head(
                status, self._reason, self._headers, self.parser.should_keep_alive()
            )

    def on_body(self, body: bytes) -> None:
        if self.exchange is not None:
            self.exchange.on_response_body(body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        exchange, self.exchange = self.exchange, None
        if not self.parser.should_keep_alive():
            self.closed = True
        if exchange is not None:
            exchange.on_response_end()

    # -- use ---------------------------------------------------------------------------------
    def begin(self, exchange: Exchange) -> None:
        self.exchange = exchange
        self.got_bytes = False

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class UpstreamPool:
    """Idle keep-alive connections per (host, port, netns)."""

    def __init__(self, max_idle_per_key: int = 256) -> None:
        self._idle: dict[Key, list[UpstreamConn]] = defaultdict(list)
        self._max_idle = max_idle_per_key

    def take_idle(self, key: Key) -> UpstreamConn | None:
        """An open idle connection from the pool, if there is one."""
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                return conn
        return None

    async def get(self, key: Key) -> tuple[UpstreamConn, bool]:
        """A connection and whether it was reused from the pool."""
        conn = self.take_idle(key)
        if conn is not None:
            return conn, True
        return await self._connect(key), False

    async def _connect(self, key: Key) -> UpstreamConn:
        host, port, netns = key
        loop = asyncio.get_running_loop()
        kwargs: dict[str, Any] = {}
        if netns:
            sock = socket_in_netns(netns)
            sock.setblocking(False)
            try:
                await asyncio.wait_for(loop.sock_connect(sock, (host, port)), CONNECT_TIMEOUT_S)
            except BaseException:
                sock.close()
                raise
            kwargs["sock"] = sock
        else:
            kwargs["host"], kwargs["port"] = host, port
        transport, conn = await asyncio.wait_for(
            loop.create_connection(lambda: UpstreamConn(key), **kwargs), CONNECT_TIMEOUT_S
        )
        sock_obj = transport.get_extra_info("socket")
        if sock_obj is not None:
            sock_obj.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    async def connect(self, key: Key) -> UpstreamConn:
        """A new connection that never joins the pool (for protocol upgrades)."""
        return await self._connect(key)

    def put(self, conn: UpstreamConn) -> None:
        if conn.closed or conn.exchange is not None or conn.upgraded:
            conn.close()
            return
        if conn.feeding:
            # Put back from inside the read that ended its answer: the rest of that read may
            # hold an answer nobody asked for, so it joins the pool once the read is parsed.
            conn.returning = self
            return
        transport = conn.transport
        if transport is not None and not transport.is_reading():
            # Paused for a slow client that no longer owns it: the next one must be heard.
            transport.resume_reading()
        idle = self._idle[conn.key]
        if len(idle) >= self._max_idle:
            conn.close()
        else:
            idle.append(conn)

    def prune(self, live: set[Key]) -> None:
        """Close idle connections to replicas that left the table."""
        for key in list(self._idle):
            if key not in live:
                for conn in self._idle.pop(key):
                    conn.close()

    def close(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()
