"""A build's off switch: the process groups it runs, killed when it is cancelled.

The controller runs each build on a thread of its own inside a :class:`Cancel`
(:meth:`Cancel.active`); code deep in the build that starts a subprocess (the
installer, see :func:`kingpost.envs.installer.run_logged`) starts it in a new
process group and registers that group with :func:`current` for as long as it
runs. Cancelling (a deactivated or deleted deployment, a build past its
timeout, a stopping control plane) SIGKILLs every registered group, so an
installer and whatever it started (a package's ``setup.py``) end at once, and
the build fails with the reason given. :func:`die_with_parent` makes such a
subprocess die with the thread that started it, even when the control plane
is SIGKILLed and nothing is left to cancel it.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator

__all__ = ["Cancel", "current", "die_with_parent"]

_PR_SET_PDEATHSIG = 1


class Cancel:
    """Kill the process groups registered here, once, for a reason."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._groups: set[int] = set()
        self._reason: str | None = None

    @property
    def reason(self) -> str | None:
        """Why it was cancelled; ``None`` while it was not."""
        return self._reason

    def cancel(self, reason: str) -> None:
        """Kill every registered group now; later registrations are killed at once."""
        with self._lock:
            if self._reason is not None:
                return
            self._reason = reason
            groups = list(self._groups)
        for pgid in groups:
            _kill_group(pgid)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Make this the :func:`current` one in this thread (context) while the block runs."""
        token = _current.set(self)
        try:
            yield
        finally:
            _current.reset(token)

    @contextlib.contextmanager
    def watching(self, pgid: int) -> Iterator[None]:
        """Register process group ``pgid`` while the block runs; killed at once if
        cancelled already."""
        with self._lock:
            self._groups.add(pgid)
            cancelled = self._reason is not None
        if cancelled:
            _kill_group(pgid)
        try:
            yield
        finally:
            with self._lock:
                self._groups.discard(pgid)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


_current: contextvars.ContextVar[Cancel | None] = contextvars.ContextVar(
    "kingpost_cancel", default=None
)


def current() -> Cancel:
    """The build's switch, or a fresh one nobody cancels when none is active."""
    return _current.get() or Cancel()


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` (Linux) that has the child SIGKILLed when the thread that
    started it ends, the control plane's death included (``PR_SET_PDEATHSIG``)."""
    if sys.platform != "linux":
        return None
    parent, prctl = os.getpid(), ctypes.CDLL(None).prctl  # looked up before the fork

    def run() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # it died before prctl: nothing would kill us
            os._exit(1)

    return run
