"""The gateway in-process on a real event loop, in front of real upstream servers."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time as _time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import uvloop

from helpers.gateway import AUTH, KEY, RunningGateway
from helpers.platform import free_port, raw_exchange, wait_for
from helpers.upstream import Upstream
from helpers.wsraw import RawWebSocket, handshake
from kingpost.gateway.dispatch import Dispatcher
from kingpost.gateway.proxy import PIPELINE_LIMIT
from kingpost.gateway.server import Gateway
from kingpost.gateway.table import (
    DeploymentRoute,
    DeploymentState,
    ModelRoute,
    RoutingTable,
)
from kingpost.gateway.table import (
    Upstream as Up,
)

# The shared in-process gateway (``helpers.gateway``), as this file and its neighbours name it.
Running = RunningGateway


def route(*ups: Upstream | int, **kw: object) -> DeploymentRoute:
    upstreams = tuple(
        Up(f"r{i}", "127.0.0.1", u if isinstance(u, int) else u.port) for i, u in enumerate(ups)
    )
    state = DeploymentState.SERVING if upstreams else DeploymentState.WAKING
    base = DeploymentRoute("d1", "m1", "/echo", state, upstreams, concurrency=64)
    return replace(base, **kw)  # type: ignore[arg-type]


def test_predict_sync_request_id_and_auth_stripped(gw: Running, up: Upstream) -> None:
    gw.table(route(up, predict_path="/inspect"))
    with httpx.Client(base_url=gw.url, headers=AUTH) as c:
        r = c.post("/models/echo/environments/production/predict?x=1", content=b"abc")
        seen = r.json()
        assert seen["path"] == "/inspect?x=1" and seen["length"] == 3
        assert seen["authorization"] is None
        assert seen["request_id"] == r.headers["x-baseten-request-id"]
        # Generated ids: 32 hex digits, different on every request.
        ids = {
            c.post("/models/echo/environments/production/predict", content=b"x").headers[
                "x-baseten-request-id"
            ]
            for _ in range(20)
        } | {seen["request_id"]}
        assert len(ids) == 21
        assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids), ids
        r = c.get(
            "/models/m1/deployment/d1/sync/inspect?q=2", headers={"X-Baseten-Request-Id": "abc-1"}
        )
        assert r.json()["path"] == "/inspect?q=2" and r.json()["request_id"] == "abc-1"
        assert r.headers["x-baseten-request-id"] == "abc-1"
        r = c.get("/models/m1/production/sync/teapot")
        assert (r.status_code, r.text) == (418, "I'm a teapot")
        r = c.get("/models/m1/production/sync/nowhere")
        assert r.status_code == 404 and r.json() == {"detail": "Not Found"}
        r = c.post(
            "/environments/production/predict", content=b"x", headers={"Host": "model-m1.localhost"}
        )
        assert r.json()["path"] == "/inspect"


def test_errors_are_json_with_request_ids(gw: Running, up: Upstream) -> None:
    # Before the control plane's first table the gateway cannot judge keys: it
    # says it is starting (retryable) rather than calling a valid key unknown.
    r = httpx.post(f"{gw.url}/models/echo/production/predict", headers=AUTH)
    assert r.status_code == 503 and r.json()["code"] == "starting"
    gw.table(route(up))
    with httpx.Client(base_url=gw.url) as c:
        for headers in ({}, {"Authorization": "Api-Key nope"}, {"Authorization": "Basic " + KEY}):
            r = c.post("/models/echo/production/predict", headers=headers)
            assert r.status_code == 401 and r.json()["code"] == "unauthorized"
            assert r.headers["x-baseten-request-id"]
        r = c.post("/models/other/production/predict", headers=AUTH)
        assert r.status_code == 404 and "other" in r.json()["error"]
        r = c.post("/models/echo/environments/staging/predict", headers=AUTH)
        assert r.status_code == 404 and "staging" in r.json()["error"]
        r = c.post("/nothing", headers=AUTH)
        assert r.status_code == 404
    gw.table(route(up, state=DeploymentState.INACTIVE, message="deployment d1 is deactivated"))
    r = httpx.post(f"{gw.url}/models/echo/production/predict", headers=AUTH)
    assert r.status_code == 404 and r.json()["error"] == "deployment d1 is deactivated"


def test_the_gateways_own_answers_to_head_have_no_body(gw: Running, up: Upstream) -> None:
    """Its JSON body after a HEAD answer's head (RFC 9110 9.3.2: there is none) was read by
    a kept-alive client as the start of its next answer."""
    gw.table(route(up))
    with httpx.Client(base_url=gw.url) as c:
        for path, headers, status in [
            ("/models/echo/production/predict", {}, 401),
            ("/models/other/production/predict", AUTH, 404),
        ]:
            r = c.head(path, headers=headers)
            assert r.status_code == status and r.content == b""
            assert int(r.headers["content-length"]) > 0  # what a GET would get
            r = c.post("/models/echo/production/predict", content=b"next", headers=AUTH)
            assert r.status_code == 200 and r.text == "next"  # on the same connection


def test_a_refusal_that_leaves_the_body_unread_says_the_connection_ends(gw: Running) -> None:
    gw.table(route(free_port()))
    head = (
        b"POST /models/echo/production/predict HTTP/1.1\r\nHost: x\r\n"
        b"Content-Length: 2000000\r\n\r\n"  # past the buffer: refused before it is read
    )
    answer = raw_exchange(gw.port, head + b"x" * 1000)
    assert answer.startswith(b"HTTP/1.1 401 ")
    assert b"\r\nconnection: close\r\n" in answer.split(b"\r\n\r\n")[0] + b"\r\n"


def test_streaming_is_not_buffered(gw: Running, up: Upstream) -> None:
    gw.table(route(up, predict_path="/gated-stream"))
    with (
        httpx.Client(base_url=gw.url, headers=AUTH, timeout=15) as c,
        c.stream("POST", "/models/echo/production/predict") as r,
    ):
        assert r.headers["content-type"] == "text/event-stream"
        chunks = r.iter_raw()
        first = next(chunks)  # arrives while the upstream still holds the rest back
        assert first == b"data: 0\n\n"
        up.gate.set()
        assert b"".join(chunks) == b"data: 1\n\n"


def test_sse_of_100_events_and_1mb_upload(gw: Running, up: Upstream) -> None:
    gw.table(route(up, predict_path="/inspect"))
    body = os.urandom(1024 * 1024)
    with httpx.Client(base_url=gw.url, headers=AUTH, timeout=30) as c:
        seen = c.post("/models/echo/production/predict", content=body).json()
        assert seen["length"] == len(body) and seen["sha256"] == hashlib.sha256(body).hexdigest()

        def chunks() -> Iterator[bytes]:
            for i in range(0, len(body), 65536):
                yield body[i : i + 65536]

        seen = c.post("/models/echo/production/predict", content=chunks()).json()
        assert seen["sha256"] == hashlib.sha256(body).hexdigest()
        text = c.get("/models/echo/production/sync/sse?n=100").text
        assert text.count("data: ") == 100


def test_concurrency_limit_and_full_queue(gw: Running, up: Upstream) -> None:
    gw.table(route(up, predict_path="/slow?s=0.5", concurrency=1, queue_limit=1))
    url = f"{gw.url}/models/echo/production/predict"
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(httpx.post, url, headers=AUTH, timeout=10) for _ in range(3)]
        codes = sorted(f.result().status_code for f in futures)
    assert codes == [200, 200, 429]
    assert up.requests == 2


def test_requests_are_held_until_a_replica_is_ready(gw: Running, up: Upstream) -> None:
    gw.table(route(predict_path="/inspect", hold_timeout_s=10))
    url = f"{gw.url}/models/echo/production/predict"
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(httpx.post, url, headers=AUTH, content=b"wait", timeout=15)
        wait_for(lambda: gw.gateway.dispatcher("d1")._waiters, 5, "request to be held")
        gw.table(route(up, predict_path="/inspect"))
        r = held.result()
    assert r.status_code == 200 and r.json()["length"] == 4


def test_hold_times_out_with_503(gw: Running) -> None:
    gw.table(route(hold_timeout_s=0.3, message="deployment d1 is DEPLOYING"))
    r = httpx.post(f"{gw.url}/models/echo/production/predict", headers=AUTH, timeout=5)
    assert r.status_code == 503 and "DEPLOYING" in r.json()["error"]


def test_no_mixups_under_concurrent_keepalive_load(gw: Running, up: Upstream) -> None:
    gw.table(route(up, up))

    def client(n: int) -> int:
        ok = 0
        with httpx.Client(base_url=gw.url, headers=AUTH, timeout=30) as c:
            for i in range(40):
                body = f"client-{n}-req-{i}-".encode() * (1 + (i % 7) * 50)
                r = c.post("/models/echo/production/predict", content=body)
                assert r.status_code == 200 and r.content == body, (n, i)
                ok += 1
        return ok

    with ThreadPoolExecutor(16) as pool:
        assert sum(pool.map(client, range(16))) == 16 * 40
    assert up.requests == 16 * 40  # nothing dropped or duplicated


def _req(body: bytes, close: bool = False, method: bytes = b"POST") -> bytes:
    extra = b"Connection: close\r\n" if close else b""
    return (
        method
        + b" /models/echo/production/predict HTTP/1.1\r\nHost: x\r\nAuthorization: Api-Key "
        + KEY.encode()
        + b"\r\nContent-Length: %d\r\n" % len(body)
        + extra
        + b"\r\n"
        + body
    )


def test_pipelined_requests_are_answered_in_order(gw: Running, up: Upstream) -> None:
    gw.table(route(up))
    data = raw_exchange(gw.port, _req(b"first") + _req(b"second") + _req(b"third", close=True))
    assert data.count(b"HTTP/1.1 200") == 3
    assert data.index(b"first") < data.index(b"second") < data.index(b"third")


def test_half_closed_client_still_gets_its_answer(gw: Running, up: Upstream) -> None:
    gw.table(route(up))
    data = raw_exchange(gw.port, _req(b"half-closed"), half_close=True)
    assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"half-closed")


def test_connect_failure_is_retried_on_another_replica(gw: Running, up: Upstream) -> None:
    dead = free_port()  # nothing listens here
    gw.table(route(dead, up))
    with httpx.Client(base_url=gw.url, headers=AUTH) as c:
        for i in range(10):
            r = c.post("/models/echo/production/predict", content=f"{i}".encode())
            assert r.status_code == 200 and r.text == f"{i}"
    gw.table(route(dead))
    r = httpx.post(f"{gw.url}/models/echo/production/predict", headers=AUTH)
    assert r.status_code == 502 and r.json()["code"] == "bad_gateway"


def test_a_pooled_connection_that_drops_the_request_is_retried_elsewhere(
    gw: Running, up: Upstream, scripted: Callable[..., _Scripted]
) -> None:
    # A replica restarting under a pooled connection: it answers the first request on each
    # connection and hangs up on the second without a byte.
    outcomes = Counter[str]()

    def answer(n: int, body: bytes) -> bytes | None:
        outcomes["answered" if n == 0 else "dropped"] += 1
        return _ok(body) if n == 0 else None

    flaky = scripted(answer)
    gw.table(route(flaky.port, up))
    with httpx.Client(base_url=gw.url, headers=AUTH) as c:
        for i in range(12):
            r = c.post("/models/echo/production/predict", content=f"req-{i}".encode())
            assert r.status_code == 200 and r.text == f"req-{i}"
    assert outcomes["dropped"] >= 2  # each one was answered by the other replica instead
    assert up.requests + outcomes["answered"] == 12


def test_requests_on_a_warm_connection_need_no_task(gw: Running, up: Upstream) -> None:
    """With a free slot and a pooled upstream connection, a request is relayed from the
    protocol callbacks alone: creating a Task per request was a fifth of the gateway's cost."""
    gw.table(route(up, up))
    created: list[object] = []

    def count(loop: asyncio.AbstractEventLoop, coro: object, **kw: object) -> asyncio.Task[object]:
        created.append(coro)
        return asyncio.Task(coro, loop=loop, **kw)  # type: ignore[arg-type]

    with httpx.Client(base_url=gw.url, headers=AUTH) as c:
        for _ in range(4):  # opens and pools a connection to each replica
            assert c.post("/models/echo/production/predict", content=b"warm").text == "warm"
        gw.loop.call_soon_threadsafe(gw.loop.set_task_factory, count)  # type: ignore[arg-type]
        wait_for(lambda: gw.loop.get_task_factory() is not None, 5, "task factory set")
        for i in range(20):
            r = c.post("/models/echo/production/predict", content=f"{i}".encode())
            assert r.status_code == 200 and r.text == f"{i}"
            assert r.headers["x-baseten-request-id"]
    assert created == []
    assert up.requests == 24


