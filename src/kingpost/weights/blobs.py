"""The content-addressed store: blobs by SHA-256, manifests, read-only hard-link trees.

Layout under ``root``::

    blobs/ab/abcdef…        one file per content hash, 0444
    tmp/                    downloads in progress (never visible as blobs)
    manifests/{id}.json     path -> (hash, size) for one (source, revision, patterns)
    trees/{id}/…            hard links into blobs/, files 0444, dirs 0555
    pins/{key}.json         the manifest ids a deployment was pinned to
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from kingpost.errors import WeightsError

__all__ = ["BlobStore", "GcReport", "Manifest", "Partial", "RangeWriter", "remove_tree"]

log = logging.getLogger("kingpost.weights")

CHUNK = 4 * 1024 * 1024
STALE_PARTIAL_S = 24 * 3600
"""Partial downloads untouched this long are removed by :meth:`BlobStore.gc`."""


@dataclass(frozen=True)
class Manifest:
    id: str
    source: str
    revision: str
    files: dict[str, tuple[str, int]]
    """Relative path -> (sha256, size)."""

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files.values())


@dataclass(frozen=True)
class GcReport:
    removed_blobs: int
    removed_bytes: int
    kept_bytes: int


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        for sub in ("blobs", "tmp", "manifests", "trees", "pins"):
            (root / sub).mkdir(parents=True, exist_ok=True)

    def blob_path(self, digest: str) -> Path:
        return self.root / "blobs" / digest[:2] / digest

    def has(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    @contextmanager
    def writer(self) -> Iterator[tuple[IO[bytes], Path]]:
        """A temp file to download into; :meth:`commit` moves it into place."""
        path = self.root / "tmp" / uuid.uuid4().hex
        with path.open("wb") as fh:
            try:
                yield fh, path
            except BaseException:
                fh.close()
                path.unlink(missing_ok=True)
                raise

    def partial(self, key: str, size: int) -> Partial:
        """The resumable download of one file, identified by ``key`` across restarts."""
        return Partial(self.root / "tmp", key, size)

    def commit(
        self, tmp: Path, size: int, digest: str | None = None, *, md5: str | None = None
    ) -> str:
        """Verify ``tmp`` (size; SHA-256 and MD5 when given) and make it the blob of its
        SHA-256; returns that hash."""
        actual_size = tmp.stat().st_size
        if actual_size != size:
            tmp.unlink(missing_ok=True)
            raise WeightsError(f"size mismatch: expected {size} bytes, got {actual_size}")
        h = hashlib.sha256()
        m = hashlib.md5(usedforsecurity=False) if md5 else None
        with tmp.open("rb") as fh:
            while chunk := fh.read(CHUNK):
                h.update(chunk)
                if m is not None:
                    m.update(chunk)
        actual = h.hexdigest()
        for name, want, got in (
            ("sha256", digest, actual),
            ("md5", md5, m.hexdigest() if m else None),
        ):
            if want is not None and want != got:
                tmp.unlink(missing_ok=True)
                raise WeightsError(f"{name} mismatch: expected {want}, got {got}")
        final = self.blob_path(actual)
        final.parent.mkdir(exist_ok=True)
        os.chmod(tmp, 0o444)
        os.utime(tmp)  # stored now, even if its bytes came from before a restart (gc)
        os.replace(tmp, final)
        return actual

    # -- manifests and trees ------------------------------------------------------------
    def save_manifest(self, m: Manifest) -> None:
        data = {"source": m.source, "revision": m.revision, "files": m.files}
        self._write_atomic(self.root / "manifests" / f"{m.id}.json", json.dumps(data))

    def manifest(self, manifest_id: str) -> Manifest | None:
        """The saved manifest, or None when there is none or it cannot be read (a crash
        tore it before writes were atomic): its mirror then resolves the source again."""
        path = self.root / "manifests" / f"{manifest_id}.json"
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
            files = {str(k): (str(v[0]), int(v[1])) for k, v in data["files"].items()}
            return Manifest(manifest_id, str(data["source"]), str(data["revision"]), files)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            log.warning("ignoring unreadable weights manifest %s (resolving again): %s", path, exc)
            return None

    def manifests(self) -> list[Manifest]:
        out = [self.manifest(p.stem) for p in sorted((self.root / "manifests").glob("*.json"))]
        return [m for m in out if m is not None]

    def tree(self, m: Manifest) -> Path:
        """The read-only hard-link tree of a manifest, built once."""
        final = self.root / "trees" / m.id
        if final.exists():
            return final
        tmp = self.root / "tmp" / f"tree-{uuid.uuid4().hex}"
        try:
            for rel, (digest, _) in m.files.items():
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(self.blob_path(digest), target)
                except FileNotFoundError:
                    raise WeightsError(
                        f"{m.source}: {rel}: its mirrored content (sha256 {digest}) is "
                        f"missing from the weights store {self.root}"
                    ) from None
            tmp.mkdir(exist_ok=True)
            for dirpath, _, _ in os.walk(tmp, topdown=False):
                os.chmod(dirpath, 0o555)
        except (OSError, WeightsError):
            remove_tree(tmp)
            raise
        try:
            os.rename(tmp, final)
        except OSError:
            remove_tree(tmp)
            if not final.is_dir():
                raise
            # built by a concurrent caller: Linux says ENOTEMPTY (not EEXIST) for a directory
        return final

    # -- pins --------------------------------------------------------------------------
    def pin(self, key: str, manifest_ids: Iterable[str]) -> None:
        self._write_atomic(self.root / "pins" / f"{key}.json", json.dumps(list(manifest_ids)))

    def unpin(self, key: str) -> None:
        """Forget what ``key`` was pinned to: its next mirror resolves its sources afresh."""
        (self.root / "pins" / f"{key}.json").unlink(missing_ok=True)

    def pinned(self, key: str) -> list[str] | None:
        """The manifest ids ``key`` is pinned to; None when unpinned or the pin cannot be
        read (torn by a crash): the mirror resolves again rather than fail for good."""
        path = self.root / "pins" / f"{key}.json"
        if not path.exists():
            return None
        try:
            ids = json.loads(path.read_text())
        except ValueError as exc:
            log.warning("ignoring unreadable weights pin %s (resolving again): %s", path, exc)
            return None
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            log.warning("ignoring weights pin %s: not a list of manifest ids", path)
            return None
        return ids

    def _write_atomic(self, path: Path, text: str) -> None:
        """Write ``path`` whole or not at all, durably: a unique temp file in ``tmp/`` (two
        writers never share one; a crash leaves it to :meth:`sweep_tmp`), fsynced, renamed
        over ``path``, and the directory fsynced so the rename survives a power loss."""
        tmp = self.root / "tmp" / f"{path.parent.name}-{uuid.uuid4().hex}.json"
        try:
            with tmp.open("w") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- garbage collection ------------------------------------------------------------
    def gc(
        self,
        budget_bytes: int | None = None,
        keep_since: float | None = None,
        keep: Iterable[str] = (),
    ) -> GcReport:
        """Remove blobs no manifest references; with ``budget_bytes``, keep the newest
        unreferenced ones while everything fits in it. Referenced blobs always stay, and
        so do the blobs in ``keep`` and those stored at or after ``keep_since`` (epoch
        seconds): a mirror still running references them once it saves its manifest."""
        referenced = {d for m in self.manifests() for d, _ in m.files.values()}
        referenced |= set(keep)
        blobs = [(p, p.stat()) for p in (self.root / "blobs").glob("*/*")]
        if keep_since is not None:
            referenced |= {p.name for p, st in blobs if st.st_mtime >= keep_since}
        kept = sum(st.st_size for p, st in blobs if p.name in referenced)
        removed = removed_bytes = 0
        unused = sorted(
            ((p, st) for p, st in blobs if p.name not in referenced),
            key=lambda item: item[1].st_mtime,
            reverse=True,  # the most recently written unused blobs are kept first
        )
        for blob, st in unused:
            if budget_bytes is not None and kept + st.st_size <= budget_bytes:
                kept += st.st_size
                continue
            blob.unlink()
            removed, removed_bytes = removed + 1, removed_bytes + st.st_size
        removed_bytes += self.sweep_tmp(time.time() - STALE_PARTIAL_S)
        return GcReport(removed, removed_bytes, kept)

    def sweep_tmp(self, before: float) -> int:
        """Remove what ``tmp/`` holds from before ``before`` (epoch seconds): downloads and
        trees abandoned by a process that died. Returns the bytes of the files removed."""
        removed_bytes = 0
        for leftover in (self.root / "tmp").iterdir():
            st = leftover.lstat()
            if st.st_mtime < before:
                removed_bytes += st.st_size if leftover.is_file() else 0
                if leftover.is_dir():
                    remove_tree(leftover)
                else:
                    leftover.unlink(missing_ok=True)
        return removed_bytes


class Partial:
    """One file downloading into ``tmp/{key}.part`` by byte ranges, in any order.

    A range is recorded in ``tmp/{key}.ranges`` only after its bytes reached the disk,
    so a mirror restarted after a crash fetches just the ranges not listed there.
    """

    def __init__(self, tmp_dir: Path, key: str, size: int) -> None:
        self.path = tmp_dir / f"{key}.part"
        self._log = tmp_dir / f"{key}.ranges"
        self.size = size
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if os.fstat(fd).st_size != size:
                os.ftruncate(fd, size)  # sparse; ranges fill it
                self._log.unlink(missing_ok=True)
        finally:
            os.close(fd)

    def done(self) -> set[tuple[int, int]]:
        """The ranges ``(start, end)`` already on disk."""
        out = set()
        if self._log.exists():
            for line in self._log.read_text().splitlines():
                a, _, b = line.partition(" ")
                if a.isdigit() and b.isdigit():  # a torn last line is ignored
                    out.add((int(a), int(b)))
        return out

    @contextmanager
    def writer(self, start: int) -> Iterator[RangeWriter]:
        fd = os.open(self.path, os.O_WRONLY)
        try:
            yield RangeWriter(fd, start)
        finally:
            os.close(fd)

    def record(self, w: RangeWriter, start: int, end: int) -> None:
        """Note ``[start, end)`` as done, once ``w`` (which wrote it) is on disk."""
        os.fdatasync(w.fd)
        with self._log.open("a") as log:
            log.write(f"{start} {end}\n")

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)
        self._log.unlink(missing_ok=True)

    def finished(self) -> None:
        """After :meth:`BlobStore.commit` moved the file away."""
        self._log.unlink(missing_ok=True)


class RangeWriter:
    """A file-like ``write`` at an advancing offset (``pwrite``; several may share a file)."""

    def __init__(self, fd: int, offset: int) -> None:
        self.fd, self.offset = fd, offset

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, self.offset)
            self.offset += n
            view = view[n:]
        return len(data)


def remove_tree(path: Path) -> None:
    """Remove a tree, read-only directories (a mount tree's) included."""
    if not path.exists():
        return
    for dirpath, _, _ in os.walk(path):
        os.chmod(dirpath, 0o755)
    shutil.rmtree(path, ignore_errors=True)
