"""Body limits of the control-plane API, through a real uvicorn server and raw sockets."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from tests.helpers.platform import free_port, wait_for

from kingpost.api import ControlPlane, create_app
from kingpost.controller.loop import Controller
from kingpost.serve import bootstrap
from kingpost.settings import Settings


@pytest.fixture
def api_port(tmp_path: Path) -> Iterator[int]:
    settings = Settings(home=tmp_path / "home")
    store = bootstrap(settings, lambda _: None)
    plane = ControlPlane(settings, store, Controller(settings, store))
    port = free_port()
    config = uvicorn.Config(
        create_app(plane), host="127.0.0.1", port=port, log_level="warning", lifespan="off"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 15, "the API to listen")
    yield port
    server.should_exit = True
    thread.join(10)
    store.db.close()


def test_a_chunked_body_is_not_read_past_the_limit(api_port: int) -> None:
    """The API read whatever a client sent (20 MB of labels: +1 GB RSS). Now it answers 413
    once 1 MiB has arrived and closes the connection without waiting for the rest: the
    body's last chunk is never sent here, so a server that kept reading would hang. (The
    chunk sent is just past the limit: the server takes all of it in, so its close is a
    FIN after the answer, not a reset that could overtake it.)"""
    head = (
        b"POST /v1/secrets HTTP/1.1\r\nHost: api\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"x" * (1024**2 + 1)
    with socket.create_connection(("127.0.0.1", api_port), timeout=10) as s:
        s.sendall(head + f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        answer = b""
        while data := s.recv(65536):  # the server closes: no timeout
            answer += data
    status, _, rest = answer.partition(b"\r\n")
    assert status == b"HTTP/1.1 413 Request Entity Too Large", answer[:200]
    assert b'"code":"payload_too_large"' in rest.replace(b" ", b"")
    assert b'"limit_bytes":1048576' in rest.replace(b" ", b"")
    assert httpx.get(f"http://127.0.0.1:{api_port}/v1/health").status_code == 200
