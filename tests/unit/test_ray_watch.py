"""The watcher that stops a Ray node's replica once its actor's process ends
(``engines/_ray_watch.py``): real processes, a real pipe."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from helpers.records import recorded_sleeper
from kingpost.engines._records import records_dir


def _watcher(records: Path) -> tuple[subprocess.Popen[bytes], int]:
    read_end, write_end = os.pipe()
    watcher = subprocess.Popen(
        [sys.executable, "-m", "kingpost.engines._ray_watch", str(read_end), str(records), "5"],
        pass_fds=(read_end,),
    )
    os.close(read_end)
    return watcher, write_end


def test_the_replica_is_stopped_when_the_pipe_ends_and_not_before(tmp_path: Path) -> None:
    records = records_dir(tmp_path / "run")
    replica = recorded_sleeper(records, "r1")
    watcher, write_end = _watcher(records)
    try:
        time.sleep(0.5)
        assert watcher.poll() is None and replica.poll() is None  # the actor lives
        os.close(write_end)  # the actor's process ends
        assert watcher.wait(timeout=20) == 0
        assert replica.wait(timeout=10) == -15  # SIGTERM to its process group
        assert list(records.glob("*.json")) == []
    finally:
        replica.kill()
        replica.wait()
        watcher.kill()
        watcher.wait()


def test_after_a_clean_stop_the_watcher_just_exits(tmp_path: Path) -> None:
    records = records_dir(tmp_path / "run")  # nothing recorded: the engine stopped it
    watcher, write_end = _watcher(records)
    os.close(write_end)
    assert watcher.wait(timeout=20) == 0
