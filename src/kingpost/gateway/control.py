"""The gateway's control channel: a tiny HTTP/1.1 server on a Unix socket.

``PUT /table`` replaces the routing table (JSON of ``RoutingTable.to_json()``),
``GET /table/version`` and ``GET /healthz`` report. Only the local controller
can reach it (file permissions 0600).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from kingpost.errors import KingpostError
from kingpost.gateway.table import RoutingTable

if TYPE_CHECKING:
    from kingpost.gateway.server import Gateway

__all__ = ["control_socket_paths", "push_table", "serve_control"]

MAX_TABLE_BYTES = 64 * 1024 * 1024


def control_socket_paths(base: Path, workers: int) -> list[Path]:
    """The control socket of each of ``workers`` gateway processes."""
    if workers <= 1:
        return [base]
    return [base.with_name(f"{base.stem}-{i}{base.suffix}") for i in range(workers)]


def push_table(socket_path: Path, table: RoutingTable, timeout: float = 2.0) -> None:
    body = json.dumps(table.to_json()).encode()
    try:
        with httpx.Client(
            transport=httpx.HTTPTransport(uds=str(socket_path)), timeout=timeout
        ) as c:
            r = c.put(
                "http://gateway/table", content=body, headers={"content-type": "application/json"}
            )
    except httpx.TransportError as exc:
        raise KingpostError(f"gateway control socket {socket_path}: {exc}") from exc
    if r.status_code not in (200, 409):
        raise KingpostError(
            f"gateway refused the routing table: HTTP {r.status_code} {r.text[:200]}"
        )


def _response(status: int, body: object) -> bytes:
    data = json.dumps(body).encode()
    return (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(data)}\r\n"
        "connection: close\r\n\r\n"
    ).encode() + data


async def _handle(
    gateway: Gateway, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
        if length > MAX_TABLE_BYTES:
            writer.write(_response(413, {"error": "table too large"}))
            return
        body = await reader.readexactly(length) if length else b""
        if method == "PUT" and path == "/table":
            table = RoutingTable.from_json(json.loads(body))
            accepted = gateway.set_table(table)
            writer.write(_response(200 if accepted else 409, {"version": gateway.table.version}))
        elif method == "GET" and path == "/table/version":
            writer.write(_response(200, {"version": gateway.table.version}))
        elif method == "GET" and path == "/healthz":
            writer.write(_response(200, {"status": "ok"}))
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


async def serve_control(gateway: Gateway, path: Path) -> asyncio.AbstractServer:
    _prepare_socket_path(path)
    server = await asyncio.start_unix_server(
        lambda r, w: _handle(gateway, r, w), path=str(path), limit=MAX_TABLE_BYTES
    )
    os.chmod(path, 0o600)
    return server
