"""Cancelling a build while it waits for a lock another build holds."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from kingpost._cancel import Cancel
from kingpost._filelock import locked
from kingpost.errors import BuildError

__all__ = ["cancel_while_waiting"]


def cancel_while_waiting(lock: Path, work: Callable[[], object], reason: str) -> BuildError:
    """Hold ``lock`` (another build's), start ``work`` under a cancel switch, check that it
    waits, cancel it with ``reason``, and return the BuildError it must end with."""
    switch = Cancel()
    errors: list[BuildError] = []

    def run() -> None:
        try:
            with switch.active():
                work()
        except BuildError as exc:
            errors.append(exc)

    with locked(lock):
        thread = threading.Thread(target=run)
        thread.start()
        time.sleep(0.4)
        assert thread.is_alive(), "it did not wait for the lock"
        switch.cancel(reason)
        thread.join(10)
        assert not thread.is_alive(), "it went on waiting once cancelled"
    assert errors, "it ended without an error"
    return errors[0]
