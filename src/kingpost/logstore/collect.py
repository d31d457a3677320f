"""The control plane's collector: replica and build output into the log store.

Engines keep writing what they always wrote (each replica's ``output.log`` under
``{home}/replicas/{replica}/``, each deployment's build log under ``{home}/builds/``;
``kingpost logs`` without filters still reads those). The collector, a thread of the
control plane, reads what was added to them since its last look (twice a second) and
appends one record per line to its own segments: the time (the model server's JSON time
when the line has one, else when the file was last written as it was read: at most half a
second late, and the same for lines read together), a level, the deployment, replica and
model.

Where it got to in each file is saved beside the segments (``collector.offsets``) after
the records are written, so a restarted control plane, a ``kill -9`` included, goes on from
there: lines are never lost, and at most the last batch before a kill is stored twice. A
file replaced or cut (the build log keeps its tail once large) is read on from the bytes
last read, found in it again (from its start when they are not there).
The collector also prunes the store (``segments.prune``) every ``prune_every_s``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from kingpost.logstore.records import replica_record
from kingpost.logstore.segments import SegmentWriter, prune

__all__ = ["Collector", "LogSettings"]

log = logging.getLogger("kingpost.logstore")
_READ_LIMIT = 1024 * 1024
"""Bytes read from one file per pass; the rest comes on the next."""
_TAIL = 256
"""Bytes before the offset kept with it, to find the place again in a replaced file."""
_SEARCH_LIMIT = 4 * 1024 * 1024
_LINE_LIMIT = 64 * 1024
"""A line without its end this long is stored as it is (a model printing with no newline)."""


@dataclass(frozen=True)
class LogSettings:
    root: Path
    max_bytes: int
    max_age_s: float

    @property
    def segment_bytes(self) -> int:
        """One segment: a sixteenth of the store (so pruning frees space in steps), at most
        8 MiB."""
        return max(64 * 1024, min(8 * 1024 * 1024, self.max_bytes // 16))


class Collector:
    def __init__(
        self,
        settings: LogSettings,
        replicas_dir: Path,
        builds_dir: Path,
        model_of: Callable[[str], str | None],
        interval_s: float = 0.5,
        prune_every_s: float = 10.0,
    ) -> None:
        self.settings = settings
        self.replicas_dir = replicas_dir
        self.builds_dir = builds_dir
        self._model_of = model_of
        self._models: dict[str, str | None] = {}
        self.interval_s = interval_s
        self.prune_every_s = prune_every_s
        self._writer = SegmentWriter(settings.root, "collector", settings.segment_bytes)
        self._state_path = settings.root / "collector.offsets"
        self._offsets: dict[str, _Place] = self._load_offsets()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_prune = 0.0

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="kingpost-logs", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with contextlib.suppress(Exception):
            self.collect_once()
        self._writer.close()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.collect_once()
                now = time.monotonic()
                if now - self._last_prune >= self.prune_every_s:
                    self._last_prune = now
                    s = self.settings
                    prune(s.root, s.max_bytes, s.max_age_s)
            except Exception:  # the loop never stops: a bad pass is logged
                log.exception("collecting logs failed")

    # -- one pass ----------------------------------------------------------------------
    def _sources(self) -> list[tuple[Path, str, str | None, str]]:
        """(file, source, replica, deployment) for every file the engines write."""
        out: list[tuple[Path, str, str | None, str]] = []
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.replicas_dir):
                if entry.is_dir(follow_symlinks=False):
                    dep = entry.name.rpartition("-")[0] or entry.name
                    out.append((Path(entry.path) / "output.log", "replica", entry.name, dep))
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.builds_dir):
                name = entry.name
                if name.startswith("build-") and name.endswith(".log"):
                    out.append((Path(entry.path), "build", None, name[6:-4]))
        return out

    def collect_once(self) -> int:
        """Store what was added to every source since the last pass; the lines stored."""
        records: list[dict[str, Any]] = []
        offsets: dict[str, _Place] = {}
        now = time.time()
        for path, source, replica, dep in self._sources():
            key = str(path)
            try:
                with path.open("rb") as f:
                    place = _resume(f, self._offsets.get(key))
                    f.seek(place.offset)
                    data = f.read(_READ_LIMIT)
                    written = os.fstat(f.fileno()).st_mtime
            except FileNotFoundError:
                continue
            end = data.rfind(b"\n") + 1
            if end == 0 and len(data) >= _LINE_LIMIT:
                end = len(data)
            offsets[key] = _Place(place.ino, place.offset + end, (place.tail + data[:end])[-_TAIL:])
            if end:
                model = self._model(dep)
                for line in data[:end].decode("utf-8", errors="replace").splitlines():
                    if line.strip():
                        rec = replica_record(line, source, min(now, written), replica, dep)
                        rec["model_id"] = model
                        records.append(rec)
        self._writer.write(records)
        if offsets != self._offsets:
            self._offsets = offsets
            self._save_offsets()
        return len(records)

    def _model(self, deployment_id: str) -> str | None:
        if deployment_id not in self._models:
            try:
                self._models[deployment_id] = self._model_of(deployment_id)
            except Exception:
                return None  # not in the store (yet, or any more): asked again next time
        return self._models[deployment_id]

    # -- offsets ---------------------------------------------------------------------------
    def _load_offsets(self) -> dict[str, _Place]:
        try:
            raw = json.loads(self._state_path.read_text())
            return {k: _Place(int(v[0]), int(v[1]), base64.b64decode(v[2])) for k, v in raw.items()}
        except (FileNotFoundError, ValueError, IndexError, TypeError):
            return {}

    def _save_offsets(self) -> None:
        self.settings.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self._state_path.with_suffix(".tmp")
        state = {
            k: [p.ino, p.offset, base64.b64encode(p.tail).decode()]
            for k, p in self._offsets.items()
        }
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self._state_path)


@dataclass(frozen=True)
class _Place:
    """Where reading a file got to: its inode, the offset, and the bytes before it."""

    ino: int
    offset: int
    tail: bytes


def _resume(f: BinaryIO, last: _Place | None) -> _Place:
    """Where to go on reading ``f``. Its inode and size as last seen: at the offset. A
    file that is new or shorter (the build log is replaced by its own tail when it grows
    large): after the bytes last read, found in it again; from its start if they are not."""
    st = os.fstat(f.fileno())
    if last is None:
        return _Place(st.st_ino, 0, b"")
    if last.ino == st.st_ino and st.st_size >= last.offset:
        return last
    if not last.tail:
        return _Place(st.st_ino, 0, b"")
    head = f.read(_SEARCH_LIMIT)
    at = head.rfind(last.tail)
    offset = at + len(last.tail) if at >= 0 else 0
    return _Place(st.st_ino, offset, last.tail if at >= 0 else b"")
