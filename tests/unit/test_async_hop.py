"""The async workers' HTTP client (asyncq/hop.py) against a real asyncio server in-process
that answers as each case needs."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

import pytest

from kingpost.asyncq.hop import GatewayHop, HopError

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, list[bytes]], Awaitable[None]]


async def read_request(r: asyncio.StreamReader) -> bytes:
    head = await r.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + await r.readexactly(length)


async def serve(handler: Handler) -> tuple[asyncio.Server, int, list[bytes], list[int]]:
    requests: list[bytes] = []
    connections: list[int] = []

    async def on_connect(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            await handler(r, w, requests)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            w.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], requests, connections


def json_answers(count: int) -> Handler:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, seen: list[bytes]) -> None:
        for _ in range(count):
            seen.append(await read_request(r))
            body = b'{"ok": true}'
            w.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n")
            w.write(b"X-Thing: 1\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            await w.drain()

    return handler


HEADERS = [("authorization", "Api-Key k"), ("x-baseten-request-id", "r1")]


def test_answers_come_back_whole_on_one_kept_connection() -> None:
    async def main() -> None:
        server, port, seen, conns = await serve(json_answers(2))
        hop = GatewayHop("127.0.0.1", port, headers=[("x-every", "one")])
        for _ in range(2):
            status, headers, body = await hop.post("/models/m/deployment/d/predict", b"{}", HEADERS)
            assert (status, body) == (200, b'{"ok": true}')
            assert headers["x-thing"] == "1"  # names in lower case
        assert len(conns) == 1  # kept alive and reused
        assert seen[0].startswith(b"POST /models/m/deployment/d/predict HTTP/1.1\r\n")
        assert b"authorization: Api-Key k\r\n" in seen[0] and seen[0].endswith(b"\r\n\r\n{}")
        assert all(b"\r\nx-every: one\r\n" in request for request in seen)  # on each
        await hop.aclose()
        server.close()

    asyncio.run(main())


def test_a_chunked_answer_is_read_to_its_end() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, seen: list[bytes]) -> None:
        seen.append(await read_request(r))
        w.write(b"HTTP/1.1 500 Internal Server Error\r\ntransfer-encoding: chunked\r\n\r\n")
        w.write(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        await w.drain()

    async def main() -> None:
        server, port, _, _ = await serve(handler)
        hop = GatewayHop("127.0.0.1", port)
        assert await hop.post("/p", b"x", HEADERS) == (
            500,
            {"transfer-encoding": "chunked"},
            b"hello world",
        )
        await hop.aclose()
        server.close()

    asyncio.run(main())


def test_an_answer_in_pieces_is_put_together_and_a_cut_one_is_an_error() -> None:
    answer = b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\nx-a: b\r\n\r\nhello world"

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, seen: list[bytes]) -> None:
        seen.append(await read_request(r))
        for i in range(len(answer)):  # a byte at a time, each its own segment
            w.write(answer[i : i + 1])
            await w.drain()
            await asyncio.sleep(0.001)
        seen.append(await read_request(r))
        w.write(answer[:-3])  # then the connection closes, 3 bytes short
        await w.drain()

    async def main() -> None:
        server, port, _, conns = await serve(handler)
        hop = GatewayHop("127.0.0.1", port)
        assert await hop.post("/p", b"{}", HEADERS) == (
            200,
            {"content-length": "11", "x-a": "b"},
            b"hello world",
        )
        with pytest.raises(
            HopError, match="EOFError: the gateway closed the connection mid-answer"
        ):
            await hop.post("/p", b"{}", HEADERS)
        assert len(conns) == 1 and hop._idle == []
        server.close()

    asyncio.run(main())


def test_a_line_break_in_a_header_is_refused_before_anything_is_sent() -> None:
    async def main() -> None:
        hop = GatewayHop("127.0.0.1", 9)  # nothing is sent: no connection is made
        for value in ("r1\r\nx-evil: 1", "r1\rx-evil: 1", "r1\nx-evil: 1", "r\u20ac"):
            with pytest.raises(HopError, match=r"ValueError: a line break|UnicodeEncodeError"):
                await hop.post("/p", b"{}", [("x-baseten-request-id", value)])
            with pytest.raises(HopError, match=r"ValueError: a line break|UnicodeEncodeError"):
                await hop.post(f"/p/{value}", b"{}", [])  # in the path
            with pytest.raises((ValueError, UnicodeEncodeError)):  # the ones sent every time
                GatewayHop("127.0.0.1", 9, headers=[("authorization", value)])
        assert hop._idle == []

    asyncio.run(main())


def test_an_interim_answer_is_skipped_and_a_stray_one_not_kept() -> None:
    """The gateway passes on 1xx answers (103 Early Hints): the run's answer is the one
    after. An answer with more after it (a second message) is not in step: not reused,
    so the next run cannot read this one's leftovers."""
    final = b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\nx-a: final\r\n\r\nresult-A"

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, seen: list[bytes]) -> None:
        seen.append(await read_request(r))
        w.write(b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\n")
        await w.drain()
        await asyncio.sleep(0.05)
        w.write(final)
        await w.drain()
        seen.append(await read_request(r))
        w.write(final.replace(b"result-A", b"result-B") + final)  # one answer too many
        await w.drain()
        await asyncio.sleep(0.2)

    async def main() -> None:
        server, port, _, conns = await serve(handler)
        hop = GatewayHop("127.0.0.1", port)
        status, headers, body = await hop.post("/p", b"{}", HEADERS)
        assert (status, body, headers.get("x-a"), "link" in headers) == (
            200,
            b"result-A",
            "final",
            False,
        )
        assert await hop.post("/p", b"{}", HEADERS) == (
            200,
            {"content-length": "8", "x-a": "final"},
            b"result-B",
        )
        assert hop._idle == [] and len(conns) == 1  # the second was not kept
        server.close()

    asyncio.run(main())


def test_an_event_stream_is_left_unread_and_its_connection_closed() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, seen: list[bytes]) -> None:
        seen.append(await read_request(r))
        w.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n")
        w.write(b"transfer-encoding: chunked\r\n\r\n5\r\ndata:\r\n")
        await w.drain()
        await asyncio.sleep(30)  # a stream that never ends

    async def main() -> None:
        server, port, _, _ = await serve(handler)
        hop = GatewayHop("127.0.0.1", port, timeout=5)
        status, headers, body = await hop.post("/p", b"{}", HEADERS)
        assert (status, body) == (200, b"")
        assert headers["content-type"] == "text/event-stream"
        assert hop._idle == []  # not kept
        server.close()

    asyncio.run(main())


