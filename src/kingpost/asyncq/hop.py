"""The async workers' HTTP/1.1 client for their one hop: a run, POSTed to the gateway on
loopback.

httpx's client cost 1.4 ms of CPU per request here (its request and response models,
httpcore's pool, anyio), and h11 over asyncio streams 0.2 ms; this one, an asyncio
protocol that writes the request as one buffer and parses the answer with httptools (the
gateway's own parser), less again. With a trivial model the control plane's CPU is what
async throughput waits for, and the hop's answers are read on the same loop as the
workers' settles (bench/README.md, "Async"). It does only what the hop needs: plain
HTTP to one address, keep-alive connections reused one request at a time, a connect
timeout and a timeout over the whole exchange, and an answer of ``text/event-stream``
left unread (its connection closed). The gateway frames every answer (a length, or
chunks), so an answer that ends with its connection is an error here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import httptools

from kingpost.asyncq.outcome import READ_TIMEOUT

__all__ = ["GatewayHop", "HopError", "RemoteProtocolError"]


class HopError(Exception):
    """The exchange failed before a whole answer came back (the message says how)."""


class RemoteProtocolError(Exception):
    """The gateway's answer was not HTTP/1.1 this client can read."""


class _Conn(asyncio.Protocol):
    """One kept-alive connection to the gateway, one exchange at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._answer: asyncio.Future[None] | None = None
        self.status = 0
        self.headers: dict[str, str] = {}
        self.chunks: list[bytes] = []
        self.streamed = False
        self.complete = False
        self.lost = False
        self._begun = False
        """Some of this exchange's answer has come."""
        self._keep_alive = False
        self._stray = False
        """A message came after the answer: never reused."""

    # -- asyncio.Protocol -----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._answer is None or self._answer.done():
            if not self.streamed:  # nothing asked: not a connection to reuse
                self.close()
            return
        self._begun = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(RemoteProtocolError(str(exc) or type(exc).__name__))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if exc is not None:
            self._fail(exc)
        elif self._begun:
            self._fail(EOFError("the gateway closed the connection mid-answer"))
        else:
            self._fail(EOFError("the gateway closed the connection before answering"))

    # -- httptools callbacks --------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self._answer is None or self._answer.done():
            self._stray = True  # a message after the answer: the connection is not in step
        if not self._stray:  # the answer (after any 1xx), its headers and body alone
            self.headers, self.chunks = {}, []

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._stray:
            self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        if self._stray:
            return
        self.status = self._parser.get_status_code()
        ctype = self.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "text/event-stream" and not self._interim():
            self.streamed = True  # refused unread: never reused
            self._resolve()

    def on_body(self, body: bytes) -> None:
        if not self.streamed and not self._stray:
            self.chunks.append(body)

    def on_message_complete(self) -> None:
        if self._stray or self._interim():  # a 103 Early Hints: the answer is still to come
            return
        self.complete = True
        self._keep_alive = self._parser.should_keep_alive()  # only true until it returns
        self._resolve()

    def _interim(self) -> bool:
        """The message is an informational (1xx) one, which the gateway passes on; 101 is
        never asked for here."""
        return 100 <= self.status < 200

    # -- the exchange ---------------------------------------------------------------------
    def usable(self) -> bool:
        """Idle and still open (the gateway closes idle connections after a while)."""
        t = self.transport
        return not self.lost and t is not None and not t.is_closing()

    def reusable(self) -> bool:
        return self.complete and not self.streamed and self._keep_alive and not self._stray

    async def exchange(self, request: bytes) -> None:
        assert self.transport is not None
        self.status, self.headers, self.chunks = 0, {}, []
        self.complete = self._begun = self._keep_alive = False
        self._answer = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        await self._answer

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _resolve(self) -> None:
        if self._answer is not None and not self._answer.done():
            self._answer.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(exc)


class GatewayHop:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        connect_timeout: float = 5.0,
        timeout: float = 3600.0,
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        """``headers``: sent with every request (checked and encoded here, once)."""
        self.host, self.port = host, port
        self.connect_timeout, self.timeout = connect_timeout, timeout
        self._idle: list[_Conn] = []
        self._fixed = f"host: {host}:{port}\r\n".encode("latin-1") + self._lines(headers)

    async def post(
        self, path: str, body: bytes, headers: Sequence[tuple[str, str]]
    ) -> tuple[int, dict[str, str], bytes]:
        """POST ``body`` to ``path``: the answer's status, headers (names in lower case) and
        body (empty, unread, for ``text/event-stream``). Raises :class:`HopError`."""
        conn = None
        try:
            request = self._request(path, body, headers)
            async with asyncio.timeout(self.timeout):
                conn = await self._take()
                await conn.exchange(request)
        except (OSError, EOFError, RemoteProtocolError, TimeoutError, ValueError) as exc:
            if conn is not None:
                conn.close()
            kind = type(exc).__name__
            if isinstance(exc, TimeoutError):  # sent, or still connecting
                kind = READ_TIMEOUT if conn is not None else "ConnectTimeout"
            raise HopError(f"{kind}: {exc}" if str(exc) else kind) from exc
        except BaseException:  # cancelled: the connection is mid-exchange
            if conn is not None:
                conn.close()
            raise
        answer = b"" if conn.streamed else b"".join(conn.chunks)
        if conn.reusable():
            self._idle.append(conn)
        else:
            conn.close()
        return conn.status, conn.headers, answer

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
        await asyncio.sleep(0)  # let the transports finish closing

    def _request(self, path: str, body: bytes, headers: Sequence[tuple[str, str]]) -> bytes:
        if "\r" in path or "\n" in path:  # UnicodeEncodeError below is one too
            raise ValueError(f"a line break in the hop's path or a header: {path!r}")
        return b"".join(
            (
                f"POST {path} HTTP/1.1\r\n".encode("latin-1"),
                self._fixed,
                b"content-length: %d\r\n" % len(body),
                self._lines(headers),
                b"\r\n",
                body,
            )
        )

    @staticmethod
    def _lines(headers: Sequence[tuple[str, str]]) -> bytes:
        """``name: value`` lines; a line break in either is refused (ValueError: a
        character outside latin-1 is one too)."""
        text = "".join(f"{name}: {value}\r\n" for name, value in headers)
        if text.count("\r") != len(headers) or text.count("\n") != len(headers):
            raise ValueError(f"a line break in the hop's path or a header: {headers!r}")
        return text.encode("latin-1")

    async def _take(self) -> _Conn:
        while self._idle:
            conn = self._idle.pop()
            if conn.usable():
                return conn
            conn.close()
        loop = asyncio.get_running_loop()
        _, conn = await asyncio.wait_for(
            loop.create_connection(_Conn, self.host, self.port), self.connect_timeout
        )
        return conn
