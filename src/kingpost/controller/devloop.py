"""The development deployment's live reload: a new upload of its project, applied.

``kingpost watch`` uploads the project whenever a file changes and asks for it to be
applied (:func:`apply_project`). What changed decides how:

- nothing: nothing happens;
- model code or data (and config fields nothing is built from, e.g. ``model_metadata``):
  the engine patches the files into each running replica and reloads it in place
  (:meth:`~kingpost.engines.base.Engine.reload`), keeping its process and environment; a
  reload that fails leaves the replica on its old files and code;
- anything a replica is prepared from (requirements, system packages, ``docker_server``,
  ``base_image``, weights, the Python environment): a *swap*. The deployment gets the new
  project and a new activation; the controller prepares it again and starts a replica of
  the new generation, and the old one serves until that is ready
  (``Want.replace_older``). A swap that fails puts the old project back.

The deployment's recorded project is always the one its replicas run, so a restart (of a
replica or of the control plane) starts the last good code.
"""

from __future__ import annotations

import functools
import hashlib
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from kingpost.engines import Engine, ReplicaPhase
from kingpost.store import DeploymentStatus, DeploymentView, Store

if TYPE_CHECKING:
    from kingpost.controller.loop import Controller

__all__ = ["Applied", "apply_project", "diff_projects", "swap_reason"]

RELOADABLE_KEYS = frozenset({"model_metadata", "description", "model_name"})
"""config.yaml keys whose change a reload in place takes (nothing is built from them)."""
SWAP_GRACE_S = 120.0
"""How long a swap's new replica may take to become ready once prepared, beyond the
build timeout, before the swap is given up."""


@dataclass(frozen=True)
class Applied:
    """What applying a new project to the development deployment did."""

    kind: Literal["unchanged", "reload", "swap", "recorded"]
    """``recorded``: the deployment is scaled to zero; the next request starts it on the
    new files (nothing runs that could be reloaded or swapped)."""
    ok: bool
    deployment: DeploymentView
    changed: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    why: str = ""
    """For a swap: what needs a new replica."""
    took_s: float = 0.0
    error: str = ""
    traceback: str = ""
    """The model's traceback, or the last lines of the new replica's output."""
    replicas: tuple[str, ...] = field(default=())
    """The replicas that now serve the new files (reloaded, or the swap's new one)."""


@functools.lru_cache(maxsize=32)
def _digests(root: Path) -> dict[str, str]:
    """Each file's sha256. Cached: an upload's directory is named by its content and never
    changes (the one a deployment runs is hashed again at each change otherwise)."""
    out: dict[str, str] = {}
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def diff_projects(old: Path, new: Path) -> tuple[list[str], list[str]]:
    """Files added or changed in ``new``, and files of ``old`` that ``new`` lacks."""
    before, after = _digests(old), _digests(new)
    changed = sorted(rel for rel, digest in after.items() if before.get(rel) != digest)
    removed = sorted(rel for rel in before if rel not in after)
    return changed, removed


def swap_reason(
    old_config: Mapping[str, Any],
    new_config: Mapping[str, Any],
    old_environment: str | None,
    new_environment: str | None,
) -> str:
    """Why the new project needs a new replica ("" when a reload in place takes it):
    a config key other than :data:`RELOADABLE_KEYS` changed, or the Python environment
    (requirements, their files, the Python version) did."""
    keys = sorted(
        k
        for k in set(old_config) | set(new_config)
        if k not in RELOADABLE_KEYS and old_config.get(k) != new_config.get(k)
    )
    if keys:
        return f"config.yaml changed: {', '.join(keys)}"
    if old_environment != new_environment:
        return "the Python environment changed (requirements)"
    return ""


def apply_project(
    controller: Controller,
    store: Store,
    dep: DeploymentView,
    project_hash: str,
    config: Mapping[str, Any],
) -> Applied:
    """Apply an uploaded, validated project (``config``: its config.yaml document) to the
    development deployment ``dep``: reload in place, or swap (see the module docstring).
    Blocks until the replicas serve the new project, or it failed; one application per
    deployment at a time (two watchers of one model take turns)."""
    with _lock_for(dep.id):
        dep = store.get_deployment(dep.id)  # as the last application left it
        return _apply(controller, store, dep, project_hash, config)