def test_a_connection_the_gateway_closed_while_idle_is_not_reused() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, seen: list[bytes]) -> None:
        await json_answers(1)(r, w, seen)  # then the connection closes (finally: close)

    async def main() -> None:
        server, port, _, conns = await serve(handler)
        hop = GatewayHop("127.0.0.1", port)
        assert (await hop.post("/p", b"{}", HEADERS))[0] == 200
        await asyncio.sleep(0.1)  # the close reaches this side
        assert (await hop.post("/p", b"{}", HEADERS))[0] == 200
        assert len(conns) == 2
        await hop.aclose()
        server.close()

    asyncio.run(main())


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("closed-before-answering", "EOFError: the gateway closed the connection"),
        ("hangs", "ReadTimeout"),
        ("garbage", "RemoteProtocolError"),
    ],
)
def test_a_failed_exchange_is_a_hop_error_saying_how(case: str, message: str) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, seen: list[bytes]) -> None:
        seen.append(await read_request(r))
        if case == "hangs":
            await asyncio.sleep(30)
        elif case == "garbage":
            w.write(b"NOT HTTP AT ALL\r\n\r\n")
            await w.drain()

    async def main() -> None:
        server, port, _, _ = await serve(handler)
        hop = GatewayHop("127.0.0.1", port, timeout=0.5)
        with pytest.raises(HopError) as info:
            await hop.post("/p", b"{}", HEADERS)
        assert str(info.value).startswith(message), str(info.value)
        assert hop._idle == []
        server.close()

    asyncio.run(main())


def test_nothing_listening_is_a_hop_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there

    async def main() -> None:
        with pytest.raises(HopError) as info:
            await GatewayHop("127.0.0.1", port).post("/p", b"{}", HEADERS)
        assert "ConnectionRefusedError" in str(info.value)

    asyncio.run(main())
