"""The build's off switch (kingpost._cancel) without a build."""

from __future__ import annotations

import pytest

from kingpost._cancel import Cancel


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
