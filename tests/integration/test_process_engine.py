"""The process engine with real subprocesses: contract, isolation, probes, restarts."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from helpers.platform import EXAMPLES, free_port, wait_for
from helpers.replica import replica_get
from kingpost.config import load_config, runtime_environment
from kingpost.controller.specs import replica_spec
from kingpost.engines.base import Endpoint, Prepared, ReplicaPhase, ReplicaStatus
from kingpost.engines.process import ProcessEngine
from kingpost.errors import EngineError
from kingpost.netns import can_unshare_net
from kingpost.settings import Settings

TOGGLE_SERVER = """
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def do_GET(self):
        flag = {"/ready": "unready", "/live": "dead"}.get(self.path)
        bad = flag is not None and os.path.exists(flag)
        body = b"no" if bad else b"ok"
        self.send_response(503 if bad else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

print("toggle server up", flush=True)
ThreadingHTTPServer(("0.0.0.0", 8000), H).serve_forever()
"""

TOGGLE_CONFIG = """\
docker_server:
  start_command: python3 server.py
  server_port: 8000
  predict_endpoint: /ready
  readiness_endpoint: /ready
  liveness_endpoint: /live
runtime:
  health_checks:
    restart_threshold_seconds: 2
    stop_traffic_threshold_seconds: 1
"""

NETNS = can_unshare_net()


def engine(tmp_path: Path, netns: str) -> ProcessEngine:
    return ProcessEngine(Settings(home=tmp_path / "home", netns=netns))


@pytest.fixture
def eng(tmp_path: Path) -> Iterator[ProcessEngine]:
    e = engine(tmp_path, "auto")
    try:
        yield e
    finally:
        e.close()


def start(e: ProcessEngine, app: Path, rid: str, dep: str = "d1", **kw: object) -> None:
    config = load_config(app).config
    env, _ = runtime_environment(config)
    e.start(
        replica_spec(
            replica_id=rid,
            deployment_id=dep,
            model_id="m1",
            model_name="m",
            app_dir=app,
            config=config,
            env=env,
            secrets=kw.get("secrets", {}),  # type: ignore[arg-type]
        )
    )


def status(e: ProcessEngine, rid: str) -> ReplicaStatus:
    return next(s for s in e.poll() if s.replica_id == rid)


def phase_is(e: ProcessEngine, rid: str, *phases: ReplicaPhase) -> ReplicaStatus | None:
    st = status(e, rid)
    return st if st.phase in phases else None


def get(endpoint: Endpoint, path: str) -> tuple[int, bytes]:
    return replica_get(endpoint, path, timeout=5)


def echo_server_on(tmp_path: Path, port: int) -> Path:
    """examples/echo-server serving on ``port`` (without namespaces, this machine's 8000
    may be another test's: xdist runs two files at once)."""
    app = tmp_path / "echo-server"
    shutil.copytree(EXAMPLES / "echo-server", app)
    for name, old in (("config.yaml", "server_port: 8000"), ("server.py", "PORT = 8000")):
        text = (app / name).read_text()
        assert old in text, name
        (app / name).write_text(text.replace(old, old.replace("8000", str(port))))
    return app


def toggle_project(tmp_path: Path) -> Path:
    app = tmp_path / "toggle"
    app.mkdir()
    (app / "server.py").write_text(TOGGLE_SERVER)
    (app / "config.yaml").write_text(TOGGLE_CONFIG)
    return app


def test_replica_contract_env_and_secrets(eng: ProcessEngine) -> None:
    os.environ["KINGPOST_LEAK_CHECK"] = "1"
    try:
        start(eng, EXAMPLES / "echo-server", "d1-a", secrets={"token": "s3cr3t"})
        st = wait_for(lambda: phase_is(eng, "d1-a", ReplicaPhase.READY), 20, "ready")
    finally:
        del os.environ["KINGPOST_LEAK_CHECK"]
    assert st.endpoint is not None
    code, body = get(st.endpoint, "/env")
    assert code == 200
    seen = json.loads(body)
    env = seen["env"]
    assert env["BT_MODEL_ID"] == "m1" and env["BT_MODEL_DEPLOYMENT_ID"] == "d1"
    assert env["APP_HOME"] == seen["cwd"] and env["APP_HOME"].endswith("/d1-a/app")
    assert env["HOME"].endswith("/d1-a/home") and env["GREETING"] == "hello"
    assert "PYTHON_EXECUTABLE" in env
    # No requirements: nothing was built for it, and its command sees the machine's PATH
    # (after what a pyenv shim for `python3` puts before it).
    echo = EXAMPLES / "echo-server"
    assert eng.prepare(load_config(echo).config, echo, print) == Prepared()
    assert env["PATH"].endswith(os.environ["PATH"]) and "VIRTUAL_ENV" not in env
    assert not any(k.startswith("KINGPOST_") and k != "KINGPOST_SECRETS_DIR" for k in env)
    assert seen["secrets"] == {"token": "s3cr3t"} and seen["secrets_writable"] is False
    secrets_dir = Path(env["KINGPOST_SECRETS_DIR"])
    if eng.mounts:
        assert secrets_dir == Path("/secrets")
    host_copy = next(Path("/dev/shm").glob("kingpost-*/*/d1-a"))
    assert os.statvfs(host_copy).f_bsize and "tmpfs" in Path("/proc/mounts").read_text()
    eng.stop("d1-a")
    wait_for(lambda: not host_copy.exists(), 15, "secrets removed at stop")


def test_secret_files_a_killed_run_left_are_removed_by_the_next(tmp_path: Path) -> None:
    first, other = engine(tmp_path, "auto"), engine(tmp_path / "other", "auto")
    try:
        start(first, EXAMPLES / "echo-server", "d1-a", secrets={"token": "s3cr3t"})
        start(other, EXAMPLES / "echo-server", "d9-a", secrets={"token": "theirs"})
        wait_for(lambda: phase_is(first, "d1-a", ReplicaPhase.READY), 20, "ready")
        wait_for(lambda: phase_is(other, "d9-a", ReplicaPhase.READY), 20, "other ready")
        left = first._secrets_root / "d1-a" / "token"
        assert left.read_text() == "s3cr3t"
        # As on a SIGKILL of the control plane: its monitor is gone, nothing is cleaned up.
        first._closing.set()
        first._thread.join(5)
        second = engine(tmp_path, "auto")
        second.close()
        assert not left.exists()
        assert not second._secrets_root.exists()  # and a clean close leaves no directory
        # Another installation's secrets, in the same user's directory, are not touched.
        assert (other._secrets_root / "d9-a" / "token").read_text() == "theirs"
    finally:
        other.close()


def test_a_secrets_directory_someone_else_made_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The per-user directory's name is predictable in world-writable /dev/shm: whoever
    made it could read or swap the secret files put in it."""
    if os.geteuid() != 0:
        pytest.skip("needs root to make a directory owned by another user")
    shm = tmp_path / "shm"
    shm.mkdir(mode=0o1777)
    monkeypatch.setattr("kingpost.engines.process.tmpfs", lambda: shm)
    theirs = shm / f"kingpost-{os.getuid()}"
    theirs.mkdir(mode=0o777)
    os.chown(theirs, 65534, 65534)
    with pytest.raises(EngineError, match="not owned"):
        engine(tmp_path, "off").close()
    os.chown(theirs, os.getuid(), os.getgid())  # ours, but open to all: tightened
    engine(tmp_path, "off").close()
    assert theirs.stat().st_mode & 0o777 == 0o700


@pytest.mark.skipif(not NETNS, reason="network namespaces not permitted here")
def test_same_fixed_port_twice_with_namespaces(eng: ProcessEngine) -> None:
    start(eng, EXAMPLES / "echo-server", "d1-a", "d1")
    start(eng, EXAMPLES / "echo-server", "d2-a", "d2")
    a = wait_for(lambda: phase_is(eng, "d1-a", ReplicaPhase.READY), 20, "first ready")
    b = wait_for(lambda: phase_is(eng, "d2-a", ReplicaPhase.READY), 20, "second ready")
    assert a.endpoint and b.endpoint and a.endpoint.port == b.endpoint.port == 8000
    pids = {json.loads(get(s.endpoint, "/env")[1])["pid"] for s in (a, b) if s.endpoint}
    assert len(pids) == 2


def test_same_fixed_port_refused_without_namespaces(tmp_path: Path) -> None:
    port = free_port()
    app = echo_server_on(tmp_path, port)
    e = engine(tmp_path, "off")
    try:
        start(e, app, "d1-a", "d1")
        with pytest.raises(EngineError) as info:
            start(e, app, "d2-a", "d2")
        assert str(port) in info.value.message and "d1" in info.value.message
        assert "server_port" in info.value.message
    finally:
        e.close()


def test_killed_server_is_restarted(eng: ProcessEngine) -> None:
    start(eng, EXAMPLES / "echo-server", "d1-a")
    st = wait_for(lambda: phase_is(eng, "d1-a", ReplicaPhase.READY), 20, "ready")
    assert st.endpoint is not None
    pid = json.loads(get(st.endpoint, "/env")[1])["pid"]
    os.kill(pid, signal.SIGKILL)
    again = wait_for(
        lambda: (s := phase_is(eng, "d1-a", ReplicaPhase.READY)) and s.restarts == 1 and s,
        30,
        "restart",
    )
    assert again.endpoint is not None
    assert json.loads(get(again.endpoint, "/env")[1])["pid"] != pid


def test_readiness_failure_stops_traffic_without_restart(
    eng: ProcessEngine, tmp_path: Path
) -> None:
    start(eng, toggle_project(tmp_path), "d1-a")
    wait_for(lambda: phase_is(eng, "d1-a", ReplicaPhase.READY), 20, "ready")
    app = eng.settings.replicas_dir / "d1-a" / "app"
    (app / "unready").touch()
    st = wait_for(lambda: phase_is(eng, "d1-a", ReplicaPhase.NOT_READY), 20, "not ready")
    assert st.restarts == 0
    (app / "unready").unlink()
    st = wait_for(lambda: phase_is(eng, "d1-a", ReplicaPhase.READY), 20, "ready again")
    assert st.restarts == 0


HUNG_SERVER = """
import socket, sys, time

listener = socket.create_server(("0.0.0.0", int(sys.argv[1])))
held = []
while True:  # accepts every probe, answers none
    held.append(listener.accept()[0])
"""


def test_replicas_whose_health_endpoint_hangs_do_not_hold_up_the_others(
    eng: ProcessEngine, tmp_path: Path
) -> None:
    """Probes ran one after another on the monitor thread: each hung replica cost every
    other replica a probe timeout per round, so six of them kept a healthy replica from
    being seen ready (or dead, or stopped) for six seconds and more."""
    for i in range(6):
        app = tmp_path / f"hung{i}"
        app.mkdir()
        (app / "server.py").write_text(HUNG_SERVER)
        port = 8100 + i
        (app / "config.yaml").write_text(
            TOGGLE_CONFIG.replace("python3 server.py", f"python3 server.py {port}").replace(
                "server_port: 8000", f"server_port: {port}"
            )
        )
        start(eng, app, f"hung-{i}", dep=f"hung{i}")
    wait_for(
        lambda: all(status(eng, f"hung-{i}").endpoint for i in range(6)), 20, "hung servers up"
    )
    toggle = toggle_project(tmp_path)
    wait_for(lambda: phase_is(eng, "hung-5", ReplicaPhase.STARTING), 5, "probing the hung")
    start(eng, toggle, "d1-a")
    # A Python HTTP server starts in well under a second; six serial probe timeouts of a
    # second each are what this bound tells apart.
    wait_for(lambda: phase_is(eng, "d1-a", ReplicaPhase.READY), 4, "the healthy replica")
    assert all(status(eng, f"hung-{i}").phase == ReplicaPhase.STARTING for i in range(6))


def test_liveness_failure_restarts(eng: ProcessEngine, tmp_path: Path) -> None:
    start(eng, toggle_project(tmp_path), "d1-a")
    wait_for(lambda: phase_is(eng, "d1-a", ReplicaPhase.READY), 20, "ready")
    (eng.settings.replicas_dir / "d1-a" / "app" / "dead").touch()
    wait_for(lambda: status(eng, "d1-a").restarts >= 1 or None, 30, "restart on liveness failure")
    (eng.settings.replicas_dir / "d1-a" / "app" / "dead").unlink()
    wait_for(lambda: phase_is(eng, "d1-a", ReplicaPhase.READY), 30, "ready after restart")
    lines = [ln.text for ln in eng.logs("d1")]
    assert lines.count("toggle server up") >= 2


def test_crash_loop_fails_with_output(eng: ProcessEngine, tmp_path: Path) -> None:
    app = tmp_path / "crash"
    app.mkdir()
    (app / "config.yaml").write_text(
        "docker_server:\n"
        "  start_command: python3 -c \"import sys; print('boom-123'); sys.exit(3)\"\n"
        "  server_port: 8000\n  predict_endpoint: /\n"
        "  readiness_endpoint: /\n  liveness_endpoint: /\n"
    )
    start(eng, app, "d1-a")
    st = wait_for(lambda: phase_is(eng, "d1-a", ReplicaPhase.FAILED), 30, "failed")
    assert "boom-123" in st.message and "code 3" in st.message


def test_a_custom_server_without_command_fails_at_once(eng: ProcessEngine, tmp_path: Path) -> None:
    """Nothing to run (``no_build`` means an image's entrypoint): FAILED, saying why,
    instead of a replica retried every tick and left STARTING forever."""
    app = tmp_path / "no-build"
    app.mkdir()
    (app / "config.yaml").write_text(
        "base_image:\n  image: python:3.11-slim\n"
        "docker_server:\n  no_build: true\n  server_port: 8000\n  predict_endpoint: /\n"
        "  readiness_endpoint: /\n  liveness_endpoint: /\n"
    )
    start(eng, app, "d1-a")
    st = wait_for(lambda: phase_is(eng, "d1-a", ReplicaPhase.FAILED), 10, "failed")
    assert "start_command" in st.message


def test_a_no_build_servers_requirements_are_not_installed(
    eng: ProcessEngine, tmp_path: Path
) -> None:
    """``no_build`` ignores them (the config says so at push): nothing is built."""
    app = tmp_path / "no-build"
    app.mkdir()
    (app / "config.yaml").write_text(
        "base_image:\n  image: python:3.11-slim\nrequirements: [six==1.16.0]\n"
        "docker_server:\n  no_build: true\n  start_command: python3 server.py\n"
        "  server_port: 8000\n  predict_endpoint: /\n"
        "  readiness_endpoint: /\n  liveness_endpoint: /\n"
    )
    assert eng.prepare(load_config(app).config, app, print) == Prepared()
    assert not eng.settings.envs_dir.exists()


def test_close_leaves_no_process(tmp_path: Path) -> None:
    e = engine(tmp_path, "auto")
    start(e, EXAMPLES / "echo-server", "d1-a")
    st = wait_for(lambda: phase_is(e, "d1-a", ReplicaPhase.READY), 20, "ready")
    assert st.endpoint is not None
    pid = json.loads(get(st.endpoint, "/env")[1])["pid"]
    e.close()
    assert (
        not Path(f"/proc/{pid}").exists() or "State:\tZ" in Path(f"/proc/{pid}/status").read_text()
    )


class _Impostor(BaseHTTPRequestHandler):
    """Another process's server on a loopback port: 200 to everything."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("content-length", "8")
        self.end_headers()
        self.wfile.write(b"impostor")

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("isolation", ["off", "auto"])  # Popen, and the launcher as root
def test_a_model_server_without_a_namespace_serves_on_the_socket_the_engine_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolation: str
) -> None:
    """The race it closes, made certain: the port picked for the replica is taken by
    another process before the server starts. Picking a port and leaving the server to
    bind it, the server failed to bind and the probes reached the other process, which
    answered them: the replica was READY with another server's answers."""
    impostor = ThreadingHTTPServer(("127.0.0.1", 0), _Impostor)
    threading.Thread(target=impostor.serve_forever, daemon=True).start()
    taken = impostor.server_address[1]
    monkeypatch.setattr("kingpost.engines.process._free_port", lambda: taken)
    e = ProcessEngine(Settings(home=tmp_path / "home", netns="off", isolation=isolation))
    try:
        start(e, EXAMPLES / "echo-model", "d1-a")
        st = wait_for(lambda: phase_is(e, "d1-a", ReplicaPhase.READY), 60, "ready")
        assert st.endpoint is not None and st.endpoint.port != taken
        code, body = get(st.endpoint, "/v1/models/model")
        assert code == 200 and body != b"impostor", body
        pid = json.loads(Path(e._records / "d1-a.json").read_text())["pid"]
        assert "--listen-fd" in Path(f"/proc/{pid}/cmdline").read_text().split("\0")
    finally:
        e.close()
        impostor.shutdown()


def test_a_custom_server_waits_while_another_process_holds_its_port(tmp_path: Path) -> None:
    """Without namespaces: launched, it could not bind, and its probes would take the
    other process's answers for its own. It waits, says why, and starts once the port is
    free."""
    impostor = ThreadingHTTPServer(("127.0.0.1", 0), _Impostor)
    threading.Thread(target=impostor.serve_forever, daemon=True).start()
    port = impostor.server_address[1]
    app = echo_server_on(tmp_path, port)
    e = engine(tmp_path, "off")
    try:
        start(e, app, "d1-a")
        st = wait_for(
            lambda: (s := status(e, "d1-a")).message.startswith(f"waiting for port {port}") and s,
            20,
            "the waiting message",
        )
        assert st.phase == ReplicaPhase.STARTING and st.endpoint is None, st
        time.sleep(1.5)  # it looked again, and still waits
        assert status(e, "d1-a").phase == ReplicaPhase.STARTING
        impostor.shutdown()
        impostor.server_close()
        ready = wait_for(lambda: phase_is(e, "d1-a", ReplicaPhase.READY), 30, "ready")
        assert ready.endpoint is not None and ready.endpoint.port == port
        code, body = get(ready.endpoint, "/health")
        assert code == 200 and body != b"impostor", body
    finally:
        e.close()
        impostor.server_close()