def test_requests_queued_for_a_slot_need_no_task(gw: Running, up: Upstream) -> None:
    """Under predict_concurrency 1, a request that finds the slot taken waits in the queue
    without a Task, and the release that frees the slot sends it: a Task woken a loop turn
    later left the replica idle in between, and cost the gateway more than its parsing."""
    gw.table(route(up, concurrency=1))
    created: list[str] = []

    def count(loop: asyncio.AbstractEventLoop, coro: object, **kw: object) -> asyncio.Task[object]:
        # The test's loop (asyncio's own) also runs a Task per accepted connection.
        if getattr(coro, "__qualname__", "") != "BaseSelectorEventLoop._accept_connection2":
            created.append(getattr(coro, "__qualname__", repr(coro)))
        return asyncio.Task(coro, loop=loop, **kw)  # type: ignore[arg-type]

    def client(n: int) -> list[str]:
        with httpx.Client(base_url=gw.url, headers=AUTH, timeout=10) as c:
            return [
                c.post("/models/echo/production/predict", content=f"{n}-{i}".encode()).text
                for i in range(10)
            ]

    with ThreadPoolExecutor(4) as pool:  # warm: pools the replica connections a queue uses
        list(pool.map(client, range(4)))
    gw.loop.call_soon_threadsafe(gw.loop.set_task_factory, count)  # type: ignore[arg-type]
    wait_for(lambda: gw.loop.get_task_factory() is not None, 5, "task factory set")
    dispatcher = gw.gateway.dispatcher("d1")
    queued = 0

    def watch() -> None:
        nonlocal queued
        while not done.is_set():
            queued = max(queued, dispatcher.snapshot().queued)
            _time.sleep(0.0005)

    done = threading.Event()
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(client, range(4)))
    finally:
        done.set()
        watcher.join()
    assert answers == [[f"{n}-{i}" for i in range(10)] for n in range(4)]
    assert queued >= 1  # requests did wait for the one slot
    assert created == []
    assert dispatcher.inflight == {"r0": 0} and not dispatcher._waiters


def _wait_until_held(up: Upstream, requests: int, dispatcher: Dispatcher) -> None:
    """Until the replica has seen ``requests`` requests, the last held (``/held``) in the
    one slot."""
    wait_for(lambda: up.requests == requests, 5, "the first request to reach the replica")
    wait_for(lambda: dispatcher.inflight == {"r0": 1}, 5, "the slot to be the first's alone")


