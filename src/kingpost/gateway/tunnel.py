"""The raw tunnel a protocol upgrade (WebSocket) becomes once the replica answers 101.

While a handshake waits for its replica (a queue, a new connection), the bytes the client
sends after it are held here (:func:`hold_for_tunnel`), reading paused past
:data:`HELD_LIMIT`. After the 101, :func:`tunnel` pipes bytes both ways unparsed until
either side closes; each direction's full write buffer pauses reading on the other side,
and a client's half-close is passed on (:func:`pass_half_close`); the bytes piped count as
the request's (``Request.body_bytes`` in, ``Request.bytes_out`` out: its access line and the
metrics). The handshake itself is forwarded like any request (``forward.py``).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kingpost.gateway.proxy import ClientConn, Request
    from kingpost.gateway.upstream import UpstreamConn

__all__ = ["HELD_LIMIT", "hold_for_tunnel", "pass_half_close", "tunnel"]

HELD_LIMIT = 64 * 1024
"""Bytes a client may send behind a handshake that still waits before reading pauses."""


def hold_for_tunnel(client: ClientConn, data: bytes) -> None:
    """Keep what the client sent after its handshake until the tunnel opens; past
    :data:`HELD_LIMIT` stop reading (the client is sending before any 101)."""
    req = client.tunnel
    assert req is not None
    if not req.complete and data:
        # The body the upgrade request declared is part of it, sent with it whatever the
        # replica answers; tunnel bytes are only those after it.
        assert req.content_length is not None and client.current is req
        owed = int(req.content_length) - req.body_bytes
        client.on_body(data[:owed])
        if len(data) < owed:
            return
        client.on_message_complete()
        data = data[owed:]
    buf = req.tunnel_buf
    buf += data
    if len(buf) > HELD_LIMIT and not client.paused_reading and client.transport is not None:
        client.paused_reading = True
        client.transport.pause_reading()


def pass_half_close(client: ClientConn) -> bool:
    """A client half-closed a live tunnel: pass it on, and let the replica decide when to
    end. What ``eof_received`` returns (False: close the connection)."""
    upstream = client.upstream
    transport = upstream.transport if upstream is not None else None
    if transport is not None and transport.can_write_eof():
        transport.write_eof()
        return True
    return False


async def tunnel(client: ClientConn, req: Request, conn: UpstreamConn) -> None:
    """Pipe raw bytes both ways until either side closes (WebSocket after 101)."""
    transport = client.transport
    assert transport is not None and conn.transport is not None
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def finish() -> None:
        if not done.done():
            done.set_result(None)

    # The session's bytes count as the request's, both ways (its access line, the metrics).
    def to_client(data: bytes) -> None:
        transport.write(data)
        req.bytes_out += len(data)

    def to_replica(data: bytes) -> None:
        conn.write(data)
        req.body_bytes += len(data)

    conn.on_close = client.on_close = finish
    conn.raw_sink = to_client
    conn.feeder = transport  # the replica's full buffer pauses reading from the client
    if conn.leftover:
        to_client(conn.leftover)
    client.raw_sink = to_replica
    client.tunnel = None
    if req.tunnel_buf:
        to_replica(bytes(req.tunnel_buf))
    if client.paused_reading:
        client.paused_reading = False
        transport.resume_reading()
    if transport.is_closing() or conn.transport.is_closing():
        finish()
    try:
        await done
    finally:
        conn.close()
        transport.close()
