"""In-place reloads of a development deployment's replica: patching its files (undoably)
and asking its model server to reload, over the replica's own port.

The request carries the replica's reload token; the gateway never forwards a path under
``/_kingpost/``, and a server without the token answers 404, so only the control plane
reloads a model."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import stat
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from kingpost.engines.base import Endpoint, Reload
from kingpost.netns import socket_in_netns
from kingpost.server.contract import RELOAD_PATH, RELOAD_TOKEN_HEADER

__all__ = ["Patch", "ask_reload", "open_parent"]


class _Connection(http.client.HTTPConnection):
    """An HTTP connection that opens its socket inside the replica's network namespace."""

    def __init__(self, endpoint: Endpoint, timeout: float) -> None:
        super().__init__(endpoint.host, endpoint.port, timeout=timeout)
        self._netns = endpoint.netns

    def connect(self) -> None:
        if self._netns is None:
            super().connect()
            return
        sock = socket_in_netns(self._netns)
        sock.settimeout(self.timeout)
        sock.connect((self.host, self.port))
        self.sock = sock


def ask_reload(endpoint: Endpoint, token: str, timeout: float) -> Reload:
    """``POST`` the reload path with the token; the server's answer as a :class:`Reload`."""
    conn = _Connection(endpoint, timeout)
    try:
        conn.request("POST", RELOAD_PATH, body=b"", headers={RELOAD_TOKEN_HEADER: token})
        resp = conn.getresponse()
        body = resp.read()
    except (TimeoutError, OSError, http.client.HTTPException) as exc:
        return Reload(False, f"the replica did not answer the reload: {exc}")
    finally:
        conn.close()
    if resp.status != 200:
        return Reload(False, f"the replica answered the reload with HTTP {resp.status}")
    try:
        result: dict[str, Any] = json.loads(body)
    except ValueError:
        return Reload(False, "the replica's reload answer is not JSON")
    return Reload(bool(result.get("ok")), str(result.get("error", "")),
                  str(result.get("traceback", "")))  # fmt: skip


_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW


def open_parent(root: Path, rel: str, create: bool, uid: int | None) -> tuple[int, str] | None:
    """An open descriptor of ``rel``'s directory under ``root`` and its last name
    (``None``: a directory on the way is missing and ``create`` is false).

    ``rel`` is walked one name at a time from ``root``, never following a link
    (``O_NOFOLLOW``, ``dir_fd``): ``root`` is a directory a replica's own user can change,
    and a link planted on the way must not lead a root write out of it. Directories
    created on the way are given to ``uid`` when there is one. An absolute ``rel``, a
    ``.`` or ``..`` in it, or a link on the way is an :class:`OSError` naming it."""
    parts = PurePosixPath(rel).parts
    if not parts or PurePosixPath(rel).is_absolute() or any(p in (".", "..") for p in parts):
        raise OSError(f"{rel!r} is not a path inside the project")
    fd = os.open(root, _DIR)
    try:
        for part in parts[:-1]:
            try:
                step = os.open(part, _DIR, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    os.close(fd)
                    return None
                os.mkdir(part, 0o755, dir_fd=fd)
                step = os.open(part, _DIR, dir_fd=fd)
                if uid is not None:
                    os.fchown(step, uid, uid)
            except OSError as exc:
                raise OSError(f"{rel}: {part!r} is not a directory (a link?): {exc}") from exc
            os.close(fd)
            fd = step
    except BaseException:
        os.close(fd)
        raise
    return fd, parts[-1]


class Patch:
    """Files of a replica's project replaced from a new project, with what they were, so
    that :meth:`undo` puts the old ones back.

    The control plane (root) writes into a directory the replica's own user can change
    (its copy of the project, a container's ``/app`` volume): a link the server planted
    there must not send a read or a write outside it. So every path is walked one name at
    a time from the held directory, never following a link (``O_NOFOLLOW``, ``dir_fd``);
    a link, or anything but a regular file where a file is patched, fails the patch with
    an :class:`OSError` naming it."""

    def __init__(self, app: Path, uid: int | None) -> None:
        self.app = app
        self.uid = uid
        self._before: dict[str, bytes | None] = {}

    def apply(self, source: Path, changed: Sequence[str], removed: Sequence[str]) -> None:
        for rel in [*changed, *removed]:
            self._before[rel] = self._read(rel)
        for rel in changed:
            self._write(rel, (source / rel).read_bytes())
        for rel in removed:
            self._unlink(rel)

    def undo(self) -> None:
        for rel, content in self._before.items():
            if content is None:
                self._unlink(rel)
            else:
                self._write(rel, content)

    def _parent(self, rel: str, create: bool) -> tuple[int, str] | None:
        return open_parent(self.app, rel, create, self.uid)

    def _read(self, rel: str) -> bytes | None:
        found = self._parent(rel, create=False)
        if found is None:
            return None
        fd, name = found
        try:
            try:
                file = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
            except FileNotFoundError:
                return None
            except OSError as exc:
                raise OSError(f"{rel} cannot be patched (a link?): {exc}") from exc
            with os.fdopen(file, "rb") as f:
                if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    raise OSError(f"{rel} is not a regular file; it cannot be patched")
                return f.read()
        finally:
            os.close(fd)

    def _write(self, rel: str, content: bytes) -> None:
        found = self._parent(rel, create=True)
        assert found is not None
        fd, name = found
        tmp = f".{name}.kingpost-tmp"
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=fd)
            file = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644,
                           dir_fd=fd)  # fmt: skip
            with os.fdopen(file, "wb") as f:
                f.write(content)
                if self.uid is not None:
                    os.fchown(f.fileno(), self.uid, self.uid)
            # a reader sees the old file or the new one, whole; a link there is replaced
            os.replace(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)
            _drop_bytecode(fd, name)
        finally:
            os.close(fd)

    def _unlink(self, rel: str) -> None:
        found = self._parent(rel, create=False)
        if found is None:
            return
        fd, name = found
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=fd)
        finally:
            os.close(fd)


def _drop_bytecode(fd: int, name: str) -> None:
    """A module rewritten within the same second and size could look current to a cached
    ``.pyc``: remove it (in ``__pycache__`` beside it) so the next import compiles the
    source."""
    if not name.endswith(".py"):
        return
    try:
        cache = os.open("__pycache__", _DIR, dir_fd=fd)
    except OSError:
        return
    try:
        stem = name[: -len(".py")]
        for entry in os.listdir(cache):
            if entry.startswith(f"{stem}.") and entry.endswith(".pyc"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry, dir_fd=cache)
    finally:
        os.close(cache)
