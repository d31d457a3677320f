"""A gateway in-process on its own event loop thread, and raw upstreams that misbehave."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from helpers.platform import wait_for
from kingpost.gateway.server import Gateway
from kingpost.gateway.table import (
    DeploymentRoute,
    DeploymentState,
    ModelRoute,
    RoutingTable,
    Upstream,
)

KEY = "kp_test_key"
AUTH = {"Authorization": f"Api-Key {KEY}"}


class RunningGateway:
    """A :class:`Gateway` on 127.0.0.1 (a free port), run by a loop in a thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None, **attrs: Any) -> None:
        self.loop = loop or asyncio.new_event_loop()
        self.gateway = Gateway()
        for name, value in attrs.items():  # class-level settings (timeouts) for this one
            setattr(self.gateway, name, value)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        fut = asyncio.run_coroutine_threadsafe(self.gateway.start("127.0.0.1", 0), self.loop)
        self.port: int = fut.result(5)
        self.url = f"http://127.0.0.1:{self.port}"
        self.version = 0

    def table(self, *deps: DeploymentRoute, env: str = "d1") -> None:
        """Model ``echo`` (id ``m1``) whose production environment is deployment ``env``."""
        self.version += 1
        table = RoutingTable(
            version=self.version,
            models={"m1": ModelRoute("m1", "echo", {"production": ((env, 1.0),)})},
            model_names={"echo": "m1"},
            deployments={d.deployment_id: d for d in deps},
            api_key_hashes=frozenset({hashlib.sha256(KEY.encode()).hexdigest()}),
        )
        self.loop.call_soon_threadsafe(self.gateway.set_table, table)
        wait_for(lambda: self.gateway.table.version == self.version, 5, "table applied")

    def close(self) -> None:
        async def shutdown() -> None:
            await self.gateway.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def route(*ports: int, **kw: Any) -> DeploymentRoute:
    """Deployment ``d1`` of model ``echo`` served by replicas on ``ports``."""
    upstreams = tuple(Upstream(f"r{i}", "127.0.0.1", p) for i, p in enumerate(ports))
    base = DeploymentRoute("d1", "m1", "/", DeploymentState.SERVING, upstreams, concurrency=64)
    return replace(base, **kw)


class RawServer:
    """A TCP server that runs ``serve(conn)`` in a thread per connection, for upstreams
    that do what no well-behaved HTTP server does."""

    def __init__(self, serve: Callable[[socket.socket], None]) -> None:
        self.serve = serve
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            self.serve(conn)

    def close(self) -> None:
        self.sock.close()


def read_head(f: Any) -> tuple[bytes, dict[bytes, bytes]] | None:
    """The request line and headers (lowercased names) from a buffered reader; None at EOF."""
    line = f.readline()
    if not line:
        return None
    headers: dict[bytes, bytes] = {}
    while (h := f.readline()) not in (b"\r\n", b""):
        name, _, value = h.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return line.rstrip(b"\r\n"), headers


def answer(body: bytes, *extra: bytes) -> bytes:
    head = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n" % len(body) + b"".join(extra)
    return head + b"\r\n" + body
