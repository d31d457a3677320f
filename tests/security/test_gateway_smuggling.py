"""Whatever a replica sends, an answer reaches only the request it answers.

The replicas here misbehave on purpose: one ignores a GET's body and reads it as a second
request (stdlib ``http.server``, as user servers are often written), one sends two answers
to one request, one answers before reading the body and then reads the body as a request,
one sends half an answer while nobody asked. Every client checks it got its own answer:
the path it asked for, echoed back. Deployments have ``concurrency=1`` so that every request
goes over the same pooled upstream connection, where a stray answer would wait for the next.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import BinaryIO

import httpx
import pytest
import uvloop

from helpers.gateway import AUTH, KEY, RawServer, RunningGateway, answer, read_head, route
from helpers.platform import wait_for

SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: replica\r\n\r\n"


@pytest.fixture(params=["asyncio", "uvloop"])
def gw(request: pytest.FixtureRequest) -> Iterator[RunningGateway]:
    # Both loops: transports differ in when they deliver reads, and uvloop is what runs.
    running = RunningGateway(uvloop.new_event_loop() if request.param == "uvloop" else None)
    try:
        yield running
    finally:
        running.close()


@pytest.fixture
def raw() -> Iterator[Callable[[Callable[[socket.socket], None]], RawServer]]:
    made: list[RawServer] = []

    def make(serve: Callable[[socket.socket], None]) -> RawServer:
        made.append(RawServer(serve))
        return made[-1]

    yield make
    for server in made:
        server.close()


def _request(path: str, body: bytes = b"", method: str = "GET") -> bytes:
    head = (
        f"{method} /models/echo/production/sync{path} HTTP/1.1\r\nHost: gw\r\n"
        f"Authorization: Api-Key {KEY}\r\ncontent-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def _read_answer(f: BinaryIO) -> bytes:
    """One Content-Length framed answer's body from a buffered reader."""
    parsed = read_head(f)
    assert parsed is not None, "the gateway hung up"
    status, headers = parsed
    body = f.read(int(headers.get(b"content-length", b"0")))
    return status + b" " + body


def _inflight(gw: RunningGateway) -> int:
    """Requests the gateway has sent to replica r0 (read from the test's thread: the
    dispatcher is only ever created by the gateway's)."""
    d = gw.gateway._dispatchers.get("d1")
    return d.inflight.get("r0", 0) if d is not None else 0


def _queued(gw: RunningGateway) -> int:
    d = gw.gateway._dispatchers.get("d1")
    return len(d._waiters) if d is not None else 0


def _own(tag: str) -> bytes:
    return b"HTTP/1.1 200 OK /" + tag.encode()


def test_a_get_body_read_as_a_second_request_never_reaches_another_client(
    gw: RunningGateway,
) -> None:
    # The reported case: http.server answers the GET, then reads its body as a request and
    # answers that too; the second answer used to wait on the pooled connection for the next
    # client, and from there every client got the answer of the one before.
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # never reads a body, as GET handlers seldom do
            # The model's work: others queue for the one slot meanwhile.
            time.sleep(0.3 if self.path == "/slow" else 0.005)
            body = self.path.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        gw.table(route(server.server_address[1], concurrency=1))
        # First the plain sequence: V queues behind the GET, and is sent on the connection
        # the moment the GET is answered, before the replica answers the body.
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as a:
            a.sendall(_request("/slow", SMUGGLED))
            wait_for(lambda: _inflight(gw), 5, "the GET sent")
            with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as v:
                v.sendall(_request("/v"))
                wait_for(lambda: _queued(gw), 5, "V queued")
                assert _read_answer(a.makefile("rb")) == _own("slow")
                assert _read_answer(v.makefile("rb")) == _own("v")
        # Then many clients at once, half of them sending such GETs.
        wrong: list[tuple[str, bytes]] = []

        def client(name: str, smuggle: bool) -> None:
            with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
                f = s.makefile("rb")
                for i in range(20):
                    tag = f"{name}-{i}"
                    s.sendall(_request("/" + tag, SMUGGLED if smuggle else b""))
                    got = _read_answer(f)
                    if got != _own(tag):
                        wrong.append((tag, got))

        with ThreadPoolExecutor(8) as pool:
            jobs = [pool.submit(client, f"c{n}", n % 2 == 0) for n in range(8)]
            for job in jobs:
                job.result()
        assert wrong == []
    finally:
        server.shutdown()
        server.server_close()