_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def _lock_for(deployment_id: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(deployment_id, threading.Lock())


def _apply(
    controller: Controller,
    store: Store,
    dep: DeploymentView,
    project_hash: str,
    config: Mapping[str, Any],
) -> Applied:
    started = time.perf_counter()
    projects = controller.settings.projects_dir
    old_dir, new_dir = projects / dep.project_hash, projects / project_hash
    changed, removed = diff_projects(old_dir, new_dir)
    if not changed and not removed:
        return Applied("unchanged", True, dep)
    why = swap_reason(
        dep.config, config, _environment(controller, dep, old_dir),
        _environment(controller, dep, new_dir),
    )  # fmt: skip
    engine = controller.engine(dep.engine)
    if _at_zero(controller, dep, engine):
        # Idle development deployments scale to zero (min_replica 0): the files are its
        # project now, and the wake that the next request causes starts a replica on them.
        # A new activation: a replica a concurrent wake started on the old files is
        # replaced, so what is recorded stays what its replicas run.
        dep = store.set_development_project(dep.id, project_hash, config, dep.activation + 1)
        return Applied(
            "recorded", True, dep, tuple(changed), tuple(removed),
            "scaled to zero: the next request starts it on these files",
            time.perf_counter() - started,
        )  # fmt: skip
    if not why:
        ready = [
            r.replica_id
            for r in engine.poll()
            if r.deployment_id == dep.id
            and r.phase == ReplicaPhase.READY
            and r.generation == dep.activation  # not an older one a swap replaces
        ]
        results = [engine.reload(rid, new_dir, changed, removed) for rid in ready]
        if ready and all(r is not None for r in results):
            failed = next((r for r in results if r is not None and not r.ok), None)
            took = time.perf_counter() - started
            if failed is not None:
                return Applied("reload", False, dep, tuple(changed), tuple(removed), "", took,
                               failed.error, failed.traceback)  # fmt: skip
            dep = store.set_development_project(dep.id, project_hash, config, dep.activation)
            return Applied("reload", True, dep, tuple(changed), tuple(removed), "", took,
                           replicas=tuple(ready))  # fmt: skip
        why = "no replica could be reloaded in place (none ready, or the engine cannot)"
    return _swap(controller, store, dep, project_hash, config, (changed, removed), why, started)


def _at_zero(controller: Controller, dep: DeploymentView, engine: Engine) -> bool:
    """Scaled to zero: no replica of it runs but those draining (out of the table and
    about to stop, so not worth a reload)."""
    if dep.status != DeploymentStatus.SCALED_TO_ZERO:
        return False
    return not any(
        r.deployment_id == dep.id
        and r.phase != ReplicaPhase.STOPPED
        and not controller.draining(r.replica_id)
        for r in engine.poll()
    )


def _environment(controller: Controller, dep: DeploymentView, app_dir: Path) -> str | None:
    from kingpost.config import load_config

    try:
        config = load_config(app_dir, engine=dep.engine).config
        return controller.engine(dep.engine).swap_inputs(config, app_dir)
    except Exception:  # the old project of a deployment whose config no longer loads
        return None


SWAP_WAKE_S = 2.0
"""How often a swap in progress renews its demand on the autoscaler."""


def _swap(
    controller: Controller,
    store: Store,
    dep: DeploymentView,
    project_hash: str,
    config: Mapping[str, Any],
    diff: tuple[list[str], list[str]],
    why: str,
    started: float,
) -> Applied:
    changed, removed = (tuple(d) for d in diff)
    generation = dep.activation + 1
    new = store.set_development_project(dep.id, project_hash, config, generation)
    controller.builds.prepare_again(dep.id)
    engine = controller.engine(dep.engine)
    deadline = time.monotonic() + controller.settings.build_timeout + SWAP_GRACE_S
    error, output = "the new replica did not become ready in time", ""
    woken = 0.0
    while time.monotonic() < deadline:
        if time.monotonic() - woken >= SWAP_WAKE_S:
            # A swap is demand: an idle development deployment (min_replica 0) must not
            # be at, or go to, zero while its new replica is awaited.
            controller.wake_deployment(dep.id)
            woken = time.monotonic()
        failure = controller.builds.build_failure(dep.id)
        if failure is not None:
            error = f"preparing the new project failed: {failure}"
            break
        mine = [
            r for r in engine.poll() if r.deployment_id == dep.id and r.generation >= generation
        ]
        ids = tuple(r.replica_id for r in mine if r.phase == ReplicaPhase.READY)
        routed = controller.routing.routed(dep.id)
        if ids and routed and routed <= set(ids):  # the table routes to the new ones alone
            took = time.perf_counter() - started
            return Applied("swap", True, new, changed, removed, why, took, replicas=ids)
        failed = [r for r in mine if r.phase == ReplicaPhase.FAILED]
        if failed:
            error, output = "the new replica failed", failed[0].message
            break
        time.sleep(0.2)
    # Back to the project the old replica runs; the new generation's replicas go.
    for r in engine.poll():
        if r.deployment_id == dep.id and r.generation >= generation:
            engine.stop(r.replica_id)
    back = store.set_development_project(dep.id, dep.project_hash, dep.config, dep.activation)
    controller.builds.prepare_again(dep.id)
    took = time.perf_counter() - started
    return Applied("swap", False, back, changed, removed, why, took, error, output)
