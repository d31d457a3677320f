"""Process-engine replicas outlive a killed control plane and the next one adopts them
(real `kingpost server` processes, a real gateway, a model-class replica)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest
from test_platform_rollouts import Load

from helpers.platform import Platform, free_port, wait_answer, wait_for
from kingpost.engines._records import ReplicaRecord, read_records, records_dir, write_record
from kingpost.engines.process import ProcessEngine
from kingpost.gateway_process import GatewayRecord, boot_id, process_alive, start_ticks
from kingpost.gateway_process import write_record as gateway_record
from kingpost.settings import Settings

PREDICT = "/models/pid/environments/production/predict"


def pid_model(tmp_path: Path) -> Path:
    """A model class that answers with its server's pid."""
    out = tmp_path / "pid"
    (out / "model").mkdir(parents=True)
    (out / "config.yaml").write_text("model_name: pid\n")
    (out / "model" / "model.py").write_text(
        textwrap.dedent(
            """\
            import os


            class Model:
                def predict(self, model_input):
                    return {"pid": os.getpid()}
            """
        )
    )
    return out


class PidLoad(Load):
    """The rollout tests' load (two threads posting as fast as the gateway answers),
    keeping which process answered each request."""

    def __init__(self, platform: Platform) -> None:
        super().__init__(platform, "pid")
        self.pids: list[int] = []
        self.failures: list[str] = []

    def _run(self) -> None:
        with self.platform.gateway() as gw:
            while not self._stop.is_set():
                try:
                    r = gw.post(self.path, json={})
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
                    continue
                if r.status_code == 200:
                    self.pids.append(int(r.json()["pid"]))
                else:
                    self.failures.append(f"{r.status_code} {r.text}")

    def more(self, count: int, what: str) -> None:
        seen = len(self.pids)
        wait_for(lambda: len(self.pids) >= seen + count or None, 30, what)


def test_a_killed_control_plane_leaves_model_replicas_serving_and_the_next_adopts_them(
    tmp_path: Path,
) -> None:
    platform = Platform(tmp_path / "home").start()
    replicas_dir = platform.home / "replicas"
    try:
        with platform.client() as c:
            pushed = c.push(pid_model(tmp_path), min_replicas=1, max_replicas=1)
        platform.wait_status(pushed["deployment"]["id"], "ACTIVE", timeout=60)
        with platform.gateway() as gw:
            pid = int(wait_answer(gw, PREDICT, 200).json()["pid"])
        started = sorted(p.name for p in replicas_dir.iterdir())
        load = PidLoad(platform)
        with load.running():
            load.more(10, "answers")
            platform.stop(signal.SIGKILL)
            load.more(20, "answers with no control plane")
            platform.start()  # its first pass ran: it adopted, or started a replica
            load.more(20, "answers after the restart")
        assert load.failures == []
        assert set(load.pids) == {pid}
        assert sorted(p.name for p in replicas_dir.iterdir()) == started  # none started
        assert f"process engine: adopted replica {started[0]} (pid {pid}, ready)" in (
            platform.output()
        )
    finally:
        platform.stop()
    # A clean stop stops the adopted replica too, and forgets it.
    wait_for(lambda: not process_alive(pid), 20, f"replica pid {pid} to exit")
    assert read_records(records_dir(platform.home / "run")) == []


def _record(replica_id: str, pid: int, ticks: int, port: int = 1) -> ReplicaRecord:
    return ReplicaRecord(
        replica_id=replica_id,
        deployment_id="dep",
        model_id="model",
        generation=3,
        kind="custom_server",
        pid=pid,
        start_ticks=ticks,
        boot_id=boot_id(),
        port=port,
        netns=False,
        predict_path="/predict",
        probes={"readiness_path": "/", "liveness_path": "/", "period_s": 0.2},
        started_at=1.0,
    )


