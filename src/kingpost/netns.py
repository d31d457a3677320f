"""Linux network namespaces: create one for a child, open sockets inside one.

A socket stays in the namespace it was created in, so a thread can ``setns``
into a replica's namespace, create a socket, ``setns`` back, and then connect it
from anywhere (the gateway's event loop, a probe thread). Needs CAP_SYS_ADMIN. Shared by
the process engine (it creates the namespaces and probes into them) and the gateway (it
connects into them), so it belongs to neither.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import functools
import os
import socket
import struct
import threading
from collections.abc import Callable

__all__ = [
    "CLONE_NEWNET",
    "can_unshare_net",
    "enter_new_netns",
    "socket_in_netns",
]

CLONE_NEWNET = 0x40000000
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_lock = threading.Lock()
_own_ns_fd: int | None = None
_ns_fds: dict[str, int] = {}


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sH14s", b"lo", 0, b"")
        flags = struct.unpack("16sH14s", fcntl.ioctl(s.fileno(), _SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(s.fileno(), _SIOCSIFFLAGS, struct.pack("16sH14s", b"lo", flags | _IFF_UP, b""))


def enter_new_netns() -> None:
    """Move the calling process into a fresh network namespace with loopback up.

    Meant for ``preexec_fn`` of a child process.
    """
    _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
    _loopback_up()


def succeeds_in_child(fn: Callable[[], None]) -> bool:
    """Whether ``fn`` runs without raising in a forked child (for privilege checks
    that must not change this process)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            fn()
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


@functools.cache
def can_unshare_net() -> bool:
    """Whether this process may create network namespaces (tested once, in a child)."""
    return succeeds_in_child(enter_new_netns)


def _ns_fd(path: str) -> int:
    fd = _ns_fds.get(path)
    if fd is None:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        _ns_fds[path] = fd
    return fd


def forget_netns(path: str) -> None:
    with _lock:
        fd = _ns_fds.pop(path, None)
    if fd is not None:
        os.close(fd)


def socket_in_netns(path: str, family: int = socket.AF_INET) -> socket.socket:
    """A new TCP socket created inside the network namespace at ``path``."""
    global _own_ns_fd
    with _lock:
        if _own_ns_fd is None:
            _own_ns_fd = os.open(
                f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY | os.O_CLOEXEC
            )
        try:
            target = _ns_fd(path)
        except FileNotFoundError:
            raise ConnectionRefusedError(f"network namespace {path} is gone") from None
        _check(_libc.setns(target, CLONE_NEWNET), f"setns({path})")
        try:
            return socket.socket(family, socket.SOCK_STREAM)
        finally:
            _check(_libc.setns(_own_ns_fd, CLONE_NEWNET), "setns(back)")
