"""An exclusive lock on a file, between processes and threads of this machine."""

from __future__ import annotations

import fcntl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING

from kingpost.errors import BuildError

if TYPE_CHECKING:
    from kingpost._cancel import Cancel

__all__ = ["locked", "try_locked"]


@contextmanager
def locked(path: Path, cancel: Cancel | None = None) -> Iterator[None]:
    """Hold ``flock(LOCK_EX)`` on ``path`` (created, with its directory, if missing).

    With ``cancel`` (a build's switch), waiting for the lock ends with a BuildError when
    the build is cancelled."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        if cancel is None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        elif not cancel.acquire(lambda timeout: _try_flock(handle, timeout)):
            raise BuildError(f"stopped while waiting for {path.name}: {cancel.reason}")
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def try_locked(path: Path) -> Iterator[bool]:
    """Hold ``flock(LOCK_EX)`` on ``path`` if nobody does (yields True), else yield False
    at once, holding nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _try_flock(handle: IO[str], timeout: float) -> bool:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        time.sleep(timeout)
        return False
    return True
