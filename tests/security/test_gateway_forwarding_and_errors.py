"""What the gateway tells replicas about callers, and callers about the server.

``X-Forwarded-For`` from a client is kept but never taken alone: the address that
connected is appended. Errors a caller gets from the gateway name no server file paths;
the store and the logs keep the whole message.
"""

from __future__ import annotations

import hashlib
import json
import socket
from collections.abc import Iterator
from datetime import UTC, datetime

import httpx
import pytest

from helpers.gateway import AUTH, KEY, RawServer, RunningGateway, answer, read_head, route
from helpers.platform import wait_for
from kingpost.controller.table import build_table, public_message
from kingpost.store import DeploymentStatus, DeploymentView, DesiredState, EnvironmentView
from kingpost.store.repo import KeyScopes
from kingpost.store.views import ModelView


@pytest.fixture
def gw() -> Iterator[RunningGateway]:
    running = RunningGateway()
    try:
        yield running
    finally:
        running.close()


def _forwarded_for(conn: socket.socket) -> None:
    """Answer each request with its ``X-Forwarded-For`` headers, as a JSON list."""
    f = conn.makefile("rb")
    while f.readline() not in (b"", b"\r\n"):  # a request line
        values = []
        while (h := f.readline()) not in (b"\r\n", b""):
            name, _, value = h.partition(b":")
            if name.strip().lower() == b"x-forwarded-for":
                values.append(value.strip().decode())
        conn.sendall(answer(json.dumps(values).encode()))


def test_the_client_address_is_appended_to_x_forwarded_for(gw: RunningGateway) -> None:
    server = RawServer(_forwarded_for)
    try:
        gw.table(route(server.port))
        cases = [
            ([], ["127.0.0.1"]),
            (["203.0.113.9"], ["203.0.113.9, 127.0.0.1"]),
            (
                ["203.0.113.9", "198.51.100.1, 10.0.0.1"],
                ["203.0.113.9, 198.51.100.1, 10.0.0.1, 127.0.0.1"],
            ),
        ]
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
            f = s.makefile("rb")
            for sent, seen in cases:
                extra = "".join(f"X-Forwarded-For: {v}\r\n" for v in sent)
                s.sendall(
                    f"GET /models/echo/production/sync/x HTTP/1.1\r\nHost: gw\r\n"
                    f"Authorization: Api-Key {KEY}\r\n{extra}\r\n".encode()
                )
                parsed = read_head(f)
                assert parsed is not None
                body = f.read(int(parsed[1][b"content-length"]))
                assert json.loads(body) == seen, sent
    finally:
        server.close()


@pytest.mark.parametrize(
    ("message", "shown"),
    [
        (
            "pip exited 1: /home/ana/.kingpost/projects/ab12/venv/bin/pip install -r "
            "/home/ana/.kingpost/projects/ab12/requirements.txt",
            "pip exited 1: <path> install -r <path>",
        ),
        ("cannot read '/dev/shm/kingpost-0/d2/secrets/hf_token'", "cannot read '<path>'"),
        ("see ~/.kingpost/logs/d2.log", "see <path>"),
        ("store at /srv/kp/kingpost.db is locked", "store at <path> is locked"),
        # Not file paths: a replica's routes and URLs stay.
        ("GET /health answered 500", "GET /health answered 500"),
        (
            "POST http://127.0.0.1:8000/v1/models failed",
            "POST http://127.0.0.1:8000/v1/models failed",
        ),
    ],
)
def test_public_messages_name_no_server_paths(message: str, shown: str) -> None:
    assert public_message(message, ["/srv/kp"]) == shown


def test_a_failed_deployment_error_names_no_server_path(gw: RunningGateway) -> None:
    now = datetime.now(UTC)
    secret = "/home/ana/.kingpost/replicas/d1-0/app/server.py"
    failed = DeploymentView(
        id="d1",
        model_id="m1",
        name="v1",
        number=1,
        status=DeploymentStatus.FAILED,
        desired_state=DesiredState.ACTIVE,
        message=f"replica exited 1: python3 {secret}: No such file or directory",
        labels={},
        project_hash="ab12",
        config={},
        engine="process",
        is_development=False,
        min_replicas=1,
        max_replicas=1,
        created_at=now,
        updated_at=now,
    )
    table = build_table(
        version=7,
        domain="localhost",
        models=[ModelView("m1", "echo", now)],
        deployments=[failed],
        environments=[EnvironmentView("e1", "m1", "production", "d1", now)],
        ready={},
        shapes={},
        keys=KeyScopes(admin=frozenset({hashlib.sha256(KEY.encode()).hexdigest()})),
        private_paths=["/home/ana/.kingpost"],
    )
    gw.loop.call_soon_threadsafe(gw.gateway.set_table, table)
    wait_for(lambda: gw.gateway.table.version == 7, 5, "table applied")
    with httpx.Client(base_url=gw.url, headers=AUTH, timeout=10) as c:
        r = c.post("/models/echo/production/predict", content=b"{}")
    assert r.status_code == 404
    assert r.json()["error"] == (
        "deployment v1 failed: replica exited 1: python3 <path>: No such file or directory"
    )
    assert ".kingpost" not in r.text and "/home" not in r.text
    assert failed.message.endswith("No such file or directory") and secret in failed.message
