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

__all__ = ["locked"]


@contextmanager
def locked(path: Path, cancel: Cancel | None = None, *, wait: bool = True) -> Iterator[bool]:
    """Hold ``flock(LOCK_EX)`` on ``path`` (created, with its directory, if missing);
    yields whether it is held.

    With ``cancel`` (a build's switch), waiting for the lock ends with a BuildError when
    the build is cancelled. With ``wait=False`` it is tried once: another holder has it,
    and the body runs at once with False, holding nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        if not wait:
            if not _try_flock(handle, 0):
                yield False
                return
        elif cancel is None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        elif not cancel.acquire(lambda timeout: _try_flock(handle, timeout)):
            raise BuildError(f"stopped while waiting for {path.name}: {cancel.reason}")
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
