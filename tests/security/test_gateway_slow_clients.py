"""Slow clients and silent replicas hold nothing others need, and not for long.

Bodies that trickle in hold only their own connection (read before the request takes a
replica slot), and are cut with a 408 when they come slower than the body timeout and the
minimum rate allow; a replica that never begins its answer gets the client a 504.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from helpers.gateway import AUTH, KEY, RawServer, RunningGateway, answer, read_head, route
from helpers.platform import wait_for
from kingpost.gateway.table import RoutingTable

PREDICT = "/models/echo/environments/production/predict"


def _echo(conn: socket.socket) -> None:
    """Answer each request with its body (hang, never answering, when the body is ``hang``)."""
    f = conn.makefile("rb")
    while (parsed := read_head(f)) is not None:
        _line, headers = parsed
        if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            body = b""
            while (size_line := f.readline().strip()) and (size := int(size_line, 16)):
                body += f.read(size)
                f.readline()
            if not size_line:
                return  # the gateway hung up in the middle of the body
            f.readline()
        else:
            body = f.read(int(headers.get(b"content-length", b"0")))
        if body == b"hang":
            f.read()  # until the gateway hangs up
            return
        conn.sendall(answer(body))


@pytest.fixture
def echo() -> Iterator[RawServer]:
    server = RawServer(_echo)
    try:
        yield server
    finally:
        server.close()


def _head(extra: str) -> bytes:
    return (
        f"POST {PREDICT} HTTP/1.1\r\nHost: gw\r\nAuthorization: Api-Key {KEY}\r\n{extra}\r\n"
    ).encode()


def test_trickling_bodies_hold_no_replica_slot(echo: RawServer) -> None:
    # 20 clients send a body a byte at a time: small ones, large ones and chunked ones.
    # Each used to take one of the deployment's 2 slots and keep it while its body came.
    gw = RunningGateway()
    slow: list[socket.socket] = []
    try:
        gw.table(route(echo.port, concurrency=2))
        for n in range(20):
            s = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
            slow.append(s)
            if n % 3 == 0:
                s.sendall(_head("content-length: 5000\r\n") + b"a")
            elif n % 3 == 1:
                s.sendall(_head(f"content-length: {50 << 20}\r\n") + b"a")
            else:
                s.sendall(_head("transfer-encoding: chunked\r\n") + b"1\r\na\r\n")
        with httpx.Client(base_url=gw.url, headers=AUTH, timeout=10) as c:
            for s in slow:  # a second byte from each: they are all well under way
                s.sendall(b"b" if slow.index(s) % 3 != 2 else b"1\r\nb\r\n")
            started = time.monotonic()
            r = c.post(PREDICT, content=b"normal")
            assert (r.status_code, r.text) == (200, "normal")
            assert time.monotonic() - started < 5
    finally:
        for s in slow:
            s.close()
        gw.close()


def test_a_body_slower_than_the_minimum_rate_is_cut_with_408(echo: RawServer) -> None:
    gw = RunningGateway(body_timeout_s=1.0, body_min_rate=1000, sweep_s=0.1)
    try:
        gw.table(route(echo.port, concurrency=2))
        # At a fair rate a body may take longer than the timeout: every byte buys time.
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
            s.sendall(_head("content-length: 3000\r\n"))
            for _ in range(15):
                s.sendall(b"x" * 200)  # 2000 bytes/s for 1.5 s: allowed 1 s + 3 s
                time.sleep(0.1)
            f = s.makefile("rb")
            parsed = read_head(f)
            assert parsed is not None and parsed[0] == b"HTTP/1.1 200 OK"
            assert f.read(3000) == b"x" * 3000
        # A byte every 0.3 s (a small body, and a chunked one): cut after about 1 s.
        for head, byte in (
            (_head("content-length: 100\r\n"), b"a"),
            (_head("transfer-encoding: chunked\r\n"), b"1\r\na\r\n"),
        ):
            with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
                s.sendall(head)
                started = time.monotonic()
                s.settimeout(0.3)
                data = b""
                while time.monotonic() - started < 5:
                    try:
                        chunk = s.recv(4096)
                    except TimeoutError:
                        s.sendall(byte)
                        continue
                    if not chunk:
                        break
                    data += chunk
                assert time.monotonic() - started < 3
                status, _, rest = data.partition(b"\r\n")
                assert status == b"HTTP/1.1 408 Request Timeout", data
                error = json.loads(rest.partition(b"\r\n\r\n")[2])
                assert error["code"] == "request_timeout"
                assert "too slowly" in error["error"] and "1000 bytes" in error["error"]
    finally:
        gw.close()


def test_a_replica_that_never_answers_gets_the_client_a_504(echo: RawServer) -> None:
    gw = RunningGateway(sweep_s=0.1)
    try:
        gw.table(route(echo.port, concurrency=1, response_timeout_s=0.5))
        with httpx.Client(base_url=gw.url, headers=AUTH, timeout=10) as c:
            assert c.post(PREDICT, content=b"warm").text == "warm"  # on the fast path next
            for _ in range(2):
                started = time.monotonic()
                r = c.post(PREDICT, content=b"hang")
                assert r.status_code == 504, r.text
                assert r.json()["code"] == "gateway_timeout"
                assert "0.5s" in r.json()["error"]
                assert 0.5 <= time.monotonic() - started < 3
                # The slot came back and the silent connection is gone: the next answer is
                # the next request's own.
                assert c.post(PREDICT, content=b"after").text == "after"
        wait_for(lambda: echo.connections >= 3, 5, "a new connection after each 504")
    finally:
        gw.close()


def test_the_response_timeout_counts_from_the_end_of_the_body(echo: RawServer) -> None:
    # An upload that takes longer than the response timeout is not a silent replica.
    gw = RunningGateway(sweep_s=0.1)
    try:
        gw.table(route(echo.port, concurrency=1, response_timeout_s=1.0))
        body = b"u" * (3 << 20)
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
            s.sendall(_head(f"content-length: {len(body)}\r\n"))
            for i in range(0, len(body), 128 << 10):  # 3 MiB over about 2.4 s
                s.sendall(body[i : i + (128 << 10)])
                time.sleep(0.1)
            f = s.makefile("rb")
            parsed = read_head(f)
            assert parsed is not None and parsed[0] == b"HTTP/1.1 200 OK", parsed
            assert f.read(len(body)) == body
    finally:
        gw.close()


def test_the_response_timeout_travels_with_the_table() -> None:
    # Gateway workers get the table as JSON over their control sockets.
    table = RoutingTable(version=1, deployments={"d1": route(1, response_timeout_s=2.5)})
    again = RoutingTable.from_json(json.loads(json.dumps(table.to_json())))
    assert again.deployments["d1"].response_timeout_s == 2.5