def test_a_queued_request_whose_client_leaves_takes_no_slot(gw: Running, up: Upstream) -> None:
    # The first request holds the one slot until the test lets it go, and the leaving one is
    # sent only once the first is at the replica: the pooling request's slot is released just
    # after its client has its answer, so a check of the slots alone could still see that
    # one, and send the leaving request to the replica straight away.
    gw.table(route(up, predict_path="/held", concurrency=1))
    with httpx.Client(base_url=gw.url, headers=AUTH, timeout=10) as c:  # pool a connection
        assert c.get("/models/echo/production/sync/echo").status_code == 200
    dispatcher = gw.gateway.dispatcher("d1")
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(
            httpx.post, f"{gw.url}/models/echo/production/predict", headers=AUTH, timeout=30
        )
        _wait_until_held(up, 2, dispatcher)
        with socket.create_connection(("127.0.0.1", gw.port)) as s:
            s.sendall(_req(b"leaving"))
            wait_for(lambda: dispatcher.snapshot().queued == 1, 5, "the request to queue")
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        wait_for(lambda: dispatcher.snapshot().queued == 0, 10, "the queue to be left")
        assert not dispatcher._waiters
        assert dispatcher.inflight == {"r0": 1}  # still the first request's
        up.release.set()
        assert first.result().status_code == 200
    wait_for(lambda: dispatcher.inflight == {"r0": 0}, 5, "the slot to be released")
    assert up.requests == 2  # the request whose client left never reached the replica
    r = httpx.post(f"{gw.url}/models/echo/production/predict", headers=AUTH, timeout=5)
    assert r.status_code == 200


def test_a_queued_request_gets_404_when_its_deployment_is_deactivated(
    gw: Running, up: Upstream
) -> None:
    gw.table(route(up, predict_path="/held", concurrency=1))
    dispatcher = gw.gateway.dispatcher("d1")
    url = f"{gw.url}/models/echo/production/predict"
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(httpx.post, url, headers=AUTH, timeout=30)
        _wait_until_held(up, 1, dispatcher)
        queued = pool.submit(httpx.post, url, headers=AUTH, timeout=10)
        wait_for(lambda: dispatcher.snapshot().queued == 1, 5, "the request to queue")
        gw.table(route(up, state=DeploymentState.INACTIVE, message="deployment d1 is gone"))
        r = queued.result()
        assert r.status_code == 404 and "d1 is gone" in r.json()["error"]
        up.release.set()
        assert first.result().status_code == 200


