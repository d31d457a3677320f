"""The gateway's access lines in the log store: one per answer, written in batches.

:meth:`AccessLines.add` only appends a tuple (no encoding, no system call per request);
a timer on the event loop encodes what gathered and appends it to this worker's segment
(``logstore/segments.py``) in one write, every ``flush_s`` (0.2 s). Lines still in memory
when the process is killed are lost; a clean stop writes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from kingpost.logstore.segments import SegmentWriter

if TYPE_CHECKING:
    from kingpost.gateway.proxy import Request
    from kingpost.gateway.routing import Target

__all__ = ["AccessLines"]

_Req = tuple[bytes, bytes, int, int, "str | None"]
"""Of a request, what its line shows: method, target, bytes in and out, replica."""
_Line = tuple[str, int, str, float, float, "Target | None", "_Req | None"]


def _level(status: int) -> str:
    return "ERROR" if status >= 500 else "WARNING" if status >= 400 else "INFO"


class AccessLines:
    def __init__(self, root: Path, writer: str, segment_bytes: int, flush_s: float = 0.2) -> None:
        self._writer = SegmentWriter(root, writer, segment_bytes)
        self._lines: list[_Line] = []
        self._timer: asyncio.TimerHandle | None = None
        self.flush_s = flush_s
        self._paths: dict[bytes, str] = {}
        """Request targets and their paths as JSON strings (the same few, over and over)."""

    def add(
        self,
        rid: str,
        status: int,
        outcome: str,
        start: float,
        target: Target | None,
        req: Request | None,
    ) -> None:
        # The request's figures now, not the request: it may hold a body until the flush.
        seen = (
            None
            if req is None
            else (req.method, req.url, req.body_bytes, req.bytes_out, req.replica)
        )
        self._lines.append((rid, status, outcome, start, time.perf_counter(), target, seen))
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.flush_s, self.flush)

    def flush(self) -> None:
        self._timer = None
        lines, self._lines = self._lines, []
        if not lines:
            return
        wall, perf = time.time(), time.perf_counter()
        out: list[bytes] = []
        for rid, status, outcome, start, end, target, req in lines:
            out.append(self._encode(rid, status, outcome, start, end, wall - perf, target, req))
        with contextlib.suppress(OSError):  # a full disk loses access lines, never requests
            self._writer.write_lines(out)

    def _encode(
        self,
        rid: str,
        status: int,
        outcome: str,
        start: float,
        end: float,
        offset: float,
        target: Target | None,
        req: _Req | None,
    ) -> bytes:
        """One access line as JSON, formatted by hand: the ids (request ids as the proxy
        accepts them, model, deployment and replica ids, outcome codes) are the platform's
        own tokens and need no escaping; the path, the client's, is escaped once per URL."""
        if target is None:
            where = '"model_id":null,"deployment_id":null'
        else:
            dep = target.deployment.deployment_id
            where = f'"model_id":"{target.model_id}","deployment_id":"{dep}"'
        shown = str(status) if status else "-"
        if req is None:
            tail = f'"replica":null,"message":"{shown} {outcome}"'
        else:
            method, url, bytes_in, bytes_out, replica = req
            path = self._paths.get(url)
            if path is None:
                if len(self._paths) >= 1024:
                    self._paths.clear()
                # The path only: a query string may carry what its sender would not log.
                path = self._paths[url] = json.dumps(url.partition(b"?")[0].decode("latin-1"))
            m = method.decode("latin-1") or "?"
            rep = f'"{replica}"' if replica is not None else "null"
            tail = (
                f'"replica":{rep},"method":"{m}","route":{path},"bytes_in":{bytes_in},'
                f'"bytes_out":{bytes_out},"message":"{m} {path[1:-1]} {shown} {outcome}"'
            )
        return (
            f'{{"ts":{offset + end:.6f},"level":"{_level(status)}","source":"gateway",'
            f'"request_id":"{rid}",{where},"status":{status or "null"},'
            f'"outcome":"{outcome}","duration_ms":{(end - start) * 1000:.3f},{tail}}}\n'
        ).encode()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.flush()
        self._writer.close()
