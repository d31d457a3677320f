"""The gateway's control channel: a tiny HTTP/1.1 server on a Unix socket.

``PUT /table`` replaces the routing table (JSON of ``RoutingTable.to_json()``), ``GET
/table`` (token-guarded) gives it back to a control plane that adopts the gateway,
``GET /table/version`` and ``GET /healthz`` report (the latter with the gateway's
Kingpost version, which a restarted control plane checks before adopting it), ``GET
/stats`` gives the gateway's figures, and ``GET /demand?wait=S`` (a long poll) answers,
as soon as there are any, the deployments that requests wait for with no ready replica.

Only the control plane may push a table. Three locks, each enough against a replica
that runs as another user, the last one also against one that runs as the same user:
the socket file is 0600; the peer's credentials (``SO_PEERCRED``) must carry the
gateway's own uid; and, when the gateway was given a control token, ``PUT /table``
must present it in :data:`TOKEN_HEADER`. ``kingpost server`` always gives one: a
random token it hands the gateway through an inherited pipe (never an environment
variable or a command line, which a replica of the same user could read). To adopt the
gateway after a crash, the control plane also keeps it in its 0600 gateway record under
the home (``gateway_process.py``), which isolated replicas do not see, as ``secret.key``.
A refused request is answered 403 with a JSON error and logged as a warning.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import socket
import struct
import sys
import threading
import time
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from kingpost import __version__
from kingpost.errors import KingpostError
from kingpost.gateway.stats import GatewayStats
from kingpost.gateway.table import RoutingTable

if TYPE_CHECKING:
    from kingpost.gateway.server import Gateway

__all__ = [
    "TOKEN_HEADER",
    "control_socket_paths",
    "fetch_demand",
    "fetch_stats",
    "push_table",
    "read_token_fd",
    "serve_control",
]

log = logging.getLogger("kingpost.gateway.control")

MAX_TABLE_BYTES = 64 * 1024 * 1024
TOKEN_HEADER = "x-kingpost-control-token"
MAX_TOKEN_BYTES = 4096


def read_token_fd(fd: int) -> str:
    """Read a control token from an inherited pipe to its end, and close it."""
    with os.fdopen(fd, "rb") as pipe:
        token = pipe.read(MAX_TOKEN_BYTES + 1).decode().strip()
    if not token or len(token) > MAX_TOKEN_BYTES:
        raise ValueError(f"control token on fd {fd}: empty or over {MAX_TOKEN_BYTES} bytes")
    return token


def control_socket_paths(base: Path, workers: int) -> list[Path]:
    """The control socket of each of ``workers`` gateway processes."""
    if workers <= 1:
        return [base]
    return [base.with_name(f"{base.stem}-{i}{base.suffix}") for i in range(workers)]


_clients: dict[str, httpx.Client] = {}
_clients_lock = threading.Lock()


def _client(socket_path: Path) -> httpx.Client:
    """One client per control socket, kept: making an httpx client builds TLS contexts
    (35-110 ms on a loaded machine), which a table push or a wake must not pay each time."""
    key = str(socket_path)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            transport = httpx.HTTPTransport(uds=key, verify=False)  # a Unix socket: no TLS
            client = _clients[key] = httpx.Client(transport=transport, verify=False)
        return client


def push_table(
    socket_path: Path, table: RoutingTable, timeout: float = 2.0, *, token: str | None = None
) -> None:
    body = json.dumps(table.to_json()).encode()
    headers = {"content-type": "application/json"}
    if token is not None:
        headers[TOKEN_HEADER] = token
    try:
        r = _client(socket_path).put(
            "http://gateway/table", content=body, headers=headers, timeout=timeout
        )
    except httpx.TransportError as exc:
        raise KingpostError(f"gateway control socket {socket_path}: {exc}") from exc
    if r.status_code == 409:
        log.warning(
            "gateway %s kept its table (%s), newer than the pushed version %s",
            socket_path,
            r.text[:100],
            table.version,
        )
    elif r.status_code != 200:
        raise KingpostError(
            f"gateway refused the routing table: HTTP {r.status_code} {r.text[:200]}"
        )


def fetch_stats(socket_path: Path, timeout: float = 2.0) -> GatewayStats:
    """One gateway worker's figures (``GET /stats`` on its control socket)."""
    try:
        r = _client(socket_path).get("http://gateway/stats", timeout=timeout)
    except httpx.TransportError as exc:
        raise KingpostError(f"gateway control socket {socket_path}: {exc}") from exc
    if r.status_code != 200:
        raise KingpostError(f"gateway stats: HTTP {r.status_code} {r.text[:200]}")
    return GatewayStats.from_json(r.json())


