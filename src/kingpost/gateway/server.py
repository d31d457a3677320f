"""The gateway process: client listener, routing table, dispatchers, upstream pool."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import logging
import os
import socket
import time
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

from kingpost.gateway.access import AccessLines
from kingpost.gateway.control import serve_control
from kingpost.gateway.dispatch import Dispatcher
from kingpost.gateway.proxy import ClientConn, Request
from kingpost.gateway.routing import Miss, Target, resolve
from kingpost.gateway.stats import GatewayStats
from kingpost.gateway.table import (
    ADMIN,
    DeploymentRoute,
    DeploymentState,
    KeyScope,
    RoutingTable,
)
from kingpost.gateway.upstream import UpstreamPool
from kingpost.netns import forget_netns

if TYPE_CHECKING:
    from kingpost.gateway.asyncroutes import AsyncFront
    from kingpost.gateway.proxy import Request
    from kingpost.gateway.tracing import GatewayTracer

__all__ = ["Gateway"]

access_log = logging.getLogger("kingpost.gateway.access")
_AUTH_CACHE = 4096
_ROUTE_CACHE = 1024


def _absolute_form(host: bytes, target: bytes) -> tuple[bytes, bytes]:
    """``http://authority/path``, which a server MUST accept (RFC 9112 3.2.2): its
    authority stands for Host, and the path is what is routed."""
    scheme, sep, rest = target.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        return host, target
    authority, slash, path = rest.partition(b"/")
    return authority, slash + path if slash else b"/"


class Gateway:
    """Routes requests by the last pushed :class:`RoutingTable`; never reads the store."""

    head_timeout_s = 30.0
    """A connection with no request in flight must send a whole request head in this time."""
    idle_timeout_s = 650.0
    """A connection idle after its answers is closed after this; longer than the idle
    timeouts of the load balancers a gateway sits behind (AWS 60 s, Google Cloud 600 s),
    so that it is they that close, never a gateway under a request they just sent."""
    body_timeout_s = 30.0
    body_min_rate = 500
    """A request body must arrive within ``body_timeout_s`` plus one second per
    ``body_min_rate`` bytes received (so a large upload at a fair rate is never cut, and a
    trickle is): past that it is answered 408 and its connection closed."""
    sweep_s = 5.0
    """How often connections are checked against the timeouts above and the deployments'
    response timeouts (so each is enforced to within this)."""

    def __init__(
        self,
        table: RoutingTable | None = None,
        *,
        access_log_enabled: bool = False,
        access_store: AccessLines | None = None,
        tracer: GatewayTracer | None = None,
    ) -> None:
        self.table = table or RoutingTable()
        self.control_seen = time.monotonic()
        """When a control plane last pushed a table (monotonic): see ``--orphan-timeout``."""
        self.pool = UpstreamPool()
        self._dispatchers: dict[str, Dispatcher] = {}
        self._auth: OrderedDict[bytes, KeyScope | None] = OrderedDict()
        self._routes: dict[tuple[bytes, bytes], Target | Miss] = {}
        self._servers: list[asyncio.AbstractServer] = []
        self.clients: set[ClientConn] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self._log = access_log_enabled
        self.access_store = access_store
        """Where access lines are kept (``gateway/access.py``); None: not kept."""
        self.tracer = tracer
        """Spans of requests (``gateway/tracing.py``); None: tracing is off."""
        # Request ids: a random 64-bit prefix per process and a counter, 32 hex digits like
        # a UUID; no system call per request, unique across workers and restarts.
        self._id_prefix = os.urandom(8).hex()
        self._ids = itertools.count(1)
        self._demand: dict[str, int] = {}
        """Deployments with requests waiting and no ready replica, not yet told."""
        self._demand_waiters: list[asyncio.Future[None]] = []
        self.async_front: AsyncFront | None = None
        """Answers async inference routes from the store; None: they answer 503."""

    def new_request_id(self) -> str:
        return f"{self._id_prefix}{next(self._ids):016x}"

    # -- table -------------------------------------------------------------------------
    def set_table(self, table: RoutingTable) -> bool:
        """Replace the table unless it is older than the current one."""
        if table.version < self.table.version:
            return False
        old_netns = {
            u.netns for d in self.table.deployments.values() for u in d.upstreams if u.netns
        }
        if (
            table.api_key_hashes != self.table.api_key_hashes
            or table.invoke_keys != self.table.invoke_keys
        ):
            self._auth.clear()  # a revoked key stops working with this table
        self.table = table
        self._routes = {}
        for dep_id, dispatcher in list(self._dispatchers.items()):
            route = table.deployments.get(dep_id)
            if route is None:
                route = DeploymentRoute(
                    dep_id,
                    dispatcher.route.model_id,
                    "/",
                    DeploymentState.INACTIVE,
                    message="deployment not found",
                )
                del self._dispatchers[dep_id]
            dispatcher.update(route)
        live = {(u.host, u.port, u.netns) for d in table.deployments.values() for u in d.upstreams}
        self.pool.prune(live)
        for path in old_netns - {k[2] for k in live if k[2]}:
            forget_netns(path)
        return True

    def stats(self) -> GatewayStats:
        """This process's figures per deployment (the control socket's ``GET /stats``)."""
        table = self.table
        labels = {}
        for dep_id in self._dispatchers:
            route = table.deployments.get(dep_id)
            if route is not None:
                model = table.models.get(route.model_id)
                labels[dep_id] = {
                    "model": model.name if model is not None else route.model_id,
                    "deployment": route.name or dep_id,
                    "environment": route.environment,
                }
        return GatewayStats(
            {dep: d.snapshot() for dep, d in self._dispatchers.items()},
            labels=labels,
            control_age_s=time.monotonic() - self.control_seen,
        )

    def dispatcher(self, deployment_id: str) -> Dispatcher:
        d = self._dispatchers.get(deployment_id)
        if d is None:
            d = self._dispatchers[deployment_id] = Dispatcher(self.table.deployments[deployment_id])
            d.on_cold = self.note_demand
        return d

    # -- demand for deployments with no ready replica ------------------------------------
    def note_demand(self, deployment_id: str, waiting: int) -> None:
        """Requests wait for ``deployment_id`` and no replica is ready: tell the control
        plane now (it long-polls ``GET /demand``), so a deployment at zero starts at once."""
        self._demand[deployment_id] = max(waiting, self._demand.get(deployment_id, 0))
        waiters, self._demand_waiters = self._demand_waiters, []
        for f in waiters:
            if not f.done():
                f.set_result(None)

    async def take_demand(self, wait_s: float) -> dict[str, int]:
        """The deployments noted since the last call, waiting up to ``wait_s`` for one."""
        if not self._demand and wait_s > 0:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._demand_waiters.append(future)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(future, wait_s)
            with contextlib.suppress(ValueError):
                self._demand_waiters.remove(future)
        demand, self._demand = self._demand, {}
        return demand

    def route(self, host: bytes, url: bytes) -> Target | Miss:
        """Where a request for ``url`` with Host ``host`` goes under the current table.

        Answers are kept per table (the common case is the same few URLs over and over),
        except a draw from a weighted split, which must be drawn again for every request.
        """
        key = (host, url)
        found = self._routes.get(key)
        if found is not None:
            return found
        raw_path, _, raw_query = url.partition(b"?")
        if raw_path[:1] != b"/":
            host, raw_path = _absolute_form(host, raw_path)
        found = resolve(
            self.table,
            host.decode("latin-1"),
            raw_path.decode("latin-1"),
            raw_query.decode("latin-1"),
        )
        if not found.weighted:
            if len(self._routes) >= _ROUTE_CACHE:
                self._routes.clear()  # many distinct URLs (query strings): start over
            self._routes[key] = found
        return found

    async def answer_async(self, client: ClientConn, req: Request, miss: Miss) -> bool:
        """An async inference route (``gateway/asyncroutes.py``)."""
        if self.async_front is None:
            assert req.rid is not None
            return client.reject(
                req,
                503,
                "async inference is not enabled on this gateway: it needs the store "
                "(`kingpost server` starts it with --async-store)",
                "async_unavailable",
                req.rid,
            )
        return await self.async_front.answer(client, req, miss)

    # -- auth ------------------------------------------------------------------------------
    def authorized(self, header: bytes | None) -> KeyScope | None:
        """The scope of the key in ``header``, or None for no key or an unknown one."""
        if not header:
            return None
        try:
            return self._auth[header]
        except KeyError:
            pass
        scheme, _, key = header.partition(b" ")
        scope: KeyScope | None = None
        if scheme.lower() in (b"api-key", b"bearer") and key.strip():
            digest = hashlib.sha256(key.strip()).hexdigest()
            if digest in self.table.api_key_hashes:
                scope = ADMIN
            elif (models := self.table.invoke_keys.get(digest)) is not None:
                scope = KeyScope(models)
        self._auth[header] = scope
        if len(self._auth) > _AUTH_CACHE:
            self._auth.popitem(last=False)
        return scope

    def log_access(
        self,
        rid: str,
        status: int,
        outcome: str,
        start: float,
        target: Target | None,
        req: Request | None = None,
    ) -> None:
        """One line per answer: ``status`` as the client got it (0: none, it left), and
        ``outcome`` "ok", "close" (the connection ended with it) or the gateway's error code.
        Counted for the stats channel too, per deployment (with ``req``: its bytes and its
        replica's time), and kept in the log store."""
        if target is not None:
            dispatcher = self._dispatchers.get(target.deployment.deployment_id)
            if dispatcher is not None:
                now = time.perf_counter()
                if req is None:
                    dispatcher.counters.record(status, now - start, target.kind)
                else:
                    up = req.upstream_at
                    dispatcher.counters.record(
                        status,
                        now - start,
                        target.kind,
                        now - up if up >= 0.0 else -1.0,
                        req.body_bytes,
                        req.bytes_out,
                    )
        if self.access_store is not None:
            self.access_store.add(rid, status, outcome, start, target, req)
        if self.tracer is not None:
            self.tracer.end(rid, status, outcome, start, target, req)
        if self._log and access_log.isEnabledFor(logging.INFO):
            access_log.info(
                json.dumps(
                    {
                        "request_id": rid,
                        "status": status or None,
                        "model_id": target.model_id if target is not None else None,
                        "deployment_id": (
                            target.deployment.deployment_id if target is not None else None
                        ),
                        "outcome": outcome,
                        "duration_ms": round((time.perf_counter() - start) * 1000, 3),
                    }
                )
            )

    # -- serving ------------------------------------------------------------------------------
    async def start(
        self,
        host: str,
        port: int,
        *,
        reuse_port: bool = False,
        control_socket: Path | None = None,
        control_token: str | None = None,
    ) -> int:
        """Listen on ``host:port`` (the port chosen when 0; returned), and on
        ``control_socket`` for tables, where ``control_token`` guards pushes."""
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(2048)
        sock.setblocking(False)
        server = await loop.create_server(lambda: ClientConn(self), sock=sock)
        self._servers.append(server)
        if self._sweeper is None:
            self._sweeper = loop.call_later(self.sweep_s, self._sweep)
        if control_socket is not None:
            self._servers.append(await serve_control(self, control_socket, control_token))
        return int(sock.getsockname()[1])

    def _sweep(self) -> None:
        now = time.perf_counter()
        for conn in list(self.clients):
            conn.close_if_stalled(now)
        self._sweeper = asyncio.get_running_loop().call_later(self.sweep_s, self._sweep)

    async def close(self) -> None:
        if self.access_store is not None:
            self.access_store.close()
        if self.tracer is not None:
            self.tracer.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for server in self._servers:
            server.close()
        for server in self._servers:
            await server.wait_closed()
        self.pool.close()
        if self.async_front is not None:
            self.async_front.close()
