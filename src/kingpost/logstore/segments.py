"""The log store on disk: append-only JSON-lines segment files in one directory.

Each writer (a gateway worker, the control plane's collector) owns the segments named
``{writer}.{start_ns}.jsonl`` and appends whole lines to its newest one; it starts a new
segment when that one reaches ``segment_bytes``. Nothing is rewritten in place, so a
killed process loses at most the lines it had not written yet, and a reader never sees a
half-written file except, possibly, its last line (which it skips).

:func:`prune` keeps the store bounded: segments whose last write is older than
``max_age_s`` go, then the oldest until the total is within ``max_bytes``; a writer's
newest segment is kept unless it is past the age limit (its writer starts a new one when
it finds its file gone). The control plane's collector calls it every few seconds.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kingpost.errors import ValidationError
from kingpost.logstore.records import LogQuery, Position

__all__ = ["SegmentWriter", "position", "prune", "query", "store_bytes"]

_SUFFIX = ".jsonl"


def _dumps(rec: dict[str, Any]) -> bytes:
    return json.dumps(rec, separators=(",", ":"), default=str).encode() + b"\n"


class SegmentWriter:
    """Appends records for one writer. Not thread-safe: one owner calls it."""

    def __init__(self, root: Path, writer: str, segment_bytes: int) -> None:
        if "." in writer or "/" in writer:
            raise ValueError(f"writer name {writer!r} may not hold '.' or '/'")
        self.root = root
        self.writer = writer
        self.segment_bytes = max(4096, segment_bytes)
        self._fd: int | None = None
        self._path: Path | None = None
        self._size = 0

    def _open(self) -> int:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._path = self.root / f"{self.writer}.{time.time_ns()}{_SUFFIX}"
        self._fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._size = 0
        return self._fd

    def write(self, records: Iterable[dict[str, Any]]) -> None:
        self.write_lines([_dumps(r) for r in records])

    def write_lines(self, lines: list[bytes]) -> None:
        """Append encoded lines (each ending in a newline) in as few writes as may be."""
        if not lines:
            return
        if self._fd is not None and self._path is not None and not self._path.exists():
            self.close()  # pruned for its age while idle: start anew
        data = b"".join(lines)
        if self._size + len(data) <= self.segment_bytes:  # the usual batch: one write, no walk
            fd = self._fd if self._fd is not None else self._open()
            os.write(fd, data)
            self._size += len(data)
            if self._size >= self.segment_bytes:
                self.close()
            return
        start = 0
        while start < len(lines):
            fd = self._fd if self._fd is not None else self._open()
            room, end = self.segment_bytes - self._size, start
            chunk = 0
            while end < len(lines) and (chunk + len(lines[end]) <= room or end == start):
                chunk += len(lines[end])
                end += 1
            data = b"".join(lines[start:end])
            os.write(fd, data)
            self._size += len(data)
            start = end
            if self._size >= self.segment_bytes:
                self.close()

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


@dataclass(frozen=True)
class _Segment:
    path: Path
    writer: str
    started_ns: int
    size: int
    mtime: float


def _segments(root: Path) -> list[_Segment]:
    out: list[_Segment] = []
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return out
    for entry in entries:
        name = entry.name
        if not name.endswith(_SUFFIX):
            continue
        writer, _, started = name[: -len(_SUFFIX)].rpartition(".")
        if not writer or not started.isdigit():
            continue
        try:
            st = entry.stat()
        except FileNotFoundError:
            continue
        out.append(_Segment(Path(entry.path), writer, int(started), st.st_size, st.st_mtime))
    out.sort(key=lambda s: (s.started_ns, s.writer))
    return out


def store_bytes(root: Path) -> int:
    return sum(s.size for s in _segments(root))


def prune(root: Path, max_bytes: int, max_age_s: float, now: float | None = None) -> list[Path]:
    """Remove segments past ``max_age_s`` and the oldest beyond ``max_bytes``; the paths
    removed, oldest first."""
    now = time.time() if now is None else now
    segments = _segments(root)
    newest: dict[str, _Segment] = {}
    for seg in segments:
        newest[seg.writer] = seg
    keep: list[_Segment] = []
    removed: list[Path] = []
    for seg in segments:
        if now - seg.mtime > max_age_s:
            removed.append(seg.path)
        else:
            keep.append(seg)
    total = sum(s.size for s in keep)
    for seg in keep:
        if total <= max_bytes:
            break
        if newest[seg.writer] is seg:
            continue
        removed.append(seg.path)
        total -= seg.size
    for path in removed:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return removed


_Found = tuple[Position, dict[str, Any]]


def _read(seg: _Segment, q: LogQuery) -> Iterator[_Found]:
    try:
        f = seg.path.open("rb")
    except FileNotFoundError:
        return
    with f:
        for n, raw in enumerate(f):
            if not raw.endswith(b"\n") or not q.prefilter(raw):
                continue  # the last line of a segment still being written, or no match
            try:
                rec = json.loads(raw)
            except ValueError:
                continue
            if isinstance(rec, dict) and q.matches(rec):
                at = (float(rec.get("ts", 0.0)), seg.started_ns, seg.writer, n)
                if q.after is None or at > q.after:
                    rec["cursor"] = f"{seg.path.name}:{n}"
                    yield at, rec


def _at(found: _Found) -> Position:
    return found[0]


def query(root: Path, q: LogQuery) -> list[dict[str, Any]]:
    """The matching records, oldest first: the newest ``q.limit`` of them (the oldest with
    ``q.oldest_first``). Each gets a ``cursor`` (segment and line) that names it for as
    long as it is kept."""
    since = q.since
    if q.after is not None:
        since = q.after[0] if since is None else max(since, q.after[0])
    segments = [s for s in _segments(root) if since is None or s.mtime >= since - 1]
    items = (found for seg in segments for found in _read(seg, q))
    pick = heapq.nsmallest if q.oldest_first else heapq.nlargest
    return [rec for _, rec in sorted(pick(q.limit, items, key=_at), key=_at)]


def position(root: Path, cursor: str, field: str = "after") -> Position:
    """Where the line a ``cursor`` names stands (read from its segment, which must still be
    kept: only names the store lists are opened)."""
    name, _, line = cursor.rpartition(":")
    seg = next((s for s in _segments(root) if s.path.name == name), None)
    if seg is not None and line.isdigit():
        with contextlib.suppress(FileNotFoundError), seg.path.open("rb") as f:
            for n, raw in enumerate(f):
                if n == int(line):
                    try:
                        rec = json.loads(raw)
                    except ValueError:
                        break
                    if isinstance(rec, dict):
                        return (float(rec.get("ts", 0.0)), seg.started_ns, seg.writer, n)
                    break
    raise ValidationError(
        f"{field}: must be the cursor of a line still in the store (as a query returned "
        f"it: segment:line); got {cursor!r}",
        field=field,
        value=cursor,
    )
