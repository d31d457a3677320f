"""A process-engine replica, run as root on Linux, cannot reach the control plane or
another model: attacks made from inside a real replica all fail (issue 23, item 1)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.platform import wait_for
from helpers.replica import replica_get
from kingpost.config import load_config, runtime_environment
from kingpost.controller.specs import replica_spec
from kingpost.engines._isolation import can_unshare_mounts
from kingpost.engines._view import replica_uid
from kingpost.engines.base import Endpoint, ReplicaPhase
from kingpost.engines.process import ProcessEngine
from kingpost.errors import EngineError
from kingpost.settings import Settings

needs_isolation = pytest.mark.skipif(
    os.geteuid() != 0 or not can_unshare_mounts(), reason="isolation needs root and mount ns"
)

ATTACKER = """
import json, os, socket
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

def attempt(fn):
    try:
        return "ok: " + str(fn())[:80]
    except OSError as exc:
        return "refused: " + type(exc).__name__

def read(path):
    with open(path) as fh:
        return fh.read()

def connect(path):
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)
        return "connected"

def write(path):
    with open(path, "w") as fh:
        fh.write("x")
    return "written"

mark = os.path.join("/tmp", os.environ["BT_MODEL_DEPLOYMENT_ID"] + "-was-here")
with open(mark, "w") as fh:
    fh.write("x")

