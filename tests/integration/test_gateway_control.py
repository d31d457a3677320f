"""The gateway's control socket takes tables from the control plane only.

A replica that reaches the socket (same uid, or a socket file left open to it) and
writes ``PUT /table`` with a huge version must not take over routing.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from helpers.platform import free_port, wait_for
from helpers.upstream import Upstream, upstream
from kingpost.gateway import push_table
from kingpost.gateway.control import TOKEN_HEADER
from kingpost.gateway.server import Gateway
from kingpost.gateway.table import (
    DeploymentRoute,
    DeploymentState,
    ModelRoute,
    RoutingTable,
)
from kingpost.gateway.table import Upstream as Up
from kingpost.serve import _start_gateway, gateway_sockets
from kingpost.settings import Settings

KEY = "kp_control_test"
TOKEN = "the-controllers-token"


def table(version: int, up: Upstream, key: str = KEY) -> RoutingTable:
    return RoutingTable(
        version=version,
        models={"m": ModelRoute("m", "w", {"production": (("d", 1.0),)})},
        model_names={"w": "m"},
        deployments={
            "d": DeploymentRoute(
                "d", "m", "/echo", DeploymentState.SERVING, (Up("r", "127.0.0.1", up.port),)
            )
        },
        api_key_hashes=frozenset({hashlib.sha256(key.encode()).hexdigest()}),
    )


def raw_put(sock_path: Path, body: bytes, token: str | None) -> tuple[int, dict[str, str]]:
    """A foreign client's ``PUT /table``, written by hand: (status, JSON answer)."""
    extra = f"{TOKEN_HEADER}: {token}\r\n" if token is not None else ""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(sock_path))
        s.sendall(
            f"PUT /table HTTP/1.1\r\nhost: gateway\r\n{extra}"
            f"content-length: {len(body)}\r\n\r\n".encode()
            + body
        )
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(rest)


def version(sock_path: Path) -> int:
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock_path))) as c:
        return int(c.get("http://gateway/table/version").json()["version"])


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[tuple[Settings, Path]]:
    settings = Settings(home=tmp_path / "home", gateway_port=free_port())
    proc = _start_gateway(settings, TOKEN)
    try:
        [sock] = gateway_sockets(settings)
        wait_for(sock.exists, 20, "the control socket")
        yield settings, sock
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)


def test_a_foreign_table_push_is_refused_and_routing_kept(
    gateway: tuple[Settings, Path],
) -> None:
    settings, sock = gateway
    with upstream() as mine, upstream() as theirs:
        push_table(sock, table(1, mine), token=TOKEN)
        predict = f"{settings.gateway_url}/models/w/production/predict"
        auth = {"Authorization": f"Api-Key {KEY}"}
        assert httpx.post(predict, content=b"a", headers=auth).text == "a"
        hostile = json.dumps(table(10**12, theirs, key="kp_mine").to_json()).encode()
        for token in (None, "guessed"):
            status, answer = raw_put(sock, hostile, token)
            assert status == 403 and TOKEN_HEADER in answer["error"], answer
        assert version(sock) == 1
        r = httpx.post(predict, content=b"b", headers={"Authorization": "Api-Key kp_mine"})
        assert r.status_code == 401
        assert httpx.post(predict, content=b"c", headers=auth).text == "c"
        assert theirs.requests == 0 and mine.requests == 2
        # The controller's next push still lands.
        push_table(sock, table(2, theirs), token=TOKEN)
        assert version(sock) == 2
        assert httpx.post(predict, content=b"d", headers=auth).text == "d"
        assert theirs.requests == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another uid")