def test_a_queued_request_that_fails_to_send_closes_only_its_connection(
    gw: Running, up: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A queued request is sent from inside another request's release: a bug there must end
    # its own connection and give the slot on, not strand the request that freed it.
    from kingpost.gateway import forward

    gw.table(route(up, predict_path="/held", concurrency=1))
    with httpx.Client(base_url=gw.url, headers=AUTH, timeout=10) as c:  # pool a connection
        assert c.get("/models/echo/production/sync/echo").status_code == 200
    dispatcher = gw.gateway.dispatcher("d1")
    url = f"{gw.url}/models/echo/production/predict"
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(httpx.post, url, headers=AUTH, timeout=30)
        _wait_until_held(up, 2, dispatcher)

        def broken(*args: object) -> object:
            raise RuntimeError("a bug in sending")

        monkeypatch.setattr(forward, "send_now", broken)
        with socket.create_connection(("127.0.0.1", gw.port)) as s:
            s.sendall(_req(b"queued"))
            wait_for(lambda: dispatcher.snapshot().queued == 1, 5, "the request to queue")
            up.release.set()
            s.settimeout(5)
            assert s.recv(100) == b""  # closed, unanswered
        assert first.result().status_code == 200
    monkeypatch.undo()
    wait_for(lambda: dispatcher.inflight == {"r0": 0}, 5, "the slot to be released")
    r = httpx.post(url, headers=AUTH, timeout=5)
    assert r.status_code == 200


def test_a_client_that_leaves_frees_its_replica_slot(gw: Running, up: Upstream) -> None:
    gw.table(route(up, predict_path="/slow?s=3", concurrency=1))
    with httpx.Client(base_url=gw.url, headers=AUTH, timeout=10) as c:  # pool a connection
        assert c.get("/models/echo/production/sync/echo").status_code == 200
    dispatcher = gw.gateway.dispatcher("d1")
    with socket.create_connection(("127.0.0.1", gw.port)) as s:
        s.sendall(_req(b"leaving"))
        wait_for(lambda: up.requests == 2, 5, "the slow request to reach the replica")
        assert dispatcher.inflight == {"r0": 1}
        # Reset, not FIN: a FIN may be a half-closed client still waiting for its answer.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    # The client is gone: the gateway drops the upstream exchange and frees the only slot
    # long before the replica would have answered.
    wait_for(lambda: dispatcher.inflight == {"r0": 0}, 1.5, "the slot to be released")
    r = httpx.get(f"{gw.url}/models/echo/production/sync/echo", headers=AUTH, timeout=5)
    assert r.status_code == 200


def _can_unshare() -> bool:
    from kingpost.netns import can_unshare_net

    return sys.platform == "linux" and can_unshare_net()


@pytest.mark.skipif(not _can_unshare(), reason="needs CAP_SYS_ADMIN to create network namespaces")
def test_upstream_inside_a_network_namespace(gw: Running, tmp_path: Path) -> None:
    server = Path(__file__).resolve().parents[2] / "examples" / "echo-server" / "server.py"
    proc = subprocess.Popen(
        ["unshare", "--net", "sh", "-c", f"ip link set lo up && exec {sys.executable} {server}"],
        cwd=tmp_path,
    )
    try:
        ns = f"/proc/{proc.pid}/ns/net"
        gw.table(
            replace(
                route(predict_path="/predict"),
                state=DeploymentState.SERVING,
                upstreams=(Up("r0", "127.0.0.1", 8000, ns),),
            )
        )

        def call() -> httpx.Response | None:
            r = httpx.post(f"{gw.url}/models/echo/production/predict", headers=AUTH, json={"a": 1})
            return r if r.status_code == 200 else None

        r = wait_for(call, 15, "server in its namespace")
        assert r.json()["echo"] == {"a": 1}
    finally:
        proc.kill()
        proc.wait()


def _upgrade_server() -> tuple[socket.socket, threading.Thread]:
    """Answers an Upgrade with 101, then echoes raw bytes upper-cased (a tunnel stand-in)."""
    srv = socket.create_server(("127.0.0.1", 0))

    def run() -> None:
        conn, _ = srv.accept()
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                head += conn.recv(4096)
            assert b"upgrade: websocket" in head.lower() and b"authorization" not in head.lower()
            conn.sendall(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\n\r\nwelcome;"
            )
            while data := conn.recv(4096):
                conn.sendall(data.upper())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return srv, thread


def test_upgrade_is_tunnelled_both_ways(gw: Running) -> None:
    srv, thread = _upgrade_server()
    try:
        gw.table(route(int(srv.getsockname()[1]), predict_path="/ws"))
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
            s.sendall(
                b"GET /models/echo/production/sync/ws HTTP/1.1\r\nHost: x\r\n"
                b"Authorization: Api-Key " + KEY.encode() + b"\r\n"
                b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\nearly;"
            )
            data = b""
            while b"EARLY;" not in data:
                data += s.recv(4096)
            assert data.startswith(b"HTTP/1.1 101")
            assert b"x-baseten-request-id" in data.lower() and b"welcome;" in data
            s.sendall(b"hello")
            more = b""
            while b"HELLO" not in more:
                more += s.recv(4096)
    finally:
        srv.close()
        thread.join(5)


class _Scripted:
    """A raw keep-alive upstream: ``answer(n, body)`` gives the bytes to send for the n-th
    request on a connection (None: hang up without a byte; ``hang_up``: after sending).
    Records every body it read."""

    def __init__(self, answer: Callable[[int, bytes], bytes | None], hang_up: bool = False) -> None:
        self.answer = answer
        self.hang_up = hang_up
        self.bodies: list[bytes] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as f:
            for n in itertools.count():
                length = 0
                while (line := f.readline()) not in (b"\r\n", b""):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                if not line:
                    return
                body = f.read(length)
                self.bodies.append(body)
                out = self.answer(n, body)
                if out is None:
                    return
                try:
                    conn.sendall(out)
                except OSError:
                    return
                if self.hang_up:
                    return

    def close(self) -> None:
        self.sock.close()


def _ok(body: bytes, *extra: bytes) -> bytes:
    head = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n" % len(body) + b"".join(extra)
    return head + b"\r\n" + body


@pytest.fixture
def scripted() -> Iterator[Callable[..., _Scripted]]:
    made: list[_Scripted] = []

    def make(answer: Callable[[int, bytes], bytes | None], hang_up: bool = False) -> _Scripted:
        made.append(_Scripted(answer, hang_up))
        return made[-1]

    yield make
    for s in made:
        s.close()


def _answers(data: bytes) -> list[tuple[bytes, bytes]]:
    """(status line, body) of each response in ``data`` (Content-Length framed)."""
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        out.append((lines[0], rest[:length]))
        data = rest[length:]
    return out


def test_an_interim_response_is_passed_on_and_the_real_one_follows(
    gw: Running, scripted: Callable[..., _Scripted]
) -> None:
    early = b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n"
    up = scripted(lambda n, body: (early if body == b"A" else b"") + _ok(b"answer-" + body))
    gw.table(route(up.port))
    assert raw_exchange(gw.port, _req(b"warm", close=True)).endswith(b"answer-warm")  # pooled now
    data = raw_exchange(gw.port, _req(b"A") + _req(b"B") + _req(b"C", close=True))
    assert _answers(data) == [
        (b"HTTP/1.1 103 Early Hints", b""),
        (b"HTTP/1.1 200 OK", b"answer-A"),
        (b"HTTP/1.1 200 OK", b"answer-B"),
        (b"HTTP/1.1 200 OK", b"answer-C"),
    ]
    assert b"link: </style.css>; rel=preload" in data


def test_a_partial_response_head_is_not_retried(
    gw: Running, scripted: Callable[..., _Scripted]
) -> None:
    # The replica took the request and died mid-head: running it again elsewhere could run
    # a non-idempotent predict twice, so the client gets a 502 instead.
    first = scripted(lambda n, body: b"HTTP/1.1 200 OK\r\ncontent-", hang_up=True)
    second = scripted(lambda n, body: _ok(body))
    gw.table(route(first.port, second.port))
    answers = [_answers(raw_exchange(gw.port, _req(b"%d" % i, close=True)))[0] for i in range(6)]
    failed = [a for a in answers if a[0] == b"HTTP/1.1 502 Bad Gateway"]
    assert sorted(a for a in answers if a not in failed) == sorted(
        (b"HTTP/1.1 200 OK", body) for body in second.bodies
    )
    assert len(failed) == len(first.bodies) > 0  # each failure reached the replica once
    assert len(first.bodies) + len(second.bodies) == 6  # and nothing was sent twice


@pytest.mark.parametrize("reused", [False, True], ids=["new-connection", "pooled"])
def test_a_post_a_replica_may_have_run_is_not_run_again(
    gw: Running, scripted: Callable[..., _Scripted], reused: bool
) -> None:
    """A replica that read a POST whole, worked on it, and died without a byte of answer
    may have run it (a charge, a job): the gateway sent it to another replica, which ran
    it again. Now the client gets a 502 saying why; an idempotent PUT is still retried."""
    answered: list[bytes] = []

    def crashes(n: int, body: bytes) -> bytes | None:
        if reused and n == 0:
            answered.append(body)  # the connection goes back to the pool, and is taken again
            return _ok(body)
        threading.Event().wait(0.3)  # running the model, then the process dies
        return None

    dying, good = scripted(crashes), scripted(lambda n, body: _ok(body))
    gw.table(route(dying.port, good.port))
    failed = []
    with httpx.Client(base_url=gw.url, headers=AUTH) as c:
        for i in range(8):
            r = c.post("/models/echo/production/predict", content=b"post-%d" % i)
            if r.status_code == 502:
                assert "may have run" in r.json()["error"] and "POST" in r.json()["error"]
                failed.append(b"post-%d" % i)
            else:
                assert r.status_code == 200 and r.content == b"post-%d" % i
    assert failed and sorted(failed) == sorted(set(dying.bodies) - set(answered))
    assert sorted(dying.bodies + good.bodies) == sorted(b"post-%d" % i for i in range(8))
    with httpx.Client(base_url=gw.url, headers=AUTH) as c:
        for i in range(4):
            r = c.put("/models/echo/production/predict", content=b"put-%d" % i)
            assert r.status_code == 200 and r.content == b"put-%d" % i  # retried elsewhere
    assert any(b.startswith(b"put-") for b in dying.bodies)


def test_a_retry_after_the_deployment_left_the_table_is_refused_not_stranded(
    gw: Running, scripted: Callable[..., _Scripted]
) -> None:
    pushed = threading.Event()

    def answer(n: int, body: bytes) -> bytes | None:
        if body == b"warm":
            return _ok(body)
        pushed.wait(5)
        return None  # hang up without a byte: the gateway retries

    up = scripted(answer)
    gw.table(route(up.port))
    assert raw_exchange(gw.port, _req(b"warm", close=True)).endswith(b"warm")
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
        # A PUT: a POST the replica held this long is not retried at all (it may have run).
        s.sendall(_req(b"in-flight", close=True, method=b"PUT"))
        wait_for(lambda: b"in-flight" in up.bodies, 5, "the request to reach the replica")
        gw.table(route(up.port, deployment_id="d2"), env="d2")  # d1 is gone
        pushed.set()
        data = s.recv(65536)
    assert data.startswith(b"HTTP/1.1 404"), data


@pytest.fixture
def uv_gw() -> Iterator[Running]:
    """The gateway on uvloop, as it runs in production (flow control differs in timing)."""
    running = Running(uvloop.new_event_loop())
    try:
        yield running
    finally:
        running.close()


def test_a_pooled_connection_is_readable_after_a_slow_client_paused_it(
    uv_gw: Running, scripted: Callable[..., _Scripted]
) -> None:
    gw = uv_gw
    size = 8 * 1024 * 1024
    up = scripted(lambda n, body: _ok(b"x" * size) if body == b"big" else _ok(body))
    gw.table(route(up.port))
    assert raw_exchange(gw.port, _req(b"warm", close=True)).endswith(b"warm")
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as slow:
        slow.sendall(_req(b"big"))
        got = 0
        while got < size:  # slowly to the end, so the replica's last bytes arrive while the
            got += len(slow.recv(16384))  # gateway has paused reading from it
            threading.Event().wait(0.002)
        # The first client stays connected; the next request takes the pooled connection.
        data = raw_exchange(gw.port, _req(b"next", close=True))
        assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"next")


def test_the_next_request_is_read_after_a_large_body(gw: Running, up: Upstream) -> None:
    gw.table(route(up))
    big = b"L" * 1_200_000
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        s.sendall(_req(big))  # arrives whole, so it is complete when reading pauses
        data = b""
        while len(data) < len(big) or b"\r\n\r\n" not in data:
            data += s.recv(1 << 20)
        head, _, body = data.partition(b"\r\n\r\n")
        while len(body) < len(big):
            body += s.recv(1 << 20)
        assert head.startswith(b"HTTP/1.1 200") and body == big
        s.sendall(_req(b"after-large", close=True))
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert _answers(data) == [(b"HTTP/1.1 200 OK", b"after-large")]


def test_a_client_that_stops_mid_body_is_closed(gw: Running, up: Upstream) -> None:
    gw.table(route(up))
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
        s.sendall(_req(b"0123456789")[:-6])  # four of ten body bytes
        s.shutdown(socket.SHUT_WR)
        assert s.recv(65536) == b""  # closed, not left hanging
    assert up.requests == 0


def test_a_malformed_request_is_refused_after_the_answers_owed_before_it(
    gw: Running, up: Upstream
) -> None:
    gw.table(route(up, predict_path="/slow?s=0.3"))
    assert raw_exchange(gw.port, _req(b"", close=True)).startswith(b"HTTP/1.1 200")  # pooled
    data = raw_exchange(gw.port, _req(b"first") + b"NOT HTTP AT ALL\r\n\r\n")
    answers = _answers(data)
    assert [a[0] for a in answers] == [b"HTTP/1.1 200 OK", b"HTTP/1.1 400 Bad Request"]
    assert b"\r\nconnection: close\r\n" in data.split(b"400 Bad Request", 1)[1]  # says so


