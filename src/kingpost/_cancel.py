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
is SIGKILLed and nothing is left to cancel it; what that subprocess started
carries :data:`PLANE_ENV` and is killed by the next control plane
(:func:`kill_orphans`).
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["PLANE_ENV", "Cancel", "current", "die_with_parent", "kill_group", "kill_orphans"]

PLANE_ENV = "KINGPOST_BUILD_PLANE"
"""Set to the control plane's pid in a build subprocess's environment (inherited by
what it starts), so a later control plane can tell the orphans of a dead one."""

_PR_SET_PDEATHSIG = 1

log = logging.getLogger(__name__)


class Cancel:
    """Kill the process groups registered here, once, for a reason."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stops: list[Callable[[], None]] = []
        self._reason: str | None = None

    @property
    def reason(self) -> str | None:
        """Why it was cancelled; ``None`` while it was not."""
        return self._reason

    def cancel(self, reason: str) -> None:
        """Kill every registered group (call every ``on_cancel``) now; later registrations
        are stopped at once."""
        with self._lock:
            if self._reason is not None:
                return
            self._reason = reason
            stops = list(self._stops)
        for stop in stops:
            try:
                stop()
            except Exception:  # one that fails must not spare the others
                log.exception("stopping a cancelled build's work failed")

    def acquire(self, try_acquire: Callable[[float], bool], poll_s: float = 0.1) -> bool:
        """Wait for a lock the build shares with others: call ``try_acquire(timeout)`` until
        it returns true, or return false once cancelled (holding nothing). A build queued
        behind another one's lock stops waiting when it is cancelled."""
        while self._reason is None:
            if try_acquire(poll_s):
                return True
        return False

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
        with self.on_cancel(lambda: kill_group(pgid)):
            yield

    @contextlib.contextmanager
    def on_cancel(self, stop: Callable[[], None]) -> Iterator[None]:
        """Call ``stop`` (from the cancelling thread) if cancelled while the block runs;
        at once if cancelled already. For work that is not a process: an image build,
        which the Docker Engine stops when its request's connection closes."""
        with self._lock:
            self._stops.append(stop)
            cancelled = self._reason is not None
        if cancelled:
            stop()
        try:
            yield
        finally:
            with self._lock:
                self._stops.remove(stop)  # one registration: the same callable may have two


def kill_group(pgid: int) -> None:
    """SIGKILL process group ``pgid``, if it is still there."""
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


def kill_orphans() -> list[int]:
    """SIGKILL every build process whose control plane (:data:`PLANE_ENV`) is gone.

    ``PR_SET_PDEATHSIG`` reaches only the installer: a package's build process it
    started (a ``setup.py`` that hangs) outlives a SIGKILLed control plane."""
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    prefix = PLANE_ENV.encode() + b"="
    own = _pid_namespace("self")
    killed = []
    for entry in proc.iterdir():
        # A process in another pid namespace (a Kingpost in a container) names its
        # control plane by a pid that means another process, or none, here.
        if not entry.name.isdigit() or own is None or _pid_namespace(entry.name) != own:
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone, or not ours to read
            continue
        plane = next((v[len(prefix) :] for v in environ.split(b"\0") if v.startswith(prefix)), b"")
        if plane.isdigit() and not _running(int(plane)):
            with contextlib.suppress(OSError):
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
    return killed


def _pid_namespace(pid: str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def _running(pid: int) -> bool:
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
