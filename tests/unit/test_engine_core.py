"""The core every replica-running engine shares (engines/_core.py): the table, poll and
stop, the monitor loop, a probe round's outcome, the exit rule, and secret files."""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest

from kingpost.engines._core import ReplicaEngine, Tracked
from kingpost.engines._secrets import write_secrets
from kingpost.engines.base import Endpoint, LogLine, Probes, ReplicaPhase, ReplicaSpec
from kingpost.engines.probes import MAX_EXITS_BEFORE_READY


@dataclass(kw_only=True)
class _Rep(Tracked):
    steps: int = 0
    round: list[bool] | None = None
    """The outcomes its probe rounds see (ready), instead of HTTP."""

    def probe(self, probes: Probes, now: float) -> str | None:
        assert self.round is not None
        return self.judge(probes, now, self.round.pop(0), None)


class _Engine(ReplicaEngine[_Rep]):
    name: ClassVar[str] = "core-test"
    tick_s = 0.01

    def __init__(self) -> None:
        self._track()
        self.stopped: list[str] = []
        self.stepped = threading.Event()
        self.restarted: list[str] = []
        self._watch()

    def start(self, spec: ReplicaSpec) -> None:  # pragma: no cover - not used
        raise NotImplementedError

    def logs(self, deployment_id: str, tail: int = 200) -> list[LogLine]:  # pragma: no cover
        return []

    def add(self, rep: _Rep) -> None:
        with self._lock:
            self._replicas[rep.replica_id] = rep

    def _stopping(self, rep: _Rep) -> None:
        self.stopped.append(rep.replica_id)

    def _due(self, rep: _Rep) -> bool:
        return rep.replica_id != "busy"

    def _step(self, rep: _Rep, now: float) -> None:
        rep.steps += 1
        if rep.replica_id == "boom":
            raise RuntimeError("a step that fails must not stop the monitor")
        if rep.stopping:
            self._forget_replica(rep)
        self.stepped.set()

    def restart(self, rep: _Rep, now: float, why: str) -> None:
        self.restarted.append(why)

    def close(self) -> None:
        self._closing.set()
        self._thread.join(5)
        self._probes.shutdown()


@pytest.fixture
def engine() -> Iterator[_Engine]:
    e = _Engine()
    yield e
    e.close()


def _wait(cond: object, what: str) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if callable(cond) and cond():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def test_poll_reports_live_replicas_with_their_identity_and_health(engine: _Engine) -> None:
    rep = _Rep(replica_id="d1-a", deployment_id="d1", generation=3, restarts=2)
    rep.endpoint, rep.message, rep.phase = Endpoint("127.0.0.1", 9), "hi", ReplicaPhase.READY
    engine.add(rep)
    engine.add(_Rep(replica_id="d1-b", deployment_id="d1", stopping=True))
    (status,) = engine.poll()
    assert (status.replica_id, status.deployment_id, status.generation) == ("d1-a", "d1", 3)
    assert (status.phase, status.restarts, status.message) == (ReplicaPhase.READY, 2, "hi")
    assert status.endpoint == Endpoint("127.0.0.1", 9)


def test_stop_marks_once_and_the_monitor_removes_it(engine: _Engine) -> None:
    engine.add(_Rep(replica_id="d1-a", deployment_id="d1"))
    engine.stop("d1-a")
    engine.stop("d1-a")  # asked twice: the engine's hook runs once
    engine.stop("nope")  # unknown: nothing
    assert engine.stopped == ["d1-a"]
    assert engine.poll() == []
    _wait(lambda: "d1-a" not in engine._replicas, "the monitor to forget the stopped replica")


def test_the_monitor_steps_due_replicas_and_survives_a_failing_step(engine: _Engine) -> None:
    boom = _Rep(replica_id="boom", deployment_id="d1")
    busy = _Rep(replica_id="busy", deployment_id="d1")
    ok = _Rep(replica_id="ok", deployment_id="d1")
    for rep in (boom, busy, ok):
        engine.add(rep)
    _wait(lambda: ok.steps >= 3 and boom.steps >= 3, "several ticks")
    assert busy.steps == 0


def test_a_probe_round_restarts_or_tells_the_controller_once(engine: _Engine) -> None:
    told: list[bool] = []
    engine.on_ready = lambda: told.append(True)
    probes = Probes(startup_timeout_s=60)
    rep = _Rep(replica_id="r", deployment_id="d", launched=time.monotonic(), round=[False, True])
    engine._probe_round(rep, probes, engine.restart)
    assert told == [] and rep.phase == ReplicaPhase.STARTING
    engine._probe_round(rep, probes, engine.restart)
    assert told == [True] and rep.phase == ReplicaPhase.READY
    rep.round = [True]
    engine._probe_round(rep, probes, engine.restart)
    assert told == [True]  # ready again is not news
    late = _Rep(replica_id="s", deployment_id="d", launched=time.monotonic() - 100, round=[False])
    engine._probe_round(late, Probes(startup_timeout_s=10), engine.restart)
    assert engine.restarted == ["not ready after 10s"]


def test_an_exit_backs_off_until_a_never_ready_replica_gives_up() -> None:
    rep = _Rep(replica_id="r", deployment_id="d")
    rep.endpoint, rep.live_fails = Endpoint("127.0.0.1", 9), 2
    for n in range(1, MAX_EXITS_BEFORE_READY):
        ReplicaEngine._after_exit(rep, 100.0, "exited with code 1", lambda: ["never read"])
        assert rep.phase == ReplicaPhase.RESTARTING and rep.restarts == n
        assert rep.message == "exited with code 1; restarting"
        assert rep.endpoint is None and rep.live_fails == 0
    ReplicaEngine._after_exit(rep, 100.0, "exited with code 1", lambda: ["line 1", "line 2"])
    assert rep.phase == ReplicaPhase.FAILED
    assert rep.message == (
        "server exited with code 1 before becoming ready; last output:\nline 1\nline 2"
    )
    ready = _Rep(replica_id="r2", deployment_id="d", ever_ready=True)
    for _ in range(MAX_EXITS_BEFORE_READY + 2):  # once ready, an exit is always restarted
        ReplicaEngine._after_exit(ready, 100.0, "killed: out of memory", lambda: [])
    assert ready.phase == ReplicaPhase.RESTARTING


def test_secret_files_are_read_only_and_replace_a_half_written_set(tmp_path: Path) -> None:
    root = tmp_path / "secrets"
    path = root / "d1-a"
    (root / "d1-a.tmp").mkdir(parents=True)  # an earlier run died while writing
    (root / "d1-a.tmp" / "stale").write_text("x")
    assert write_secrets(path, {"hf_token": "s3cr3t", "other": ""}, None) == path
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o500
    assert sorted(os.listdir(path)) == ["hf_token", "other"]
    assert (path / "hf_token").read_text() == "s3cr3t"
    assert stat.S_IMODE((path / "hf_token").stat().st_mode) == 0o400
    assert not (root / "d1-a.tmp").exists()
