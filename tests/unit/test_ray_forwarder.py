"""The Ray node's forwarder (``_ray_node._Forwarder``): what the gateway's connections to
a replica on another node pass through. Real sockets on loopback, a real upstream."""

from __future__ import annotations

import asyncio
import errno
import socket
import threading
from collections.abc import Iterator

import pytest

from kingpost.engines._ray_node import _Forwarder
from kingpost.engines.base import Endpoint


@pytest.fixture(params=["asyncio", "uvloop"], autouse=True)
def event_loop_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The forwarder's loop as asyncio makes it, and as uvloop does: Ray's workers run
    uvloop, whose transports are not asyncio.Transport subclasses."""
    if request.param == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        monkeypatch.setattr(asyncio, "new_event_loop", uvloop.new_event_loop)
    return str(request.param)


@pytest.fixture
def upstream() -> Iterator[int]:
    """A server that answers each connection with everything it read, reversed, once
    the client half-closes (so an answer can only come after the end of the request)."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            got = bytearray()
            while chunk := conn.recv(65536):
                got += chunk
            conn.sendall(bytes(reversed(got)))

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield server.getsockname()[1]
    stop.set()
    server.close()


def _exchange(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)  # the end of the request reaches the upstream
        out = bytearray()
        while chunk := conn.recv(65536):
            out += chunk
        return bytes(out)


def test_bytes_go_both_ways_and_a_half_close_passes_through(upstream: int) -> None:
    fwd = _Forwarder("127.0.0.1", lambda: Endpoint("127.0.0.1", upstream))
    try:
        assert _exchange(fwd.port, b"hello") == b"olleh"
        big = bytes(range(256)) * 40_000  # ~10 MB: buffers fill, reading pauses and resumes
        assert _exchange(fwd.port, big) == bytes(reversed(big))
        answers = []
        threads = [
            threading.Thread(target=lambda i=i: answers.append(_exchange(fwd.port, b"%d" % i)))
            for i in range(10, 30)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert sorted(answers) == sorted(bytes(reversed(b"%d" % i)) for i in range(10, 30))
    finally:
        fwd.close()


def _closed_without_an_answer(port: int) -> bool:
    """Closed (or reset: the request was never read) before a byte of an answer, which the
    gateway takes as a connection failure and retries on another replica."""
    try:
        return _exchange(port, b"GET / HTTP/1.1\r\n\r\n") == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except OSError as exc:  # closed before our half-close: "not connected"
        return exc.errno == errno.ENOTCONN


def test_no_replica_closes_the_connection_before_any_byte() -> None:
    fwd = _Forwarder("127.0.0.1", lambda: None)
    try:
        assert _closed_without_an_answer(fwd.port)
    finally:
        fwd.close()


def test_a_refused_upstream_closes_the_connection_before_any_byte() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]  # bound, not listening: refused
        fwd = _Forwarder("127.0.0.1", lambda: Endpoint("127.0.0.1", dead))
        try:
            assert _closed_without_an_answer(fwd.port)
        finally:
            fwd.close()