def test_the_pool_resumes_reading_on_a_connection_it_takes_back(
    uv_gw: Running, up: Upstream
) -> None:
    pool = uv_gw.gateway.pool
    key = ("127.0.0.1", up.port, None)

    async def check() -> bool:
        conn = await pool.connect(key)
        assert conn.transport is not None
        conn.transport.pause_reading()  # as for a slow client that owned it
        pool.put(conn)
        return pool.take_idle(key) is conn and conn.transport.is_reading()

    assert asyncio.run_coroutine_threadsafe(check(), uv_gw.loop).result(5)


def test_a_slot_handed_to_a_task_that_never_ran_is_released(
    uv_gw: Running, scripted: Callable[..., _Scripted]
) -> None:
    """req2 finds a free slot but no idle connection (req1's answer closes it), so a task is
    started with the slot; the client's reset is handled before that task ever runs."""
    gw, release = uv_gw, threading.Event()

    def answer(n: int, body: bytes) -> bytes | None:
        if body == b"req1":
            release.wait(5)
            return _ok(body, b"connection: close\r\n")
        return _ok(body)

    up = scripted(answer)
    gw.table(route(up.port, concurrency=1))
    assert raw_exchange(gw.port, _req(b"warm", close=True)).endswith(b"warm")
    dispatcher = gw.gateway.dispatcher("d1")
    client = socket.create_connection(("127.0.0.1", gw.port))
    client.sendall(_req(b"req1") + _req(b"req2"))
    wait_for(lambda: b"req1" in up.bodies, 5, "req1 to reach the replica")
    frozen = threading.Event()

    def freeze() -> None:  # hold the loop so both events are waiting when it wakes
        frozen.set()
        threading.Event().wait(0.5)

    gw.loop.call_soon_threadsafe(freeze)
    frozen.wait(5)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()  # the reset first...
    threading.Event().wait(0.1)
    release.set()  # ...then req1's answer, which closes the only pooled connection
    wait_for(lambda: dispatcher.inflight == {"r0": 0}, 5, "the slot to be released")
    data = raw_exchange(gw.port, _req(b"after", close=True))
    assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"after")


def _handshake(path: str = "/models/echo/production/sync/ws", key: str = KEY) -> bytes:
    """A WebSocket handshake to the gateway, carrying an API key."""
    return handshake(path, extra=f"Authorization: Api-Key {key}\r\n")


def _send_until_stalled(s: socket.socket, cap: int = 512 << 20) -> int:
    """How many bytes ``s`` sends (up to ``cap``) before 2 s pass without progress."""
    s.settimeout(2)
    sent, block = 0, b"x" * (1 << 20)
    try:
        while sent < cap:
            sent += s.send(block)
    except TimeoutError:
        pass
    return sent


@pytest.mark.parametrize("key", ["wrong", KEY], ids=["401", "no-replica-answer"])
def test_an_upgrade_that_gets_no_tunnel_ends_its_connection(
    gw: Running, scripted: Callable[..., _Scripted], key: str
) -> None:
    # After an upgrade request the client's bytes are not HTTP any more, so a refusal (here
    # a 401, or a 502 from replicas that hang up without a byte, after one retry) closes
    # the connection instead of leaving it open to swallow whatever comes next.
    dropper = scripted(lambda n, body: None)
    gw.table(route(dropper.port, predict_path="/ws"))
    answer = raw_exchange(gw.port, _handshake(key=key) + b"frames the client sent early")
    status = b"401" if key == "wrong" else b"502"
    assert answer.startswith(b"HTTP/1.1 " + status), answer
    assert b"connection: close" in answer.lower()
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["code"] in ("unauthorized", "bad_gateway")
    if key == KEY:
        assert len(dropper.bodies) == 2  # tried, then retried once


def test_a_handshake_retried_after_a_replica_that_took_nothing(
    gw: Running, scripted: Callable[..., _Scripted]
) -> None:
    srv, thread = _upgrade_server()
    dropper = scripted(lambda n, body: None)
    try:
        # Ties rotate starting from the second replica, so the dropper is tried first.
        gw.table(route(int(srv.getsockname()[1]), dropper.port, predict_path="/ws"))
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
            s.sendall(_handshake())
            data = b""
            while b"welcome;" not in data:
                chunk = s.recv(4096)
                assert chunk, data
                data += chunk
            assert data.startswith(b"HTTP/1.1 101")
            s.sendall(b"hi")
            more = b""
            while b"HI" not in more:
                more += s.recv(4096)
        assert len(dropper.bodies) == 1  # it was tried first and took nothing
    finally:
        srv.close()
        thread.join(5)


def test_a_tunnel_stops_reading_the_client_when_the_replica_stops_reading(gw: Running) -> None:
    # Flow control inside a tunnel, client to replica: a replica that reads nothing more
    # after its 101 must stall the client's sends, not have the gateway buffer them.
    srv = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def replica() -> None:
        conn, _ = srv.accept()
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                head += conn.recv(1)
            conn.sendall(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: Upgrade\r\n\r\n"
            )
            stop.wait(30)  # reads nothing more

    thread = threading.Thread(target=replica, daemon=True)
    thread.start()
    try:
        gw.table(route(int(srv.getsockname()[1]), predict_path="/ws"))
        raw = RawWebSocket(gw.port)
        try:
            assert raw.open(_handshake()).startswith(b"HTTP/1.1 101")
            sent = _send_until_stalled(raw.sock)
        finally:
            raw.close()
        # Socket buffers on the way hold a few MiB each; without flow control the gateway
        # reads everything the client sends.
        assert sent < 64 << 20, f"{sent >> 20} MiB went into the tunnel and nobody read it"
    finally:
        stop.set()
        srv.close()
        thread.join(5)


def test_bytes_behind_a_queued_handshake_are_bounded(
    gw: Running, scripted: Callable[..., _Scripted]
) -> None:
    # A handshake waiting for a slot keeps what the client sends after it (the tunnel will
    # want it), but only so much: past that the gateway stops reading that client.
    release = threading.Event()
    holder = scripted(lambda n, body: _ok(b"done") if release.wait(30) else None)
    gw.table(route(holder.port, predict_path="/ws", concurrency=1))
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(
            httpx.post, f"{gw.url}/models/echo/production/sync/ws", headers=AUTH, timeout=30
        )
        wait_for(lambda: len(holder.bodies) == 1, 5, "the only slot taken")
        try:
            with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
                s.sendall(_handshake())
                sent = _send_until_stalled(s)
        finally:
            release.set()
        assert held.result().status_code == 200
    assert sent < 64 << 20, f"{sent >> 20} MiB read behind a handshake still in the queue"


def test_a_request_head_without_end_is_refused_not_buffered(gw: Running, up: Upstream) -> None:
    """httptools sets no limit on a head: a client (no key needed) sending one header value
    without end made the gateway hold all of it, hundreds of MB and quadratic CPU."""
    gw.table(route(up, predict_path="/inspect"))
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        s.sendall(b"POST /models/echo/production/predict HTTP/1.1\r\nHost: x\r\nX-Big: ")
        sent = 0
        with pytest.raises(OSError):  # the gateway hangs up long before this is all sent
            for _ in range(1024):
                s.sendall(b"a" * 4096)
                sent += 4096
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert sent < 1024 * 4096
    assert data.startswith(b"HTTP/1.1 431 ")
    # A large head that stays under the limit, sent in pieces, still goes through.
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        s.sendall(b"POST /models/echo/production/predict HTTP/1.1\r\nHost: x\r\nX-Big: ")
        for _ in range(10):
            s.sendall(b"a" * 4096)
            threading.Event().wait(0.005)
        s.sendall(b"\r\n" + _req(b"ok", close=True).split(b"\r\n", 2)[2])
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert _answers(data)[0][0] == b"HTTP/1.1 200 OK"


