"""The gateway's access lines in the log store: one per answer, written in batches.

:meth:`AccessLines.add` only appends a tuple (no encoding, no system call per request);
a timer on the event loop encodes what gathered and appends it to this worker's segment
(``logstore/segments.py``) in one write, every ``flush_s`` (0.2 s). Encoding fills a ``%``
template kept per route, status, outcome, URL and replica (:meth:`AccessLines._template`).
Lines still in memory when the process is killed are lost; a clean stop writes them.
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
        self._templates: dict[tuple[object, ...], str] = {}
        """Lines by what the answers of one route share (the same few, over and over)."""

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
        offset = time.time() - time.perf_counter()
        templates, template = self._templates, self._template
        out: list[bytes] = []
        for rid, status, outcome, start, end, target, req in lines:
            # Targets are keyed by their ids, not hashed whole (a route holds its upstreams).
            dep = None if target is None else target.deployment.deployment_id
            if req is None:
                key: tuple[object, ...] = (dep, status, outcome)
                bytes_in = bytes_out = 0
            else:
                method, url, bytes_in, bytes_out, replica = req
                key = (dep, status, outcome, method, url, replica)
            tmpl = templates.get(key)
            if tmpl is None:
                if len(templates) >= 4096:
                    templates.clear()
                tmpl = templates[key] = template(status, outcome, target, req)
            out.append(
                (tmpl % (offset + end, rid, (end - start) * 1000, bytes_in, bytes_out)).encode()
            )
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
        """One line on its own (``flush`` does the same with its templates kept)."""
        sizes = (0, 0) if req is None else (req[2], req[3])
        tmpl = self._template(status, outcome, target, req)
        return (tmpl % (offset + end, rid, (end - start) * 1000, *sizes)).encode()

    @staticmethod
    def _template(status: int, outcome: str, target: Target | None, req: _Req | None) -> str:
        """The line of every answer with these status, outcome, route and request figures,
        as a ``%`` template of what differs per answer: time, request id, duration and the
        body sizes (taken by ``%d`` and left out of the text when ``req`` is None). JSON
        formatted by hand: the ids (model, deployment and replica ids, outcome codes) are
        the platform's own tokens and need no escaping; the path, the client's, is escaped;
        request ids (``%s``) are tokens as the proxy accepts them. Every ``%`` of the fixed
        text is doubled, so a path's own is kept as it came."""
        if target is None:
            where = '"model_id":null,"deployment_id":null'
        else:
            dep = target.deployment.deployment_id
            where = f'"model_id":"{target.model_id}","deployment_id":"{dep}"'.replace("%", "%%")
        shown = str(status) if status else "-"
        if req is None:
            tail = f'"replica":null,"message":"{shown} {outcome}"'.replace("%", "%%")
            sizes = "%.0s%.0s"  # takes the two sizes, shows nothing
        else:
            method, url, _, _, replica = req
            # The path only: a query string may carry what its sender would not log.
            path = json.dumps(url.partition(b"?")[0].decode("latin-1")).replace("%", "%%")
            m = method.decode("latin-1").replace("%", "%%") or "?"
            rep = f'"{replica}"'.replace("%", "%%") if replica is not None else "null"
            tail = (
                f'"replica":{rep},"method":"{m}","route":{path},'
                f'"message":"{m} {path[1:-1]} {shown} {outcome}"'
            )
            sizes = '"bytes_in":%d,"bytes_out":%d,'
        head = (
            f'"level":"{_level(status)}","source":"gateway","request_id":"%s",{where},'
            f'"status":{status or "null"},"outcome":"{outcome}",'
        )
        return '{"ts":%.6f,' + head + '"duration_ms":%.3f,' + sizes + tail + "}\n"

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.flush()
        self._writer.close()
