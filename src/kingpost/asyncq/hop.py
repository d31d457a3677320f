"""The async workers' HTTP/1.1 client for their one hop: a run, POSTed to the gateway on
loopback.

httpx's client cost 1.4 ms of CPU per request here (its request and response models,
httpcore's pool, anyio), against 0.2 ms for the same exchange framed by h11 (httpx's own
parser) over asyncio streams; with a trivial model the control plane's CPU is what async
throughput waits for (bench/README.md, "Async"). This client does only what the hop needs:
plain HTTP to one address, keep-alive connections reused one request at a time, a connect
timeout and a timeout over the whole exchange, and an answer of ``text/event-stream`` left
unread (its connection closed).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import h11

__all__ = ["GatewayHop", "HopError"]

_READ = 65536


class HopError(Exception):
    """The exchange failed before a whole answer came back (the message says how)."""


@dataclass
class _Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    http: h11.Connection = field(default_factory=lambda: h11.Connection(h11.CLIENT))

    def usable(self) -> bool:
        """Idle and still open (the gateway closes idle connections after a while)."""
        return not self.reader.at_eof() and not self.writer.is_closing()

    def close(self) -> None:
        self.writer.close()


class GatewayHop:
    def __init__(
        self, host: str, port: int, *, connect_timeout: float = 5.0, timeout: float = 3600.0
    ) -> None:
        self.host, self.port = host, port
        self.connect_timeout, self.timeout = connect_timeout, timeout
        self._idle: list[_Conn] = []

    async def post(
        self, path: str, body: bytes, headers: Sequence[tuple[str, str]]
    ) -> tuple[int, dict[str, str], bytes]:
        """POST ``body`` to ``path``: the answer's status, headers (names in lower case) and
        body (empty, unread, for ``text/event-stream``). Raises :class:`HopError`."""
        conn = None
        try:
            async with asyncio.timeout(self.timeout):
                conn = await self._take()
                status, got, data, reusable = await self._exchange(conn, path, body, headers)
        except (OSError, EOFError, h11.ProtocolError, TimeoutError) as exc:
            if conn is not None:
                conn.close()
            kind = "ReadTimeout" if isinstance(exc, TimeoutError) else type(exc).__name__
            raise HopError(f"{kind}: {exc}" if str(exc) else kind) from exc
        except BaseException:  # cancelled: the connection is mid-exchange
            if conn is not None:
                conn.close()
            raise
        if reusable:
            conn.http.start_next_cycle()
            self._idle.append(conn)
        else:
            conn.close()
        return status, got, data

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
        for conn in idle:
            with contextlib.suppress(Exception):
                await conn.writer.wait_closed()

    async def _take(self) -> _Conn:
        while self._idle:
            conn = self._idle.pop()
            if conn.usable():
                return conn
            conn.close()
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port), self.connect_timeout
        )
        return _Conn(reader, writer)

    async def _exchange(
        self, conn: _Conn, path: str, body: bytes, headers: Sequence[tuple[str, str]]
    ) -> tuple[int, dict[str, str], bytes, bool]:
        http = conn.http
        request = h11.Request(
            method="POST",
            target=path,
            headers=[
                ("host", f"{self.host}:{self.port}"),
                ("content-length", str(len(body))),
                *headers,
            ],
        )
        conn.writer.write(
            http.send(request) + http.send(h11.Data(data=body)) + http.send(h11.EndOfMessage())
        )
        await conn.writer.drain()
        status, got, chunks = 0, {}, []
        while True:
            event = http.next_event()
            if event is h11.NEED_DATA:
                data = await conn.reader.read(_READ)
                if not data and http.their_state is h11.SEND_RESPONSE:
                    raise EOFError("the gateway closed the connection before answering")
                http.receive_data(data)
            elif isinstance(event, h11.Response):
                status = event.status_code
                got = {k.decode("latin-1"): v.decode("latin-1") for k, v in event.headers}
                ctype = got.get("content-type", "").split(";")[0].strip().lower()
                if ctype == "text/event-stream":
                    return status, got, b"", False  # refused unread: never reused
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                reusable = http.our_state is h11.DONE and http.their_state is h11.DONE
                return status, got, b"".join(chunks), reusable
            elif isinstance(event, h11.ConnectionClosed):
                raise EOFError("the gateway closed the connection mid-answer")
