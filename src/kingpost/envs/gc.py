"""The Python environments under ``{home}/envs``: listing them, removing unused ones.

An environment is a directory named by the hash of its inputs (see
:mod:`kingpost.envs.builder`); deployments with the same inputs share it. The
control plane knows which hashes its deployments use (deleted ones excluded,
inactive ones included, so re-activating one needs no rebuild) and passes them
as ``keep``. Everything else goes, each under the lock its builds take, so a
build in progress is never removed under it; and an environment whose ready
marker was written or touched (a reuse) after the collection began is kept, for
a deployment pushed meanwhile may just have built or picked it.

Base environments (:mod:`kingpost.envs.base`) in the default place, ``{envs}/_base``,
are collected after: one goes when no environment left refers to it (their ready
markers name their base), it was not used since the collection began, and no
environment is being built (a build in progress has no marker yet to name its base).
Base environments elsewhere (``KINGPOST_BASE_ENVS_DIR``, which other homes may share)
are never removed by a collection; delete them by hand.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from kingpost._disk import tree_size
from kingpost._filelock import locked
from kingpost.envs.base import BASE_MARKER
from kingpost.envs.builder import BASE_DIR, READY_MARKER

__all__ = ["GcReport", "VenvInfo", "collect", "list_environments"]

_HASH = re.compile(r"[0-9a-f]{24}")


@dataclass(frozen=True)
class VenvInfo:
    hash: str
    python: str
    requirements: tuple[str, ...]
    packages: tuple[str, ...]
    """Every installed package as ``name==version``, as resolved when it was built (empty
    for an environment built before Kingpost recorded them)."""
    custom_server: bool
    ready: bool
    """False for a build in progress, or one that died (the next build of it redoes it)."""
    size_bytes: int
    last_used: datetime | None
    """When it was last built or reused for a deployment."""


@dataclass(frozen=True)
class GcReport:
    removed: tuple[str, ...]
    removed_bytes: int
    kept: int


def _environment_dirs(envs_dir: Path) -> Iterator[Path]:
    with contextlib.suppress(FileNotFoundError):
        for entry in sorted(os.scandir(envs_dir), key=lambda e: e.name):
            if _HASH.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False):
                yield Path(entry.path)


def list_environments(envs_dir: Path) -> list[VenvInfo]:
    out = []
    for path in _environment_dirs(envs_dir):
        marker_path = path / READY_MARKER
        try:
            marker = json.loads(marker_path.read_text())
            used: datetime | None = datetime.fromtimestamp(marker_path.stat().st_mtime, UTC)
        except (OSError, ValueError):
            marker, used = {}, None
        out.append(
            VenvInfo(
                hash=path.name,
                python=str(marker.get("python", "")),
                requirements=tuple(marker.get("requirements", ())),
                packages=tuple(marker.get("packages", ())),
                custom_server=bool(marker.get("custom_server", False)),
                ready=used is not None,
                size_bytes=tree_size(path),
                last_used=used,
            )
        )
    return out


def collect(
    envs_dir: Path, keep: Collection[str], started: float, *, wait: bool = True
) -> GcReport:
    """Remove every environment not in ``keep`` and not used since ``started`` (a
    ``time.time()`` taken before ``keep`` was computed). ``wait``: for a build of one in
    progress to end (else it is kept, and looked at by the next collection)."""
    removed: list[str] = []
    removed_bytes = kept = 0
    for path in _environment_dirs(envs_dir):
        if path.name in keep:
            kept += 1
            continue
        with locked(envs_dir / f".{path.name}.lock", wait=wait) as held:  # a build of it holds it
            if not held:
                kept += 1
                continue
            try:
                if (path / READY_MARKER).stat().st_mtime >= started:
                    kept += 1
                    continue
            except FileNotFoundError:
                pass  # a build that died: nothing can use it
            size = tree_size(path)
            # Not ready first: a removal cut short leaves an environment that is built
            # again, not one that looks ready with half its files.
            (path / READY_MARKER).unlink(missing_ok=True)
            shutil.rmtree(path, ignore_errors=True)
        removed.append(path.name)
        removed_bytes += size
    bases_removed, bases_bytes, bases_kept = _collect_bases(envs_dir, started, wait)
    return GcReport(tuple(removed) + bases_removed, removed_bytes + bases_bytes, kept + bases_kept)


def _bases_in_use(envs_dir: Path) -> set[str] | None:
    """The base hashes the environments left name; ``None`` while one is being built."""
    used: set[str] = set()
    for path in _environment_dirs(envs_dir):
        try:
            marker = json.loads((path / READY_MARKER).read_text())
        except FileNotFoundError:
            return None
        except ValueError:
            continue
        if isinstance(marker.get("base"), str):
            used.add(marker["base"])
    return used


def _collect_bases(envs_dir: Path, started: float, wait: bool) -> tuple[tuple[str, ...], int, int]:
    base_dir = envs_dir / BASE_DIR
    bases = list(_environment_dirs(base_dir))
    if not bases:
        return (), 0, 0
    used = _bases_in_use(envs_dir)
    if used is None:
        return (), 0, len(bases)
    removed: list[str] = []
    removed_bytes = kept = 0
    for path in bases:
        if path.name in used:
            kept += 1
            continue
        with locked(base_dir / f".{path.name}.lock", wait=wait) as held:  # a build holds it
            if not held:
                kept += 1
                continue
            try:
                if (path / BASE_MARKER).stat().st_mtime >= started:
                    kept += 1
                    continue
            except FileNotFoundError:
                pass  # a build that died
            size = tree_size(path)
            shutil.rmtree(path, ignore_errors=True)
        removed.append(f"{BASE_DIR}/{path.name}")
        removed_bytes += size
    return tuple(removed), removed_bytes, kept
