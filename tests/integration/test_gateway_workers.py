"""`python -m kingpost.gateway --workers N`: N processes share the port (SO_REUSEPORT)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx

from helpers.platform import free_port, wait_for
from helpers.upstream import upstream
from kingpost.gateway import control_socket_paths, push_table
from kingpost.gateway.table import (
    DeploymentRoute,
    DeploymentState,
    ModelRoute,
    RoutingTable,
    Upstream,
)

KEY = "kp_workers"


def control_get(path: Path, target: str) -> tuple[bytes, object]:
    """One request on a control socket, read to its close: (status line, JSON body)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(f"GET {target} HTTP/1.1\r\nhost: gateway\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head.split(b"\r\n", 1)[0], json.loads(body)


def test_two_workers_share_the_port_and_each_gets_the_table(tmp_path: Path) -> None:
    port = free_port()
    base = tmp_path / "gw.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "kingpost.gateway", "--port", str(port),
         "--control-socket", str(base), "--workers", "2"],
        start_new_session=True,
    )  # fmt: skip
    try:
        sockets = control_socket_paths(base, 2)
        assert [s.name for s in sockets] == ["gw-0.sock", "gw-1.sock"]
        wait_for(lambda: all(s.exists() for s in sockets), 20, "both control sockets")
        with upstream() as up:
            table = RoutingTable(
                version=1,
                models={"m": ModelRoute("m", "w", {"production": (("d", 1.0),)})},
                model_names={"w": "m"},
                deployments={
                    "d": DeploymentRoute(
                        "d",
                        "m",
                        "/echo",
                        DeploymentState.SERVING,
                        (Upstream("r", "127.0.0.1", up.port),),
                        concurrency=8,
                    )
                },
                api_key_hashes=frozenset({hashlib.sha256(KEY.encode()).hexdigest()}),
            )
            for sock in sockets:
                push_table(sock, table)
            assert control_get(sockets[0], "/table/version") == (b"HTTP/1.1 200 OK", {"version": 1})
            pids = set()
            for i in range(40):  # fresh connections, spread by the kernel
                r = httpx.post(
                    f"http://127.0.0.1:{port}/models/w/production/predict",
                    content=f"{i}".encode(),
                    headers={"Authorization": f"Api-Key {KEY}", "Connection": "close"},
                )
                assert r.status_code == 200 and r.text == f"{i}"
            children = subprocess.run(
                ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True
            ).stdout.split()
            pids.update(children)
            assert len(pids) == 2
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)
