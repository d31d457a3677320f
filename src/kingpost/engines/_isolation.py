"""What runs in a replica's child process between fork and exec (Linux only).

Keep it small: it runs in a freshly forked child of a multi-threaded parent.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import resource
from collections.abc import Callable
from dataclasses import dataclass

from kingpost.netns import enter_new_netns, succeeds_in_child

__all__ = ["Isolation", "can_unshare_mounts", "preexec"]

_PR_SET_NO_NEW_PRIVS = 38
_CLONE_NEWNS = 0x00020000
_MS_RDONLY = 1
_MS_NOSUID = 2
_MS_NODEV = 4
_MS_REMOUNT = 32
_MS_BIND = 4096
_MS_REC = 16384
_MS_PRIVATE = 1 << 18

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _ok(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


@dataclass(frozen=True)
class Isolation:
    netns: bool
    """Own network namespace (loopback only)."""
    read_only_binds: tuple[tuple[str, str], ...] = ()
    """(source, target) pairs bound read-only in a private mount namespace."""
    masks: tuple[str, ...] = ()
    """Directories hidden under an empty tmpfs (the Kingpost home, directories others
    may not enter that hold something the replica needs, ``/dev/shm``)."""
    keep: tuple[tuple[str, bool], ...] = ()
    """(path, writable) under the masks, bound back at the same place, parents first."""
    private_tmp: str | None = None
    """A directory of the replica's own to bind at ``/tmp`` (after everything else)."""
    cwd: str | None = None
    """Working directory to enter once the mounts are made (the one Popen entered
    before them would still reach the hidden tree through ``..``)."""
    uid: int | None = None
    """Run as this uid and gid, no supplementary groups, ``no_new_privs``."""
    nproc: int | None = None
    """With ``uid``: the most processes and threads that uid may have (``RLIMIT_NPROC``;
    each deployment has a uid of its own, so its replicas share the bound)."""


def _bind(source: str, target: str, read_only: bool) -> None:
    _ok(
        _libc.mount(source.encode(), target.encode(), None, _MS_BIND | _MS_REC, None),
        f"bind {target}",
    )
    if read_only:
        flags = _MS_BIND | _MS_REMOUNT | _MS_RDONLY
        _ok(_libc.mount(None, target.encode(), None, flags, None), f"read-only {target}")


def _mask(path: str) -> None:
    mode = "1777" if path == "/dev/shm" else "755"
    _ok(
        _libc.mount(
            b"tmpfs", path.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV, f"mode={mode}".encode()
        ),
        f"hide {path}",
    )


def _mount_view(isolation: Isolation) -> None:
    """Private mounts: masks over hidden trees, what the replica needs bound back, and
    its read-only binds. Sources are opened before anything is hidden, and bound from
    ``/proc/self/fd``: a mask may cover them."""
    _private_mounts()
    sources = [path for path, _ in isolation.keep]
    sources += [source for source, _ in isolation.read_only_binds]
    if isolation.private_tmp is not None:
        sources.append(isolation.private_tmp)
    fds = {path: os.open(path, os.O_PATH | os.O_CLOEXEC) for path in dict.fromkeys(sources)}
    try:
        for path in isolation.masks:
            _mask(path)
        for path, writable in isolation.keep:
            os.makedirs(path, exist_ok=True)
            _bind(f"/proc/self/fd/{fds[path]}", path, read_only=not writable)
        for source, target in isolation.read_only_binds:
            os.makedirs(target, exist_ok=True)
            _bind(f"/proc/self/fd/{fds[source]}", target, read_only=True)
        if isolation.private_tmp is not None:
            _bind(f"/proc/self/fd/{fds[isolation.private_tmp]}", "/tmp", read_only=False)
    finally:
        for fd in fds.values():
            os.close(fd)


def preexec(isolation: Isolation) -> Callable[[], None]:
    def run() -> None:
        os.setsid()
        if isolation.netns:
            enter_new_netns()
        if isolation.read_only_binds or isolation.masks:
            _mount_view(isolation)
        if isolation.cwd is not None:
            os.chdir(isolation.cwd)
        if isolation.uid is not None:
            if isolation.nproc is not None:  # checked against the uid it is about to take
                resource.setrlimit(resource.RLIMIT_NPROC, (isolation.nproc, isolation.nproc))
            os.setgroups([])
            os.setgid(isolation.uid)
            os.setuid(isolation.uid)
            _ok(_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
        # No parent-death signal: a replica outlives a control plane that is killed, for
        # the next one to adopt (``engines/_records.py``).

    return run


def _private_mounts() -> None:
    _ok(_libc.unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _ok(_libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None), "make / private")


@functools.cache
def can_unshare_mounts() -> bool:
    """Whether a child may make a private mount namespace (tested once)."""
    return succeeds_in_child(_private_mounts)
