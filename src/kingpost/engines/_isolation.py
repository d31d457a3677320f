"""What runs in a replica's child process between fork and exec (Linux only).

Keep it small: it runs in a freshly forked child of a multi-threaded parent.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass

from kingpost.engines.netns import enter_new_netns, succeeds_in_child

__all__ = ["Isolation", "can_unshare_mounts", "preexec"]

_PR_SET_PDEATHSIG = 1
_CLONE_NEWNS = 0x00020000
_MS_RDONLY = 1
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


def _bind_read_only(source: str, target: str) -> None:
    _ok(
        _libc.mount(source.encode(), target.encode(), None, _MS_BIND | _MS_REC, None),
        f"bind {target}",
    )
    flags = _MS_BIND | _MS_REMOUNT | _MS_RDONLY
    _ok(_libc.mount(None, target.encode(), None, flags, None), f"read-only {target}")


def preexec(isolation: Isolation) -> Callable[[], None]:
    def run() -> None:
        os.setsid()
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if isolation.netns:
            enter_new_netns()
        if isolation.read_only_binds:
            _private_mounts()
            for source, target in isolation.read_only_binds:
                _bind_read_only(source, target)

    return run


def _private_mounts() -> None:
    _ok(_libc.unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _ok(_libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None), "make / private")


@functools.cache
def can_unshare_mounts() -> bool:
    """Whether a child may make a private mount namespace (tested once)."""
    return succeeds_in_child(_private_mounts)
