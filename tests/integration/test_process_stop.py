"""Stopping a process-engine replica stops its whole process group, with a drain.

The servers here run under a ``start_command`` shell that stays their parent (the
command after the server keeps it from exec-ing into it), as ``sh -c`` does with most
real commands: signalling that shell alone leaves the server running.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.platform import wait_for
from helpers.replica import replica_get
from kingpost.config import load_config, runtime_environment
from kingpost.controller.specs import replica_spec
from kingpost.engines.base import Endpoint, ReplicaPhase
from kingpost.engines.process import ProcessEngine
from kingpost.settings import Settings

SERVER = """
import os, signal, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def do_GET(self):
        if self.path == "/slow":
            open("inflight", "w").close()
            time.sleep(2)
            secrets = os.environ["KINGPOST_SECRETS_DIR"]
            body = open(os.path.join(secrets, "token")).read().encode()
        else:
            body = str(os.getpid()).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

server = ThreadingHTTPServer(("0.0.0.0", 8000), H)
server.daemon_threads = False  # server_close() waits for requests in flight
if sys.argv[1] == "ignore":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
else:  # drain: stop accepting, finish what is in flight, exit
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
server.serve_forever()
server.server_close()
"""


def project(tmp_path: Path, mode: str) -> Path:
    app = tmp_path / mode
    app.mkdir()
    (app / "server.py").write_text(SERVER)
    (app / "config.yaml").write_text(
        "docker_server:\n"
        f"  start_command: python3 server.py {mode}; echo server exited\n"
        "  server_port: 8000\n  predict_endpoint: /\n"
        "  readiness_endpoint: /\n  liveness_endpoint: /\n"
    )
    return app


@pytest.fixture
def make_engine(tmp_path: Path) -> Iterator[object]:
    made: list[ProcessEngine] = []

    def make(grace: float) -> ProcessEngine:
        e = ProcessEngine(Settings(home=tmp_path / "home", stop_grace_period=grace))
        made.append(e)
        return e

    yield make
    for e in made:
        e.close()


def start(e: ProcessEngine, app: Path, rid: str) -> Endpoint:
    config = load_config(app).config
    env, _ = runtime_environment(config)
    spec = replica_spec(
        replica_id=rid,
        deployment_id="d1",
        model_id="m1",
        model_name="m",
        app_dir=app,
        config=config,
        env=env,
        secrets={"token": "s3cr3t"},
    )
    e.start(spec)

    def ready() -> Endpoint | None:
        st = next(s for s in e.poll() if s.replica_id == rid)
        return st.endpoint if st.phase == ReplicaPhase.READY else None

    return wait_for(ready, 20, "ready")


def get(endpoint: Endpoint, path: str) -> bytes:
    status, body = replica_get(endpoint, path)
    assert status == 200, (status, body)
    return body


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in state


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def test_a_server_that_ignores_sigterm_is_killed_after_the_grace_period(
    make_engine: object, tmp_path: Path
) -> None:
    e: ProcessEngine = make_engine(1.0)  # type: ignore[operator]
    endpoint = start(e, project(tmp_path, "ignore"), "d1-a")
    pid = int(get(endpoint, "/pid"))
    group = os.getpgid(pid)
    e.stop("d1-a")
    time.sleep(0.5)
    assert alive(pid), "SIGTERM is ignored: it lives out the grace period"
    wait_for(lambda: not alive(pid), 10, "the server SIGKILLed after the grace period")
    # Nothing of its group is left, and only then is the replica forgotten.
    wait_for(lambda: "d1-a" not in e._replicas, 5, "the replica forgotten")
    assert not group_members(group)


def test_a_draining_server_finishes_its_requests_in_flight(
    make_engine: object, tmp_path: Path
) -> None:
    e: ProcessEngine = make_engine(15.0)  # type: ignore[operator]
    app = project(tmp_path, "drain")
    endpoint = start(e, app, "d1-a")
    pid = int(get(endpoint, "/pid"))
    answers: list[bytes] = []
    client = threading.Thread(target=lambda: answers.append(get(endpoint, "/slow")))
    client.start()
    inflight = e.settings.replicas_dir / "d1-a" / "app" / "inflight"
    wait_for(inflight.exists, 10, "the slow request in flight")
    began = time.monotonic()
    e.stop("d1-a")
    client.join(15)
    # Its files (secrets included) stay until the server is gone: it read one at the end.
    assert answers == [b"s3cr3t"]
    wait_for(lambda: not alive(pid), 10, "the drained server exited")
    assert time.monotonic() - began < 10, "it exited by itself, well within the grace"
    wait_for(lambda: "d1-a" not in e._replicas, 5, "the replica forgotten")
