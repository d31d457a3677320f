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
            rec: dict[str, object] = {
                "ts": round(wall - (perf - end), 6),
                "level": _level(status),
                "source": "gateway",
                "request_id": rid,
                "model_id": target.model_id if target is not None else None,
                "deployment_id": target.deployment.deployment_id if target is not None else None,
                "replica": req[4] if req is not None else None,
                "status": status or None,
                "outcome": outcome,
                "duration_ms": round((end - start) * 1000, 3),
            }
            if req is not None:
                # The path only: a query string may carry what its sender would not log.
                path = req[1].partition(b"?")[0].decode("latin-1")
                method = req[0].decode("latin-1") or "?"
                rec["method"], rec["route"] = method, path
                rec["bytes_in"], rec["bytes_out"] = req[2], req[3]
                rec["message"] = f"{method} {path} {status or '-'} {outcome}"
            else:
                rec["message"] = f"{status or '-'} {outcome}"
            out.append(json.dumps(rec, separators=(",", ":")).encode() + b"\n")
        with contextlib.suppress(OSError):  # a full disk loses access lines, never requests
            self._writer.write_lines(out)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.flush()
        self._writer.close()