class _Dropping(_Scripted):
    """A replica that reads a request's head and ``keep`` bytes after it, then hangs up
    without a byte of answer (as one that crashes mid-upload)."""

    def __init__(self, keep: int) -> None:
        self.keep, self.drops = keep, 0
        super().__init__(lambda n, body: None)

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as f:
            while f.readline() not in (b"\r\n", b""):
                pass
            f.read(self.keep)
            self.drops += 1


def test_a_body_partly_sent_to_a_replica_that_hung_up_is_not_retried_without_it(
    gw: Running, up: Upstream
) -> None:
    """Past the 64 KB replay buffer, the part of a body already written to a replica that
    then hung up is gone: the retry elsewhere sent the rest as the whole body (a chunked
    upload arrived shorter, a sized one never ended)."""
    dropping = _Dropping(keep=100_000)
    try:
        gw.table(route(up, dropping.port, predict_path="/inspect"))
        body = os.urandom(400_000)

        def pieces() -> Iterator[bytes]:
            for i in range(0, len(body), 20_000):
                yield body[i : i + 20_000]
                threading.Event().wait(0.005)

        statuses = []
        with httpx.Client(base_url=gw.url, headers=AUTH, timeout=10) as c:
            for _ in range(2):  # replicas are taken in turn: one of these meets the dropper
                r = c.post("/models/echo/production/predict", content=pieces())
                statuses.append(r.status_code)
                if r.status_code == 200:
                    assert r.json()["sha256"] == hashlib.sha256(body).hexdigest()
                else:
                    assert r.status_code == 502 and r.json()["code"] == "bad_gateway"
        assert dropping.drops == 1 and sorted(statuses) == [200, 502]
    finally:
        dropping.close()


def test_headers_the_client_names_in_connection_are_not_forwarded(
    gw: Running, up: Upstream
) -> None:
    """``Connection`` lists headers meant for this hop only (RFC 9110 7.6.1): they stop at
    the gateway like Keep-Alive and TE, whatever they are called."""
    gw.table(route(up, predict_path="/inspect"))
    head = (
        b"POST /models/echo/production/predict HTTP/1.1\r\nHost: x\r\nAuthorization: Api-Key "
        + KEY.encode()
        + b"\r\nConnection: keep-alive, X-Hop-Only , x-other-hop,Host\r\nX-Hop-Only: 1\r\n"
        b"X-Other-Hop: 2\r\nX-End-To-End: 3\r\nKeep-Alive: 5\r\nTE: trailers\r\n"
        b"Proxy-Authorization: Basic c2VjcmV0\r\nContent-Length: 0\r\n\r\n"
    )
    # The next request on the connection does not name it: there it is an ordinary header.
    after = _req(b"", close=True).replace(b"Host: x\r\n", b"Host: x\r\nX-Hop-Only: 1\r\n")
    (status, seen), (status2, seen2) = _answers(raw_exchange(gw.port, head + after))
    assert status == status2 == b"HTTP/1.1 200 OK"
    names = json.loads(seen)["header_names"]
    assert "x-end-to-end" in names and "host" in names
    assert not {"x-hop-only", "x-other-hop", "keep-alive", "te", "connection"} & set(names)
    # Credentials for a proxy are the gateway's to read, never the model code's, like the
    # platform's own Authorization.
    assert not {"proxy-authorization", "authorization"} & set(names)
    assert "x-hop-only" in json.loads(seen2)["header_names"]


def test_a_request_is_forwarded_with_exactly_one_host(gw: Running, up: Upstream) -> None:
    """RFC 9112 3.2: an HTTP/1.1 request without Host, or with two, is a 400 (two: the
    gateway routed by the last, the replica read the first). An HTTP/1.0 one may lack it,
    but the HTTP/1.1 request made of it may not (h11-based replicas refuse it)."""
    gw.table(route(up, predict_path="/inspect"))
    auth = b"Authorization: Api-Key " + KEY.encode() + b"\r\n"
    predict = b"POST /models/echo/production/predict "
    data = raw_exchange(gw.port, predict + b"HTTP/1.0\r\n" + auth + b"Content-Length: 0\r\n\r\n")
    (status, seen), *_ = _answers(data)
    assert status == b"HTTP/1.1 200 OK" and "host" in json.loads(seen)["header_names"]
    assert up.requests == 1
    for head in (
        predict + b"HTTP/1.1\r\n" + auth,
        b"POST /environments/production/predict HTTP/1.1\r\nHost: model-m1.localhost\r\n"
        + auth
        + b"Host: elsewhere\r\n",
    ):
        data = raw_exchange(gw.port, head + b"Content-Length: 0\r\nConnection: close\r\n\r\n")
        assert data.startswith(b"HTTP/1.1 400 ") and b"Host" in data, data
    assert up.requests == 1


def _read_until(s: socket.socket, end: bytes) -> bytes:
    data = b""
    while not data.endswith(end):
        data += s.recv(65536)
    return data


def test_connections_that_send_no_request_are_closed(
    monkeypatch: pytest.MonkeyPatch, up: Upstream
) -> None:
    """No client, with a key or without, holds a connection forever: one sending its head a
    byte at a time (slowloris) or one idle after its answers is closed; one whose request a
    replica is still answering is not."""
    monkeypatch.setattr(Gateway, "head_timeout_s", 0.6)
    monkeypatch.setattr(Gateway, "idle_timeout_s", 1.5)
    monkeypatch.setattr(Gateway, "sweep_s", 0.1)
    gw = Running()
    try:
        gw.table(route(up, predict_path="/slow?s=2.5"))
        with (
            socket.create_connection(("127.0.0.1", gw.port), timeout=5) as drip,
            socket.create_connection(("127.0.0.1", gw.port), timeout=5) as silent,
            socket.create_connection(("127.0.0.1", gw.port), timeout=5) as idle,
            socket.create_connection(("127.0.0.1", gw.port), timeout=5) as slow,
        ):
            idle.sendall(_req(b"x").replace(b"predict", b"sync/echo"))
            assert _answers(_read_until(idle, b"x")) == [(b"HTTP/1.1 200 OK", b"x")]
            slow.sendall(_req(b"y"))  # answered after 2.5 s: longer than either timeout
            start = _time.monotonic()
            head = b"GET /models/echo/production/sync/echo HTTP/1.1\r\nHost: x\r\n"
            with pytest.raises(OSError):
                for i in range(len(head) * 10):
                    drip.sendall(head[i % len(head) : i % len(head) + 1])
                    _time.sleep(0.1)
            assert _time.monotonic() - start < 2.5
            assert silent.recv(1) == b""  # closed without a byte
            assert idle.recv(1) == b""
            assert 1.2 < _time.monotonic() - start < 4
            answer = _read_until(slow, b"}")
            assert _answers(answer) == [(b"HTTP/1.1 200 OK", b'{"slow": true}')]
    finally:
        gw.close()


def test_trailer_fields_are_not_kept_as_headers(gw: Running, up: Upstream) -> None:
    """httptools reports the trailer fields of a chunked body like header fields: the
    gateway added them to the request's headers, so a retry sent them as headers, and a
    client could grow that list without bound (a million fields: 115 MB more)."""
    dropping = _Dropping(keep=0)
    try:
        gw.table(route(up, dropping.port, predict_path="/inspect"))
        request = (  # a PUT, which is retried once the replica read it (a POST is not)
            b"PUT /models/echo/production/predict HTTP/1.1\r\nHost: x\r\nAuthorization: "
            b"Api-Key " + KEY.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n"
        )
        for _ in range(2):  # replicas are taken in turn: one of these is retried
            (status, seen), *_ = _answers(raw_exchange(gw.port, request, half_close=True))
            assert status == b"HTTP/1.1 200 OK" and json.loads(seen)["length"] == 3
            assert "x-trailer" not in json.loads(seen)["header_names"]
        assert dropping.drops >= 1
    finally:
        dropping.sock.close()