def fetch_demand(
    socket_path: Path, wait_s: float = 20.0, *, token: str | None = None
) -> dict[str, int]:
    """Deployments that requests wait for with no ready replica, as one gateway worker
    noted them: a long poll that answers at once when there are any, else after
    ``wait_s`` with none."""
    headers = {TOKEN_HEADER: token} if token is not None else {}
    try:
        r = _client(socket_path).get(
            f"http://gateway/demand?wait={wait_s}", headers=headers, timeout=wait_s + 5
        )
    except httpx.TransportError as exc:
        raise KingpostError(f"gateway control socket {socket_path}: {exc}") from exc
    if r.status_code != 200:
        raise KingpostError(f"gateway demand: HTTP {r.status_code} {r.text[:200]}")
    return {str(k): int(v) for k, v in r.json()["deployments"].items()}


def _response(status: int, body: object) -> bytes:
    data = json.dumps(body).encode()
    return (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(data)}\r\n"
        "connection: close\r\n\r\n"
    ).encode() + data


def _peer(writer: asyncio.StreamWriter) -> tuple[int, int] | None:
    """The connecting process's (pid, uid), where the OS tells (Linux ``SO_PEERCRED``)."""
    sock = writer.get_extra_info("socket")
    if sock is None or sys.platform != "linux":
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _ = struct.unpack("3i", raw)
    return pid, uid


def _refusal(peer: tuple[int, int] | None, headers: dict[str, str], token: str | None) -> str:
    """Why a peer may not push a table ("" when it may)."""
    if peer is not None and peer[1] != os.geteuid():
        return f"peer uid {peer[1]} is not the control plane's uid {os.geteuid()}"
    if token is None:
        return ""
    offered = headers.get(TOKEN_HEADER)
    if offered is None:
        return f"no {TOKEN_HEADER} header"
    if not hmac.compare_digest(offered.encode(), token.encode()):
        return f"wrong {TOKEN_HEADER}"
    return ""


async def _handle(
    gateway: Gateway,
    token: str | None,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> None:
    try:
        peer = _peer(writer)
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        who = f"pid {peer[0]} uid {peer[1]}" if peer is not None else "a peer of unknown pid"
        # A demand poll takes what it reads: only the control plane may, or a replica of
        # the same user could swallow the wake-ups of a deployment at zero.
        guarded = method == "PUT" or path.startswith("/demand") or path == "/table"
        refused = _refusal(peer, headers, token if guarded else None)
        if refused:
            log.warning("control socket: REFUSED %s %s from %s: %s", method, path, who, refused)
            writer.write(_response(403, {"error": f"control request refused: {refused}"}))
            return
        if length > MAX_TABLE_BYTES:
            writer.write(_response(413, {"error": "table too large"}))
            return
        body = await reader.readexactly(length) if length else b""
        if method == "PUT" and path == "/table":
            table = RoutingTable.from_json(json.loads(body))
            accepted = gateway.set_table(table)
            gateway.control_seen = time.monotonic()  # a control plane is there
            if not accepted:
                log.warning(
                    "control socket: kept table version %d; %s pushed older version %d",
                    gateway.table.version,
                    who,
                    table.version,
                )
            writer.write(_response(200 if accepted else 409, {"version": gateway.table.version}))
        elif method == "GET" and path.startswith("/demand"):
            wait = float(path.partition("wait=")[2] or 0)
            try:
                demand = await gateway.take_demand(min(max(wait, 0.0), 60.0))
            except asyncio.CancelledError:  # the gateway is closing: end the poll quietly
                writer.close()
                return
            writer.write(_response(200, {"deployments": demand}))
        elif method == "GET" and path == "/stats":
            writer.write(_response(200, gateway.stats().to_json()))
        elif method == "GET" and path == "/table":  # for a control plane adopting it
            writer.write(_response(200, gateway.table.to_json()))
        elif method == "GET" and path == "/table/version":
            writer.write(_response(200, {"version": gateway.table.version}))
        elif method == "GET" and path == "/healthz":
            writer.write(_response(200, {"status": "ok", "version": __version__}))
        else:
            writer.write(_response(404, {"error": f"no control route {method} {path}"}))
    except (ValueError, KeyError, TypeError) as exc:
        writer.write(_response(400, {"error": f"bad control request: {exc}"}))
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        pass
    finally:
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()


def _prepare_socket_path(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


async def serve_control(
    gateway: Gateway, path: Path, token: str | None = None
) -> asyncio.AbstractServer:
    """Serve the control socket at ``path``; with ``token``, ``PUT /table`` needs it."""
    _prepare_socket_path(path)
    server = await asyncio.start_unix_server(
        lambda r, w: _handle(gateway, token, r, w), path=str(path), limit=MAX_TABLE_BYTES
    )
    os.chmod(path, 0o600)
    if token is None:
        log.warning(
            "control socket %s: no control token; table pushes are checked by peer uid only",
            path,
        )
    return server