def test_a_peer_of_another_uid_is_refused_even_with_the_token(
    gateway: tuple[Settings, Path],
) -> None:
    _, sock = gateway
    with upstream() as up:
        body = json.dumps(table(7, up).to_json()).encode()
        # As if the socket file's mode let it in: the peer's credentials still count.
        # (It starts from the socket's directory, so the home's 0700 does not stop it.)
        sock.chmod(0o666)
        sock.parent.chmod(0o711)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                os.chdir(sock.parent)
                os.setgid(65534)
                os.setuid(65534)
                status, answer = raw_put(Path(sock.name), body, TOKEN)
                os.write(write, json.dumps([status, answer]).encode())
            except BaseException as exc:
                os.write(write, json.dumps([0, {"error": repr(exc)}]).encode())
            finally:
                os._exit(0)
        os.close(write)
        with os.fdopen(read) as pipe:
            status, answer = json.loads(pipe.read())
        os.waitpid(pid, 0)
        assert status == 403 and "peer uid 65534" in answer["error"], answer
        assert version(sock) == 0


def test_a_refused_push_is_logged_as_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    gw = Gateway()
    sock = tmp_path / "gw.sock"
    start = gw.start("127.0.0.1", 0, control_socket=sock, control_token=TOKEN)
    asyncio.run_coroutine_threadsafe(start, loop).result(5)
    try:
        with caplog.at_level(logging.WARNING, logger="kingpost.gateway.control"), upstream() as up:
            status, _ = raw_put(sock, json.dumps(table(99, up).to_json()).encode(), None)
        assert status == 403 and gw.table.version == 0
        assert any("REFUSED PUT /table" in r.getMessage() for r in caplog.records)
        assert any(f"pid {os.getpid()}" in r.getMessage() for r in caplog.records)
    finally:
        asyncio.run_coroutine_threadsafe(gw.close(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def test_every_worker_gets_the_token(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home", gateway_port=free_port(), gateway_workers=2)
    proc = _start_gateway(settings, TOKEN)
    try:
        sockets = gateway_sockets(settings)
        wait_for(lambda: all(s.exists() for s in sockets), 20, "both control sockets")
        with upstream() as up:
            body = json.dumps(table(5, up).to_json()).encode()
            for sock in sockets:
                assert raw_put(sock, body, None)[0] == 403
                push_table(sock, table(3, up), token=TOKEN)
                assert version(sock) == 3
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)


def _stats_table(up: Upstream) -> RoutingTable:
    """One replica taking one request at a time, on a path that holds its answer."""
    return RoutingTable(
        version=1,
        models={"m": ModelRoute("m", "w", {"production": (("d", 1.0),)})},
        model_names={"w": "m"},
        deployments={
            "d": DeploymentRoute(
                "d", "m", "/gated-stream", DeploymentState.SERVING,
                (Up("r", "127.0.0.1", up.port),), concurrency=1,
            )
        },
        api_key_hashes=frozenset({hashlib.sha256(KEY.encode()).hexdigest()}),
    )  # fmt: skip


def test_the_stats_channel_reports_in_flight_queued_and_answered(
    gateway: tuple[Settings, Path],
) -> None:
    """`GET /stats` on the control socket: what the controller pulls for the autoscaler."""
    from concurrent.futures import ThreadPoolExecutor

    from kingpost.gateway import fetch_stats
    from kingpost.serve import _stats_puller

    settings, sock = gateway
    predict = f"{settings.gateway_url}/models/w/production/predict"
    auth = {"Authorization": f"Api-Key {KEY}"}
    with upstream() as up, ThreadPoolExecutor(3) as pool:
        push_table(sock, _stats_table(up), token=TOKEN)
        calls = [pool.submit(httpx.post, predict, headers=auth, timeout=30) for _ in range(3)]
        held = wait_for(
            lambda: (s := fetch_stats(sock).deployments.get("d")) and s.queued == 2 and s,
            20, "one request in flight and two queued",
        )  # fmt: skip
        assert held and held.inflight == {"r": 1} and held.answered["2xx"] == 0
        up.gate.set()
        assert [c.result().status_code for c in calls] == [200, 200, 200]
    merged = _stats_puller(settings)()  # as the controller pulls it: every worker, merged
    done = merged.deployments["d"]
    assert (merged.workers, done.queued, done.inflight_total) == (1, 0, 0)
    assert done.answered["2xx"] == 3 and done.latency_sum_s > 0