@pytest.mark.parametrize("size", [5, 200_000], ids=["small", "past-the-replay-buffer"])
def test_an_upgrade_request_with_a_body_forwards_the_body(
    gw: Running, up: Upstream, size: int
) -> None:
    # `curl --http2 -d …` on http:// asks for `Upgrade: h2c` on a POST with a body. The body
    # is part of the request whatever the replica does with the upgrade: held back as
    # tunnel bytes, the replica waited for it and the client for an answer, for ever.
    gw.table(route(up, predict_path="/inspect"))
    body = os.urandom(size)
    answer = raw_exchange(
        gw.port,
        b"POST /models/echo/production/predict HTTP/1.1\r\nHost: x\r\n"
        b"Authorization: Api-Key " + KEY.encode() + b"\r\n"
        b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQ\r\n"
        b"Content-Length: " + str(size).encode() + b"\r\n\r\n" + body,
        timeout=5,
    )
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    seen = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert (seen["length"], seen["sha256"]) == (size, hashlib.sha256(body).hexdigest())


def test_an_upgrade_request_with_a_chunked_body_is_refused_not_sent_empty(
    gw: Running, up: Upstream
) -> None:
    # Its chunks were taken for tunnel bytes and the replica ran it with an empty body.
    gw.table(route(up, predict_path="/inspect"))
    answer = raw_exchange(
        gw.port,
        b"POST /models/echo/production/predict HTTP/1.1\r\nHost: x\r\n"
        b"Authorization: Api-Key " + KEY.encode() + b"\r\n"
        b"Connection: Upgrade\r\nUpgrade: h2c\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n",
        timeout=5,
    )
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert b"connection: close" in answer.lower() and b"Content-Length" in answer
    assert up.requests == 0


class _Refusing(_Scripted):
    """A replica that answers 413 and ``connection: close`` as soon as it has read a request's
    head, then reads and drops whatever comes until the gateway hangs up."""

    def __init__(self) -> None:
        super().__init__(lambda n, body: None)

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as f:
            while f.readline() not in (b"\r\n", b""):
                pass
            conn.sendall(_ok(b"too big!", b"connection: close\r\n").replace(b"200 OK", b"413 No"))
            conn.shutdown(socket.SHUT_WR)
            while f.read1(65536):
                pass


def test_the_rest_of_a_body_the_replica_answered_early_is_read_and_dropped(gw: Running) -> None:
    # The answer came before the body was all in, and the replica hung up: the rest of the
    # body used to pile up in the gateway until it stopped reading the connection for good,
    # leaving the client blocked in the middle of its upload.
    refusing = _Refusing()
    try:
        gw.table(route(refusing.port))
        body = b"a" * (4 << 20)
        request = _req(body)
        # The head and a little more of the body than the gateway reads before it sends.
        split = len(request) - len(body) + (1 << 20) + 1000
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
            s.sendall(request[:split])
            data = b""
            while b"too big!" not in data:
                data += s.recv(65536)
            s.sendall(request[split:] + _req(b"next", close=True))
            while chunk := s.recv(65536):
                data += chunk
        assert _answers(data) == [(b"HTTP/1.1 413 No", b"too big!")] * 2
    finally:
        refusing.close()


def test_headers_the_replica_names_in_connection_are_not_passed_on(
    gw: Running, scripted: Callable[..., _Scripted]
) -> None:
    """The response side of RFC 9110 7.6.1: what the replica's ``Connection`` names was for
    the hop between it and the gateway."""
    up = scripted(
        lambda n, body: _ok(
            b"ok", b"x-hop-only: 1\r\nConnection: keep-alive, X-Hop-Only\r\nx-kept: 2\r\n"
        )
    )
    gw.table(route(up.port))
    with httpx.Client(base_url=gw.url, headers=AUTH, timeout=10) as c:
        for _ in range(2):  # from callbacks, then on the pooled connection
            r = c.post("/models/echo/production/predict", content=b"x")
            assert (r.status_code, r.content, r.headers["x-kept"]) == (200, b"ok", "2")
            assert "x-hop-only" not in r.headers and "connection" not in r.headers


def test_a_request_target_in_absolute_form_is_routed_by_its_authority(
    gw: Running, up: Upstream
) -> None:
    """RFC 9112 3.2.2: a server MUST accept ``http://host/path`` as the request target (what
    a client sends to a proxy), and routes by its authority, not by Host."""
    gw.table(route(up, predict_path="/inspect"))
    auth = b"Authorization: Api-Key " + KEY.encode() + b"\r\nConnection: close\r\n\r\n"
    targets = [
        b"http://x/models/echo/production/predict",
        b"HTTP://model-m1.localhost:8080/production/predict?a=1",
        b"https://model-m1.localhost/production/sync/inspect",
    ]
    for target in targets:
        answer = raw_exchange(
            gw.port, b"POST " + target + b" HTTP/1.1\r\nHost: other.example\r\n" + auth
        )
        assert answer.startswith(b"HTTP/1.1 200"), (target, answer[:300])
        seen = json.loads(answer.split(b"\r\n\r\n", 1)[1])
        assert seen["path"] == ("/inspect?a=1" if b"?" in target else "/inspect")


def test_every_answer_has_an_access_log_line(
    gw: Running, up: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    # Answers the gateway made itself (a full queue, a bad key, an unknown model) are
    # requests too: with no line for them, the access log counted none of the overload.
    caplog.set_level(logging.INFO, logger="kingpost.gateway.access")
    gw.gateway._log = True
    gw.table(route(up, predict_path="/slow?s=0.5", concurrency=1, queue_limit=1))
    url = f"{gw.url}/models/echo/production/predict"
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(httpx.post, url, headers=AUTH, timeout=10) for _ in range(3)]
        assert sorted(f.result().status_code for f in futures) == [200, 200, 429]
    with httpx.Client(base_url=gw.url) as c:
        assert c.post("/models/echo/production/predict").status_code == 401
        assert c.post("/models/nope/production/predict", headers=AUTH).status_code == 404
    # Two clients that hang up (a reset, not a half-close, which still gets its answer): one
    # while its request runs, one while it waits behind it.
    socks = [socket.create_connection(("127.0.0.1", gw.port), timeout=5) for _ in range(2)]
    for s in socks:
        s.sendall(_req(b"x"))
    wait_for(lambda: len(gw.gateway.dispatcher("d1")._waiters) == 1, 5, "one request queued")
    for s in socks:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()

    def lines() -> list[dict[str, object]]:
        return [json.loads(r.getMessage()) for r in caplog.records if r.name.endswith(".access")]

    wait_for(lambda: len(lines()) == 7, 5, "seven access log lines")
    seen = sorted(
        (str(line["status"]), line["outcome"], str(line["deployment_id"])) for line in lines()
    )
    # The queued one's hang-up may reach the gateway only when its answer is written (it
    # does not read from a client whose request waits): then the line is that answer's.
    queued_left = (
        ("None", "client_left", "d1")
        if seen.count(("None", "client_left", "d1")) == 2
        else ("200", "ok", "d1")
    )
    assert sorted(seen) == sorted(
        [
            ("200", "ok", "d1"),
            ("200", "ok", "d1"),
            ("401", "unauthorized", "None"),
            ("404", "not_found", "None"),
            ("429", "overloaded", "d1"),
            ("None", "client_left", "d1"),
            queued_left,
        ]
    )

    # Bytes that are no HTTP: alone, and behind a request still owed its answer.
    caplog.clear()
    assert raw_exchange(gw.port, b"NOT HTTP\r\n\r\n").startswith(b"HTTP/1.1 400")
    answers = raw_exchange(gw.port, _req(b"x") + b"\x00\x01 garbage\r\n\r\n")
    assert answers.startswith(b"HTTP/1.1 200") and b"HTTP/1.1 400" in answers
    wait_for(lambda: len(lines()) == 3, 5, "three access log lines")
    assert sorted((str(ln["status"]), ln["outcome"]) for ln in lines()) == [
        ("200", "ok"),
        ("400", "invalid_request"),
        ("400", "invalid_request"),
    ]