def _serve_with_extra(conn: socket.socket) -> None:
    """Answer each request with its path, and but for ``/warm`` a second answer in the
    same write."""
    f = conn.makefile("rb")
    while (parsed := read_head(f)) is not None:
        line, headers = parsed
        f.read(int(headers.get(b"content-length", b"0")))
        path = line.split()[1]
        conn.sendall(answer(path) + (answer(b"/extra") if path != b"/warm" else b""))


def test_an_extra_answer_is_never_taken_for_the_next_request(
    gw: RunningGateway, raw: Callable[[Callable[[socket.socket], None]], RawServer]
) -> None:
    # Pipelined requests: the next one is sent upstream the moment the first is answered,
    # while the rest of that read (the extra answer) was still to be parsed.
    gw.table(route(raw(_serve_with_extra).port, concurrency=1))
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        f = s.makefile("rb")
        for i in range(5):
            s.sendall(_request("/warm"))  # leaves a connection in the pool
            assert _read_answer(f) == _own("warm")
            # The first is sent from the gateway's callbacks on the pooled connection, and
            # the second the moment its answer ends, before the rest of that read is parsed.
            s.sendall(_request(f"/a{i}") + _request(f"/b{i}"))
            assert (_read_answer(f), _read_answer(f)) == (_own(f"a{i}"), _own(f"b{i}"))
    wrong: list[tuple[str, bytes]] = []

    def client(name: str) -> None:
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
            f = s.makefile("rb")
            for i in range(10):
                tags = [f"{name}-{i}-{k}" for k in range(3)]
                s.sendall(b"".join(_request("/" + t) for t in tags))
                for t in tags:
                    got = _read_answer(f)
                    if got != _own(t):
                        wrong.append((t, got))

    with ThreadPoolExecutor(4) as pool:
        for job in [pool.submit(client, f"c{n}") for n in range(4)]:
            job.result()
    assert wrong == []


def _serve_before_body(conn: socket.socket) -> None:
    """Answer as soon as a head is in, never read bodies: they are read as the next request."""
    f = conn.makefile("rb")
    while (parsed := read_head(f)) is not None:
        conn.sendall(answer(parsed[0].split()[1]))


def test_an_answer_before_the_body_was_sent_ends_its_connection(
    gw: RunningGateway, raw: Callable[[Callable[[socket.socket], None]], RawServer]
) -> None:
    # The replica answers X on its head alone; the rest of X's body, which the gateway sends
    # after that answer, holds a request the replica answers too. V, queued behind X for the
    # one slot, used to get that answer on the connection X left in the pool.
    gw.table(route(raw(_serve_before_body).port, concurrency=1))
    # Past the first MiB, which the gateway reads before the request takes a slot.
    body = SMUGGLED[:-2] + b"x-pad: " + b"a" * (2 << 20) + b"\r\n\r\n"
    request = _request("/x", body, "POST")
    split = len(request) - len(body) + (1 << 20) + 1000
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as x:
        x.sendall(request[:split])
        assert _read_answer(x.makefile("rb")) == _own("x")
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as v:
            v.sendall(_request("/v"))
            wait_for(lambda: _queued(gw), 5, "V queued")
            x.sendall(request[split:])
            assert _read_answer(v.makefile("rb")) == _own("v")


def test_an_answer_nobody_asked_for_drops_the_connection(
    gw: RunningGateway, raw: Callable[[Callable[[socket.socket], None]], RawServer]
) -> None:
    # Half an answer arrives on an idle pooled connection: the next request's real answer
    # would be read as the rest of it. The connection must go, not be used again.
    sent = threading.Event()

    def serve(conn: socket.socket) -> None:
        f = conn.makefile("rb")
        while (parsed := read_head(f)) is not None:
            conn.sendall(answer(parsed[0].split()[1]))
            if not sent.is_set():
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\nhalf")
                sent.set()

    server = raw(serve)
    gw.table(route(server.port, concurrency=1))
    with httpx.Client(base_url=gw.url, headers=AUTH, timeout=10) as c:
        assert c.get("/models/echo/production/sync/first").text == "/first"
        assert sent.wait(5)
        key = ("127.0.0.1", server.port, None)
        idle = gw.gateway.pool._idle
        wait_for(lambda: all(c.closed for c in idle.get(key, ())), 5, "the connection dropped")
        assert c.get("/models/echo/production/sync/second").text == "/second"
    assert server.connections == 2
