"""The build's off switch (kingpost._cancel) without a build."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from helpers.cancelling import cancel_while_waiting
from kingpost._cancel import Cancel, current
from kingpost._filelock import locked


def test_on_cancel_stops_what_runs_then_and_at_once_what_comes_after() -> None:
    cancel, stopped = Cancel(), []
    with cancel.on_cancel(lambda: stopped.append("running")):
        pass  # ended before the cancel: not stopped
    with cancel.on_cancel(lambda: stopped.append("request")):
        cancel.cancel("the deployment was deactivated")
        cancel.cancel("again")  # once only, and the first reason stands
    assert stopped == ["request"] and cancel.reason == "the deployment was deactivated"
    with cancel.on_cancel(lambda: stopped.append("late")):
        assert stopped == ["request", "late"]


def test_a_stop_that_fails_does_not_spare_the_others(caplog: pytest.LogCaptureFixture) -> None:
    cancel, stopped = Cancel(), []

    def broken() -> None:
        raise OSError("socket already closed")

    with cancel.on_cancel(broken), cancel.on_cancel(lambda: stopped.append("other")):
        cancel.cancel("stop")
    assert stopped == ["other"]
    assert "stopping a cancelled build's work failed" in caplog.text


def test_the_same_stop_registered_twice_stays_until_both_blocks_end() -> None:
    cancel, stopped = Cancel(), []

    def stop() -> None:
        stopped.append("stop")

    with cancel.on_cancel(stop):
        with cancel.on_cancel(stop):
            pass
        cancel.cancel("stop")  # the outer block still runs: it is stopped
    assert stopped == ["stop"]


def test_a_wait_for_a_shared_lock_ends_when_cancelled(tmp_path: Path) -> None:
    """A build queued behind another's lock (the same image or environment) waited on
    for as long as that one ran, cancelled or not."""
    lock = threading.Lock()
    lock.acquire()
    switch = Cancel()
    got: list[bool] = []
    waiter = threading.Thread(
        target=lambda: got.append(switch.acquire(lambda t: lock.acquire(timeout=t)))
    )
    waiter.start()
    time.sleep(0.3)
    assert got == [] and waiter.is_alive()
    switch.cancel("the deployment was deleted")
    waiter.join(5)
    assert got == [False] and lock.locked()  # nothing taken
    lock.release()
    assert Cancel().acquire(lambda t: lock.acquire(timeout=t)) and lock.locked()


def test_a_file_lock_wait_ends_with_the_reason_when_cancelled(tmp_path: Path) -> None:
    path = tmp_path / "locks" / "env.lock"

    def wait() -> None:
        with locked(path, current()):
            pass

    error = cancel_while_waiting(path, wait, "the deployment was deactivated")
    assert error.message == "stopped while waiting for env.lock: the deployment was deactivated"
    with locked(path, Cancel()):  # free now, and taken at once
        pass
