"""Disk housekeeping: what the home keeps for deployments that no longer need it.

Two kinds of leftovers grow without bound otherwise:

- ``{home}/projects/{sha}``: every uploaded project, unpacked. One is needed while a
  deployment that is not deleted was pushed from it. An upload that no push followed (the
  push failed its checks, the client died) is removed too, once older than
  :data:`UPLOAD_GRACE_S`, so a push that is just between its upload and its ``POST /push``
  never loses its project. Spool files of uploads that died are removed after the same
  grace.
- ``{home}/replicas/{deployment}-{suffix}``: one working copy and log per replica start.
  Those of deleted deployments go; a live deployment keeps the directories of its running
  replicas and the :data:`KEEP_STOPPED` newest stopped ones (their logs are what
  ``kingpost logs`` shows of past crashes). None written to in the last
  :data:`REPLICA_GRACE_S` is touched (a stopped replica may still be draining).

:func:`plan_collection` decides from plain inputs (pure, table-tested);
:func:`collect_disk` applies it. Python environments and weights have collectors of their
own (``envs/gc.py``, the weights manager), which ``kingpost gc`` runs too.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from kingpost._disk import tree_size

__all__ = [
    "KEEP_STOPPED",
    "REPLICA_GRACE_S",
    "UPLOAD_GRACE_S",
    "DiskEntry",
    "DiskReport",
    "collect_disk",
    "plan_collection",
    "scan",
]

UPLOAD_GRACE_S = 3600.0
"""How long an uploaded project no deployment uses is kept (a push may be under way)."""
KEEP_STOPPED = 3
"""Stopped replicas' directories kept per live deployment, newest first."""
REPLICA_GRACE_S = 300.0
"""A replica directory written to (its log) this recently is kept whatever else holds: its
process may still be draining after a stop."""


@dataclass(frozen=True)
class DiskEntry:
    kind: str
    """``project``, ``upload`` (a spool or unpack temp) or ``replica``."""
    name: str
    mtime: float


@dataclass(frozen=True)
class DiskReport:
    removed: tuple[str, ...] = ()
    """``kind/name`` of each removed entry."""
    removed_bytes: int = 0
    kept: int = 0
    errors: tuple[str, ...] = field(default_factory=tuple)


def plan_collection(
    entries: Iterable[DiskEntry],
    *,
    projects_in_use: Collection[str],
    live_deployments: Collection[str],
    running_replicas: Collection[str],
    now: float,
    grace_s: float = UPLOAD_GRACE_S,
    replica_grace_s: float = REPLICA_GRACE_S,
    keep_stopped: int = KEEP_STOPPED,
) -> list[DiskEntry]:
    """The entries to remove."""
    remove: list[DiskEntry] = []
    stopped: dict[str, list[DiskEntry]] = {}
    for entry in entries:
        if entry.kind in ("project", "upload"):
            if entry.name not in projects_in_use and now - entry.mtime > grace_s:
                remove.append(entry)
        elif entry.kind == "replica":
            if entry.name in running_replicas or now - entry.mtime <= replica_grace_s:
                continue
            deployment = _deployment_of(entry.name, live_deployments)
            if deployment is None:
                remove.append(entry)
            else:
                stopped.setdefault(deployment, []).append(entry)
    for entries_of in stopped.values():
        entries_of.sort(key=lambda e: e.mtime, reverse=True)
        remove.extend(entries_of[keep_stopped:])
    return remove


def _deployment_of(replica_dir: str, live: Collection[str]) -> str | None:
    """The live deployment a replica directory (``{deployment_id}-{suffix}``) belongs to."""
    deployment, sep, _ = replica_dir.rpartition("-")
    return deployment if sep and deployment in live else None


def scan(projects_dir: Path, replicas_dir: Path) -> list[DiskEntry]:
    out: list[DiskEntry] = []
    for kind_dir, kind in ((projects_dir, "project"), (replicas_dir, "replica")):
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(kind_dir):
                try:
                    mtime = entry.stat(follow_symlinks=False).st_mtime
                    if kind == "replica":  # its last output, not only its creation
                        log_file = Path(entry.path) / "output.log"
                        with contextlib.suppress(FileNotFoundError):
                            mtime = max(mtime, log_file.stat().st_mtime)
                except FileNotFoundError:
                    continue
                hidden = entry.name.startswith(".") or ".tmp-" in entry.name
                if hidden and kind == "replica":
                    continue  # nothing Kingpost makes: not its to remove
                out.append(DiskEntry("upload" if hidden else kind, entry.name, mtime))
    return out


def collect_disk(
    projects_dir: Path,
    replicas_dir: Path,
    *,
    projects_in_use: Collection[str],
    live_deployments: Collection[str],
    running_replicas: Collection[str],
    now: float,
) -> DiskReport:
    entries = scan(projects_dir, replicas_dir)
    doomed = plan_collection(
        entries,
        projects_in_use=projects_in_use,
        live_deployments=live_deployments,
        running_replicas=running_replicas,
        now=now,
    )
    removed: list[str] = []
    errors: list[str] = []
    removed_bytes = 0
    for entry in doomed:
        base = replicas_dir if entry.kind == "replica" else projects_dir
        path = base / entry.name
        size = tree_size(path)
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            errors.append(f"{entry.kind}/{entry.name}: {exc}")
            continue
        removed.append(f"{entry.kind}/{entry.name}")
        removed_bytes += size
    return DiskReport(tuple(removed), removed_bytes, len(entries) - len(removed), tuple(errors))