INVOKE_KEY = "kp_invoke_only"


def test_an_invoke_only_key_reaches_its_models_only(gw: Running, up: Upstream) -> None:
    """Every key was an admin key. An invoke-only key gets its models' predict, sync and
    websocket routes; anything else, other models' errors included, is 403 (its own
    models' errors stay as they are), and a key the table drops is 401 at once."""
    gw.version += 1
    digest = hashlib.sha256(INVOKE_KEY.encode()).hexdigest()
    d1 = route(up, websocket_path="/ws")
    d2 = replace(route(up), deployment_id="d2", model_id="m2")
    table = RoutingTable(
        version=gw.version,
        models={
            "m1": ModelRoute("m1", "echo", {"production": (("d1", 1.0),)}),
            "m2": ModelRoute("m2", "other", {"production": (("d2", 1.0),)}),
        },
        model_names={"echo": "m1", "other": "m2"},
        deployments={"d1": d1, "d2": d2},
        api_key_hashes=frozenset({hashlib.sha256(KEY.encode()).hexdigest()}),
        invoke_keys={digest: frozenset({"m1"})},
    )
    gw.loop.call_soon_threadsafe(gw.gateway.set_table, table)
    wait_for(lambda: gw.gateway.table.version == gw.version, 5, "table applied")
    invoke = {"Authorization": f"Api-Key {INVOKE_KEY}"}
    with httpx.Client(base_url=gw.url) as c:
        assert c.post("/models/echo/production/predict", content=b"a", headers=invoke).is_success
        assert c.post("/models/m1/deployment/d1/sync/echo", content=b"a", headers=invoke).is_success
        r = c.post("/models/echo/production/websocket", headers=invoke)
        assert r.status_code == 400 and r.json()["code"] == "websocket_required"  # its own
        assert c.post("/models/echo/staging/predict", headers=invoke).status_code == 404
        for path in (
            "/models/other/production/predict",
            "/models/m2/deployment/d2/sync/x",
            "/models/other/production/websocket",
            "/models/other/staging/predict",
            "/models/nope/production/predict",
            "/elsewhere",
        ):
            r = c.post(path, content=b"a", headers=invoke)
            assert r.status_code == 403, (path, r.text)
            assert r.json()["code"] == "forbidden" and "may call model(s) m1" in r.json()["error"]
        r = c.post("/models/echo/production/predict", headers={"Host": "model-m2.localhost"})
        assert r.status_code == 401
        r = c.post("/", headers={"Host": "model-m2.localhost", **invoke})
        assert r.status_code == 403
        # the admin key reaches both
        assert c.post("/models/other/production/predict", content=b"a", headers=AUTH).is_success
    handshake_other = _handshake("/models/other/production/websocket", key=INVOKE_KEY)
    assert raw_exchange(gw.port, handshake_other).startswith(b"HTTP/1.1 403 ")
    with httpx.Client(base_url=gw.url) as c:
        gw.table(d1)  # a table without the invoke key: revoked
        r = c.post("/models/echo/production/predict", content=b"a", headers=invoke)
        assert r.status_code == 401


def test_a_sender_that_retries_itself_is_not_retried_by_the_gateway(
    gw: Running, up: Upstream
) -> None:
    """The async workers retry per inference_retry_config: a replica that took their request
    and hung up must not have the gateway run it again on another one (after a control
    plane's crash the gateway re-ran a worker's request that nobody waited for any more,
    and the model ran it twice more, not once). Shown with a PUT: a POST the replica read
    whole is not retried with or without the header (it may have run)."""
    dropping = _Dropping(keep=0)
    try:
        gw.table(route(up, dropping.port, predict_path="/inspect"))
        head = (
            b"PUT /models/echo/production/predict HTTP/1.1\r\nHost: x\r\nAuthorization: "
            b"Api-Key " + KEY.encode() + b"\r\nContent-Length: 3\r\nConnection: close\r\n"
        )
        statuses = set()
        for _ in range(4):  # replicas are taken in turn: some land on the dropping one
            answer = raw_exchange(gw.port, head + b"X-Kingpost-No-Retry: 1\r\n\r\nabc")
            statuses.add(_answers(answer)[0][0])
        assert dropping.drops >= 1
        assert statuses == {b"HTTP/1.1 200 OK", b"HTTP/1.1 502 Bad Gateway"}
        counters = gw.gateway._dispatchers["d1"].counters
        assert counters.retries == 0  # none was retried, so none is counted as one
        for _ in range(4):  # without the header, the one that hung up is retried elsewhere
            assert _answers(raw_exchange(gw.port, head + b"\r\nabc"))[0][0] == b"HTTP/1.1 200 OK"
        assert counters.retries >= 1
    finally:
        dropping.sock.close()


@pytest.fixture(params=["asyncio", "uvloop"])
def either_gw(request: pytest.FixtureRequest) -> Iterator[Running]:
    """The gateway on asyncio's loop and on uvloop: their reads and write buffers differ."""
    running = Running(uvloop.new_event_loop() if request.param == "uvloop" else None)
    try:
        yield running
    finally:
        running.close()


@pytest.mark.parametrize("held", [False, True], ids=["answers-unread", "behind-a-held-one"])
def test_a_client_that_pipelines_without_reading_is_read_no_further(
    either_gw: Running, up: Upstream, held: bool
) -> None:
    """A client that pipelined requests and read no answer had the gateway parse and queue
    all it sent (435,000 requests behind a held one: 782 MB) or write all their answers
    into its buffer (401s: 160 MB). Reading stops at PIPELINE_LIMIT queued requests or a
    full write buffer; once the client reads, every request is answered, in order."""
    gw = either_gw
    gw.table(route(up, predict_path="/held"))
    key = b"Authorization: Api-Key " + KEY.encode() + b"\r\n" if held else b""
    n = 40_000  # requests the gateway answers itself: 404 with the key, else 401

    def one(i: int, path: bytes = b"/models/other/production/predict") -> bytes:
        close = b"Connection: close\r\n" if i == n else b""
        rid = b"X-Baseten-Request-Id: p%06d\r\n" % i
        return b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n" + key + rid + close + b"\r\n"

    first = one(0, b"/models/echo/production/predict")  # held by the replica, or a 401
    payload = b"".join(one(i) for i in range(1, n + 1))
    with socket.socket() as s:
        # Small kernel buffers, so that what piles up is the gateway's to hold.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
        s.settimeout(30)
        s.connect(("127.0.0.1", gw.port))
        s.sendall(first)
        if held:
            wait_for(lambda: up.requests == 1, 5, "the first request to reach the replica")
        sender = threading.Thread(target=s.sendall, args=(payload,), daemon=True)
        sender.start()
        sender.join(2)
        (conn,) = gw.gateway.clients
        # The gateway stopped reading. Whether the sender blocks too is the kernel's say:
        # loopback receive buffers autotune up to tcp_rmem's maximum (32 MiB here), which
        # can hold the whole payload (a CI run saw sendall finish).
        assert conn.holding, "the gateway kept reading a client that reads no answers"
        # One read's worth past the limit at most: a read is parsed whole.
        assert len(conn.pending) <= PIPELINE_LIMIT + 256 * 1024 // len(one(1))
        assert conn.transport is not None
        assert conn.transport.get_write_buffer_size() <= 2 * 64 * 1024  # the high-water mark
        up.release.set()
        data = b""
        while chunk := s.recv(1 << 20):
            data += chunk
        sender.join(10)
    rids = re.findall(rb"\r\nx-baseten-request-id: (p\d+)\r\n", data)
    assert rids == [b"p%06d" % i for i in range(n + 1)]  # all answered, in order
    statuses = Counter(re.findall(rb"HTTP/1\.1 (\d+) ", data))
    assert statuses == ({b"200": 1, b"404": n} if held else {b"401": n + 1})
