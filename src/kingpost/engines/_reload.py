"""In-place reloads of a development deployment's replica: patching its files (undoably)
and asking its model server to reload, over the replica's own port.

The request carries the replica's reload token; the gateway never forwards a path under
``/_kingpost/``, and a server without the token answers 404, so only the control plane
reloads a model."""

from __future__ import annotations

import http.client
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kingpost.engines.base import Endpoint, Reload
from kingpost.netns import socket_in_netns
from kingpost.server.contract import RELOAD_PATH, RELOAD_TOKEN_HEADER

__all__ = ["Patch", "ask_reload"]


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


class Patch:
    """Files of a replica's project replaced from a new project, with what they were, so
    that :meth:`undo` puts the old ones back."""

    def __init__(self, app: Path, uid: int | None) -> None:
        self.app = app
        self.uid = uid
        self._before: dict[str, bytes | None] = {}

    def apply(self, source: Path, changed: Sequence[str], removed: Sequence[str]) -> None:
        for rel in [*changed, *removed]:
            target = self.app / rel
            self._before[rel] = target.read_bytes() if target.is_file() else None
        for rel in changed:
            self._write(rel, (source / rel).read_bytes())
        for rel in removed:
            (self.app / rel).unlink(missing_ok=True)

    def undo(self) -> None:
        for rel, content in self._before.items():
            if content is None:
                (self.app / rel).unlink(missing_ok=True)
            else:
                self._write(rel, content)

    def _write(self, rel: str, content: bytes) -> None:
        target = self.app / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.kingpost-tmp")
        tmp.write_bytes(content)
        if self.uid is not None:
            os.chown(tmp, self.uid, self.uid)
        os.replace(tmp, target)  # a reader sees the old file or the new one, whole
        _drop_bytecode(target)


def _drop_bytecode(path: Path) -> None:
    """A module rewritten within the same second and size could look current to a cached
    ``.pyc``: remove it so the next import compiles the source."""
    if path.suffix != ".py":
        return
    cache = path.parent / "__pycache__"
    if cache.is_dir():
        for pyc in cache.glob(f"{path.stem}.*.pyc"):
            pyc.unlink(missing_ok=True)