class H(BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_GET(self):
        home = os.environ["VICTIM_HOME"]
        seen = {
            "uid": os.getuid(),
            "own_secret": attempt(lambda: read("/secrets/token")),
            "own_app": attempt(lambda: write("scratch")),
            "own_home": attempt(lambda: write(os.path.join(os.environ["HOME"], "x"))),
            "other_secret": attempt(lambda: read(os.environ["OTHER_SECRET"])),
            "other_app": attempt(lambda: read(os.environ["OTHER_APP"])),
            "home_listing": attempt(lambda: sorted(os.listdir(home))),
            "secret_key": attempt(lambda: read(os.path.join(home, "secret.key"))),
            "credentials": attempt(lambda: read(os.path.join(home, "credentials"))),
            "database": attempt(lambda: read(os.path.join(home, "kingpost.db"))),
            "control_socket": attempt(lambda: connect(os.path.join(home, "run", "gateway.sock"))),
            "gateway_record": attempt(lambda: read(os.path.join(home, "run", "gateway.json"))),
            "etc": attempt(lambda: write("/etc/kingpost-probe")),
            "shm": attempt(lambda: sorted(os.listdir("/dev/shm"))),
            "tmp": attempt(lambda: sorted(os.listdir("/tmp"))),
        }
        body = json.dumps(seen).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

ThreadingHTTPServer(("0.0.0.0", 8000), H).serve_forever()
"""


def project(tmp_path: Path, name: str, env: dict[str, str], server: str = "") -> Path:
    app = tmp_path / name
    app.mkdir()
    (app / "server.py").write_text(ATTACKER)
    variables = "".join(f"  {k}: {json.dumps(v)}\n" for k, v in env.items())
    (app / "config.yaml").write_text(
        "docker_server:\n  start_command: python3 server.py\n  server_port: 8000\n"
        "  predict_endpoint: /\n  readiness_endpoint: /\n  liveness_endpoint: /\n"
        + server
        + (f"environment_variables:\n{variables}" if variables else "")
    )
    return app


def start(e: ProcessEngine, app: Path, dep: str, secret: str) -> Endpoint:
    config = load_config(app).config
    env, _ = runtime_environment(config)
    rid = f"{dep}-a"
    e.start(
        replica_spec(
            replica_id=rid,
            deployment_id=dep,
            model_id=f"m-{dep}",
            model_name=dep,
            app_dir=app,
            config=config,
            env=env,
            secrets={"token": secret},
        )
    )

    def ready() -> Endpoint | None:
        st = next(s for s in e.poll() if s.replica_id == rid)
        assert st.phase != ReplicaPhase.FAILED, st.message
        return st.endpoint if st.phase == ReplicaPhase.READY else None

    return wait_for(ready, 30, f"{rid} ready")


def get(endpoint: Endpoint, path: str = "/") -> dict[str, object]:
    return dict(json.loads(replica_get(endpoint, path)[1]))


@pytest.fixture
def eng(tmp_path: Path) -> Iterator[ProcessEngine]:
    home = tmp_path / "home"
    e = ProcessEngine(Settings(home=home))
    try:
        yield e
    finally:
        e.close()


@needs_isolation
def test_a_replica_reaches_neither_the_control_plane_nor_another_model(
    eng: ProcessEngine, tmp_path: Path
) -> None:
    assert eng.isolate
    home = eng.settings.home
    home.mkdir(mode=0o700, exist_ok=True)  # as `kingpost server` makes it
    for name in ("secret.key", "credentials", "kingpost.db"):
        (home / name).write_text(f"the {name}")
        (home / name).chmod(0o644)  # even were they readable by anyone
    (home / "run").mkdir()
    control = socket.socket(socket.AF_UNIX)
    control.bind(str(home / "run" / "gateway.sock"))
    control.listen()
    os.chmod(home / "run" / "gateway.sock", 0o666)
    (home / "run" / "gateway.json").write_text('{"token": "the control token"}')
    (home / "run" / "gateway.json").chmod(0o644)  # the control token: never readable there
    try:
        nothing = {"VICTIM_HOME": str(home), "OTHER_SECRET": "/", "OTHER_APP": "/"}
        start(eng, project(tmp_path, "victim", nothing), "d2", "theirs")
        env = {
            "VICTIM_HOME": str(home),
            "OTHER_SECRET": str(eng._secrets_root / "d2-a" / "token"),
            "OTHER_APP": str(eng.settings.replicas_dir / "d2-a" / "app" / "server.py"),
        }
        seen = get(start(eng, project(tmp_path, "attacker", env), "d1", "mine"))
    finally:
        control.close()
        for dep in ("d1", "d2"):  # its home is under /tmp: the host's /tmp was theirs
            Path(f"/tmp/{dep}-was-here").unlink(missing_ok=True)
    assert seen["uid"] == replica_uid("d1") != replica_uid("d2")
    assert seen["own_secret"] == "ok: mine"
    assert seen["own_app"] == seen["own_home"] == "ok: written"
    for attack in (
        "other_secret",
        "other_app",
        "secret_key",
        "credentials",
        "database",
        "control_socket",
        "gateway_record",
        "etc",
    ):
        assert str(seen[attack]).startswith("refused:"), (attack, seen[attack])
    # The home is an empty tmpfs but for the path to the replica's own tree.
    assert seen["home_listing"] == "ok: ['replicas']"
    assert seen["shm"] == "ok: []"
    # Files it wrote are its own (and its deployment's), not root's.
    assert (eng.settings.replicas_dir / "d1-a" / "app" / "scratch").stat().st_uid == seen["uid"]


@needs_isolation
def test_deployments_that_set_one_run_as_user_id_still_get_uids_of_their_own(
    eng: ProcessEngine, tmp_path: Path
) -> None:
    """`run_as_user_id: 1000` (what the docs advise for NVIDIA images) on two deployments
    made them one host uid, perhaps a login user's: each read the other's secrets through
    /proc/PID/root and its environment through /proc/PID/environ."""
    same = "  run_as_user_id: 1000\n"
    nothing = {"VICTIM_HOME": "/", "OTHER_SECRET": "/", "OTHER_APP": "/"}
    try:
        start(eng, project(tmp_path, "victim", nothing, same), "d4", "theirs")
        victim = eng._replicas["d4-a"].proc
        assert victim is not None
        env = {
            "VICTIM_HOME": "/",
            "OTHER_SECRET": f"/proc/{victim.pid}/root/secrets/token",
            "OTHER_APP": f"/proc/{victim.pid}/environ",
        }
        seen = get(start(eng, project(tmp_path, "attacker", env, same), "d3", "mine"))
    finally:
        for dep in ("d3", "d4"):  # its home is under /tmp: the host's /tmp was theirs
            Path(f"/tmp/{dep}-was-here").unlink(missing_ok=True)
    assert seen["uid"] == replica_uid("d3") != 1000
    assert seen["own_secret"] == "ok: mine"
    assert str(seen["other_secret"]).startswith("refused:"), seen["other_secret"]
    assert str(seen["other_app"]).startswith("refused:"), seen["other_app"]


@needs_isolation
def test_each_replica_gets_its_own_tmp() -> None:
    # A home outside /tmp, as in real use: one under it (tmp_path) keeps the host's /tmp.
    base = Path(tempfile.mkdtemp(prefix="kingpost-test-", dir="/var/tmp"))
    e = ProcessEngine(Settings(home=base / "home"))
    try:
        nothing = {"VICTIM_HOME": "/", "OTHER_SECRET": "/", "OTHER_APP": "/"}
        start(e, project(base, "victim", nothing), "d8", "theirs")
        seen = get(start(e, project(base, "attacker", nothing), "d7", "mine"))
        assert seen["tmp"] == "ok: ['d7-was-here']"
        assert (e.settings.replicas_dir / "d7-a" / "tmp" / "d7-was-here").exists()
        assert not Path("/tmp/d7-was-here").exists() and not Path("/tmp/d8-was-here").exists()
    finally:
        e.close()
        shutil.rmtree(base, ignore_errors=True)


def test_an_engine_that_cannot_isolate_says_so_loudly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="kingpost.engines.process"):
        e = ProcessEngine(Settings(home=tmp_path / "home", isolation="off"))
    e.close()
    assert not e.isolate
    [warning] = [r.getMessage() for r in caplog.records if "NOT ISOLATED" in r.getMessage()]
    assert str(tmp_path / "home") in warning and "KINGPOST_ISOLATION=off" in warning


@pytest.mark.skipif(os.geteuid() == 0 and can_unshare_mounts(), reason="this machine can isolate")
def test_isolation_on_refuses_to_start_where_it_cannot_isolate(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="isolation=on, but replicas cannot be isolated"):
        ProcessEngine(Settings(home=tmp_path / "home", isolation="on"))


FORKER = """
import json, os, threading, time
from http.server import BaseHTTPRequestHandler, HTTPServer

def spawn(n):
    threads = []
    try:
        for _ in range(n):
            t = threading.Thread(target=time.sleep, args=(5,), daemon=True)
            t.start()
            threads.append(t)
        return {"started": len(threads), "error": None}
    except RuntimeError as exc:  # "can't start new thread": the kernel said EAGAIN
        return {"started": len(threads), "error": str(exc)}

class H(BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_GET(self):  # the probes' "/" spawns nothing
        body = json.dumps(spawn(2000) if self.path == "/fork" else {}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

HTTPServer(("0.0.0.0", 8000), H).serve_forever()
"""


@needs_isolation
def test_a_fork_loop_stops_at_the_deployments_process_limit(tmp_path: Path) -> None:
    """2,000 threads asked for under a limit of 64: the kernel refuses past it, the replica
    keeps serving, and the host (and the next deployment) are untouched."""
    eng = ProcessEngine(Settings(home=tmp_path / "home", process_pids_limit=64))
    try:
        app = tmp_path / "forker"
        app.mkdir()
        (app / "server.py").write_text(FORKER)
        (app / "config.yaml").write_text(
            "docker_server:\n  start_command: python3 server.py\n  server_port: 8000\n"
            "  predict_endpoint: /\n  readiness_endpoint: /\n  liveness_endpoint: /\n"
        )
        # A deployment id of its own: its uid's count must hold this replica's processes alone.
        endpoint = start(eng, app, f"fork{os.getpid()}", "s")
        seen = get(endpoint, "/fork")
        assert seen["error"] is not None and 0 < int(str(seen["started"])) < 64, seen
        assert get(endpoint) == {}  # still answering
        assert threading_started_here(200)  # this process is not the replica's uid
    finally:
        eng.close()


def threading_started_here(n: int) -> bool:
    import threading
    import time

    threads = [threading.Thread(target=time.sleep, args=(0.5,)) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return True
