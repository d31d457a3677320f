"""What a Ray node keeps for the replicas it runs, and when it lets go of it.

A node's directory (``{ray_node_dir}/{scope}/{node}/``) caches, by content hash, what its
replicas were prepared from: unpacked projects (``projects/``), Python environments
(``envs/``), weights (``weights/``: blobs, and a read-only hard-link tree per manifest),
and each replica's own home (``replicas/{replica_id}``). Without collection they would
grow with every deployment the node ever ran.

Each replica claims what it uses before it uses it: a file ``uses/{replica_id}.json``
naming its project, environment, weights trees and blobs, and the process that holds
the claim (pid and start time, so a pid the kernel reused later is not mistaken for
it). A claim is released when the replica stops; one whose process is gone (its Ray
worker was killed) is stale and dropped. Both mark what the claim named as used at that
moment, so :meth:`NodeCache.collect`, which removes what no live claim names and nobody
used for ``keep_s`` seconds, counts the keep period from the replica's end: a deployment
scaled to zero and woken within it finds its node ready. A weights blob goes once no tree
links to it (its link count is 1). Whatever goes is first renamed out of the way
(``.trash-…``), so a removal cut short never leaves half an entry that looks whole.

Ray gives a node a new id each time its raylet starts, so a machine's earlier node
directories are never used again: :meth:`NodeCache.sweep_dead` removes the directories
of nodes the cluster no longer lists (after stopping any replica recorded there).

The home of a replica no live claim names goes at once, and first any replica process the
process engine recorded there that still runs is stopped: a Ray worker that is killed
leaves its children running, and Ray may restart its actor on another node.

Claims and collections take one lock per node directory; environments are removed
under the lock their builds take (:func:`kingpost.envs.gc.collect`, which unlinks an
environment's ready marker before the rest, so a removal cut short leaves one that is
built again, not one that looks ready); one being built is left for a later collection
rather than waited for under the node's lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from kingpost._disk import tree_size
from kingpost._filelock import locked
from kingpost.engines._records import records_dir, stop_recorded
from kingpost.gateway_process import process_alive, start_ticks

__all__ = ["CacheReport", "Claim", "NodeCache"]

STALE_WORK_S = 3600.0
"""A half-made project (``projects/.{hash}.…``) or a file in ``weights/tmp`` this old was
left by a process that died."""


@dataclass(frozen=True)
class Claim:
    """What one replica on the node uses."""

    project: str = ""
    environment: str | None = None
    manifests: tuple[str, ...] = ()
    blobs: tuple[str, ...] = ()


@dataclass
class CacheReport:
    removed: list[str] = field(default_factory=list)
    """``project/{hash}``, ``environment/{hash}``, ``weights/{manifest}``,
    ``blob/{sha256}``, ``replica/{id}`` (its home), ``process/{id}`` (a replica still
    running when its actor was gone, stopped), ``claim/{id}`` (a stale one)."""
    removed_bytes: int = 0

    def summary(self) -> str:
        kinds: dict[str, int] = {}
        for item in self.removed:
            kind = item.split("/", 1)[0]
            kinds[kind] = kinds.get(kind, 0) + 1
        parts = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
        return f"node cache: removed {parts or 'nothing'} ({self.removed_bytes} bytes)"


class NodeCache:
    """One node directory's claims and collection (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.uses = root / "uses"
        self.projects = root / "projects"
        self.envs = root / "envs"
        self.weights = root / "weights"
        self.replicas = root / "replicas"
        self._lock = root / ".cache.lock"

    def claim(self, replica_id: str, claim: Claim) -> None:
        """Record what ``replica_id``, run by this process, uses (replacing its earlier
        claim); what it names is marked used now."""
        with locked(self._lock):
            self.uses.mkdir(parents=True, exist_ok=True)
            record = {
                "pid": os.getpid(),
                "started": start_ticks(os.getpid()),
                "project": claim.project,
                "environment": claim.environment,
                "manifests": list(claim.manifests),
                "blobs": list(claim.blobs),
            }
            tmp = self.uses / f".{replica_id}.tmp"
            tmp.write_text(json.dumps(record))
            tmp.rename(self.uses / f"{replica_id}.json")
            self._touch(claim)

    def release(self, replica_id: str) -> None:
        """The replica stopped: what it claimed is marked used now (its keep period starts
        here, not at its start) and its claim goes."""
        path = self.uses / f"{replica_id}.json"
        with locked(self._lock):
            claim = _read_claim(path)
            if claim is not None:
                self._touch(claim[1])
            path.unlink(missing_ok=True)

    def _touch(self, claim: Claim) -> None:
        for path in self._paths_of(claim):
            with contextlib.suppress(OSError):
                os.utime(path)

    def live_claims(self) -> dict[str, Claim]:
        """Replica id -> its claim, for claims whose process still runs (the caller holds
        the lock, or accepts a moment's staleness)."""
        out: dict[str, Claim] = {}
        for path in _entries(self.uses):
            read = _read_claim(path) if path.suffix == ".json" else None
            if read is None:
                continue
            (pid, started), claim = read
            if start_ticks(pid) == started and process_alive(pid):
                out[path.stem] = claim
        return out

    def collect(self, keep_s: float, now: float | None = None) -> CacheReport:
        """Remove what no live claim names and was not used in the last ``keep_s``
        seconds; stale claims and the homes of replicas no longer claimed go at once."""
        from kingpost.envs.gc import collect as collect_envs
        from kingpost.weights.blobs import BlobStore, remove_tree

        now = time.time() if now is None else now
        cutoff = now - keep_s
        report = CacheReport()
        with locked(self._lock):
            live = self.live_claims()
            for path in _entries(self.uses):
                if path.suffix == ".json" and path.stem not in live:
                    stale = _read_claim(path)
                    if stale is not None:  # its replica's end: now, as far as we know
                        self._touch(stale[1])
                    path.unlink(missing_ok=True)
                    report.removed.append(f"claim/{path.stem}")
            projects = {c.project for c in live.values()}
            environments = {c.environment for c in live.values() if c.environment}
            manifests = {m for c in live.values() for m in c.manifests}
            blobs = {b for c in live.values() for b in c.blobs}
            for entry in _entries(self.projects):
                if entry.name.startswith("."):  # half made or half removed, long ago
                    if _mtime(entry) < now - STALE_WORK_S:
                        self._remove(entry, f"project/{entry.name}", report)
                elif entry.name not in projects and _mtime(entry) < cutoff:
                    self._remove(entry, f"project/{entry.name}", report)
            if self.envs.is_dir():
                # Not waiting for a build of one (the node's claims wait on this lock).
                envs = collect_envs(self.envs, environments, cutoff, wait=False)
                report.removed += [f"environment/{h}" for h in envs.removed]
                report.removed_bytes += envs.removed_bytes
            for tree in _entries(self.weights / "trees"):
                if tree.name not in manifests and _mtime(tree) < cutoff:
                    trash = _set_aside(tree, self.weights / "tmp")
                    remove_tree(trash)  # its bytes are the blobs', counted as they go
                    report.removed.append(f"weights/{tree.name}")
            if self.weights.is_dir():  # fetches and removals a dead actor left half done
                report.removed_bytes += BlobStore(self.weights).sweep_tmp(now - STALE_WORK_S)
            for blob in _entries(self.weights / "blobs", depth=2):
                try:
                    st = blob.stat()
                except FileNotFoundError:
                    continue
                if st.st_nlink == 1 and blob.name not in blobs and st.st_mtime < cutoff:
                    blob.unlink(missing_ok=True)
                    report.removed.append(f"blob/{blob.name}")
                    report.removed_bytes += st.st_size
            for home in _entries(self.replicas):
                if home.name not in live:
                    # Its actor is gone; a replica it ran may not be (a Ray worker killed
                    # leaves its children running): stopped, as the process engine records.
                    for rid in stop_recorded(records_dir(home / "run")):
                        report.removed.append(f"process/{rid}")
                    self._remove(home, f"replica/{home.name}", report)
        return report

    def sweep_dead(self, alive: Collection[str]) -> CacheReport:
        """Remove the directories of this scope's earlier nodes (siblings of this one)
        whose ids ``alive`` (the node directory names of the nodes the cluster lists now)
        lacks: Ray never gives a node's id again, so nothing will use them. A replica
        still recorded as running there is stopped first."""
        report = CacheReport()
        for node in _entries(self.root.parent):
            if node == self.root or node.name in alive:
                continue
            if node.name.startswith(".") and not node.name.startswith(".trash-"):
                continue  # not a node directory (a removal cut short is one)
            for home in _entries(node / "replicas"):
                for rid in stop_recorded(records_dir(home / "run")):
                    report.removed.append(f"process/{rid}")
            self._remove(node, f"node/{node.name}", report)
        return report

    def _paths_of(self, claim: Claim) -> Iterable[Path]:
        if claim.project:
            yield self.projects / claim.project
        for manifest in claim.manifests:
            yield self.weights / "trees" / manifest
        if claim.environment:
            from kingpost.envs.builder import READY_MARKER

            yield self.envs / claim.environment / READY_MARKER

    @staticmethod
    def _remove(path: Path, name: str, report: CacheReport) -> None:
        size = tree_size(path)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(_set_aside(path, path.parent), ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        report.removed.append(name)
        report.removed_bytes += size


def _set_aside(path: Path, where: Path) -> Path:
    """``path`` renamed into ``where`` under a hidden name, so that no reader takes what
    is left of it for a whole entry if its removal is cut short (what is left goes with
    the next collections: a hidden project, or what ``weights/tmp`` holds, after
    :data:`STALE_WORK_S`; a replica home or a node directory at once)."""
    if path.name.startswith("."):
        return path
    where.mkdir(parents=True, exist_ok=True)
    trash = where / f".trash-{path.name}-{uuid.uuid4().hex[:8]}"
    try:
        path.rename(trash)
    except OSError:
        return path
    return trash


def _read_claim(path: Path) -> tuple[tuple[int, int | None], Claim] | None:
    """A claim file's holder (pid, start ticks) and claim; ``None`` if unreadable."""
    try:
        record = json.loads(path.read_text())
        holder = (int(record["pid"]), record.get("started"))
        claim = Claim(
            str(record.get("project", "")),
            record.get("environment"),
            tuple(str(m) for m in record.get("manifests", ())),
            tuple(str(b) for b in record.get("blobs", ())),
        )
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return holder, claim


def _entries(directory: Path, depth: int = 1) -> list[Path]:
    try:
        found = [directory / name for name in os.listdir(directory)]
    except FileNotFoundError:
        return []
    if depth == 1:
        return found
    return [p for sub in found if sub.is_dir() for p in _entries(sub, depth - 1)]


def _mtime(path: Path) -> float:
    try:
        return path.lstat().st_mtime
    except FileNotFoundError:
        return float("inf")  # gone meanwhile: nothing to remove