def http_server(tmp_path: Path, port: int) -> subprocess.Popen[bytes]:
    """A server as a replica runs: leading a session of its own, not a child that the
    engine started."""
    return subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        cwd=tmp_path,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def test_stale_replica_records_are_forgotten_and_live_ones_adopted(tmp_path: Path) -> None:
    """A record whose pid is gone, or was recycled by another process (another start
    time), is removed without touching that process; a live one is adopted, its server
    watched again and stopped by a clean close."""
    settings = Settings(home=tmp_path / "home", netns="off", isolation="off")
    records = records_dir(settings.run_dir)
    port = free_port()
    server = http_server(tmp_path, port)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        ticks = wait_for(lambda: start_ticks(server.pid), 5, "the server's start time")
        other = wait_for(lambda: start_ticks(bystander.pid), 5, "the bystander's start time")
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/").status_code == 200, 10, "it")
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        write_record(records, _record("dep-live", server.pid, ticks, port))
        write_record(records, _record("dep-recycled", bystander.pid, other + 1))
        write_record(records, _record("dep-gone", gone.pid, 1))
        (records / "dep-broken.json").write_text("{not json")
        engine = ProcessEngine(settings)
        try:
            [status] = engine.poll()
            assert (status.replica_id, status.phase, status.generation) == ("dep-live", "ready", 3)
            assert status.message == "adopted from an earlier control plane"
            assert [r.replica_id for r in read_records(records)] == ["dep-live"]
            assert process_alive(bystander.pid)  # not the replica its record named
        finally:
            engine.close()
        server.wait(timeout=10)  # a clean close stops what it adopted
        assert read_records(records) == []
    finally:
        for p in (server, bystander):
            if p.poll() is None:
                p.kill()
                p.wait()


def test_an_adopted_replica_that_exits_is_dropped_for_the_controller_to_replace(
    tmp_path: Path,
) -> None:
    settings = Settings(home=tmp_path / "home", netns="off", isolation="off")
    port = free_port()
    server = http_server(tmp_path, port)
    try:
        ticks = wait_for(lambda: start_ticks(server.pid), 5, "the server's start time")
        write_record(records_dir(settings.run_dir), _record("dep-live", server.pid, ticks, port))
        engine = ProcessEngine(settings)
        try:
            assert [s.replica_id for s in engine.poll()] == ["dep-live"]
            server.kill()
            server.wait()
            wait_for(lambda: engine.poll() == [] or None, 10, "the replica to be dropped")
            assert read_records(records_dir(settings.run_dir)) == []
        finally:
            engine.close()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


@pytest.mark.parametrize("plane_back", [False, True])
def test_an_orphaned_gateway_stops_the_recorded_replicas_as_it_exits(
    tmp_path: Path, plane_back: bool
) -> None:
    """No control plane came back: the gateway exits on its orphan timeout, and the
    replicas it routed to leave with it (their whole process groups). A control plane
    that started meanwhile (the record names it, and it runs) keeps them."""
    run_dir = tmp_path / "run"
    records = records_dir(run_dir)
    port = free_port()
    server = http_server(tmp_path, port)
    try:
        ticks = wait_for(lambda: start_ticks(server.pid), 5, "the server's start time")
        write_record(records, _record("dep-orphan", server.pid, ticks, port))
        if plane_back:  # this test's process plays the control plane
            gateway_record(run_dir / "gateway.json", _plane(os.getpid()))
        gateway = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kingpost.gateway",
                "--port",
                str(free_port()),
                "--control-socket",
                str(run_dir / "gateway.sock"),
                "--orphan-timeout",
                "1",
                "--orphan-replicas",
                str(records),
            ],
            start_new_session=True,
        )
        try:
            assert gateway.wait(timeout=30) == 0
        finally:
            if gateway.poll() is None:
                gateway.kill()
                gateway.wait()
        if plane_back:
            assert server.poll() is None
            assert [r.replica_id for r in read_records(records)] == ["dep-orphan"]
            return
        assert server.wait(timeout=10) != 0  # stopped by a signal, not exited by itself
        assert read_records(records) == []
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def _plane(pid: int) -> GatewayRecord:
    return GatewayRecord(
        pid=1,
        start_ticks=0,
        boot_id=boot_id(),
        version="0",
        host="127.0.0.1",
        port=1,
        workers=1,
        orphan_timeout=0.0,
        control_socket="",
        token="t",
        plane_pid=pid,
        plane_start_ticks=start_ticks(pid) or 0,
    )
