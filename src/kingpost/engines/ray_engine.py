"""The Ray engine: each replica a named, detached Ray actor on some node of a cluster.

The control plane joins the cluster named by ``KINGPOST_RAY_ADDRESS`` (``auto``: a node on
this machine; ``host:port``: a head's GCS, with a Ray node on this machine for the driver;
``ray://host:port``: Ray Client). :meth:`RayEngine.start` checks the cluster can hold one
replica (``resources.cpu``, ``memory``, ``accelerator`` count as Ray's CPU, memory and GPU),
then creates the actor (``engines/_ray_node.py``) in namespace ``kingpost`` under a name
made of this installation's scope, the deployment and the replica, with
``lifetime="detached"`` and unlimited restarts: a node that dies takes its actors down and
Ray starts them again on another node with capacity. The actor prepares and runs the
replica on its node and reports its phase and address (the node's IP and a forwarded port);
this engine asks each actor for its status every :data:`POLL_S` without blocking (one
call in flight per replica) and keeps the answer in the core's table, so ``poll()`` is the
core's. A control plane that starts finds this installation's actors by name and adopts
them (``keeps_replicas``). Secrets are sealed with a per-replica key derived from the
installation's secret key; the key travels only in an ``unlock`` call, which a restarted
actor asks for again (see ``_ray_node``).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

from kingpost.engines._core import ReplicaEngine, Tracked
from kingpost.engines.base import (
    Endpoint,
    LogLine,
    Prepared,
    Reload,
    ReplicaPhase,
    ReplicaSpec,
    scope_of,
)
from kingpost.errors import EngineError
from kingpost.settings import Settings

__all__ = ["NAMESPACE", "RayEngine", "actor_name", "replica_resources"]

log = logging.getLogger(__name__)

NAMESPACE = "kingpost"
POLL_S = 0.25
"""How often each replica's actor is asked for its status."""
UNREACHABLE_S = 3.0
"""An actor that has not answered a status call for this long is out of traffic."""
ROOM_CHECK_S = 2.0
"""How long a new actor may wait for a node before its replica says why it waits (and how
often that is checked again)."""
ARCHIVES_KEPT = 16
"""Project archives kept in memory, the most recently used (each project is packed once
while it is among them)."""
RELOAD_SLACK_S = 30.0
"""A reload's answer may take this long beyond the build timeout (the actor's own wait)."""

_NODE_SETTINGS = (
    "model_env",
    "base_envs_dir",
    "truss_version",
    "isolation",
    "netns",
    "stop_grace_period",
    "build_timeout",
    "process_pids_limit",
)
"""The control plane's settings a node's process engine runs its replica under."""


def actor_name(scope: str, deployment_id: str, replica_id: str) -> str:
    return f"kp:{scope}:{deployment_id}:{replica_id}"


def replica_resources(spec: ReplicaSpec) -> dict[str, float]:
    """What one replica asks of Ray: ``CPU``, ``memory`` (bytes), ``GPU``."""
    if spec.config is None:
        return {"CPU": 1.0}
    res = spec.config.resources
    out = {"CPU": (res.cpu_millicores or 1000) / 1000}
    if res.memory_bytes:
        out["memory"] = float(res.memory_bytes)
    if res.accelerator is not None:
        out["GPU"] = float(res.accelerator.count)
    return out


def unplaceable(asks: dict[str, float], nodes: list[dict[str, Any]]) -> str | None:
    """Why no live node can ever hold a replica asking ``asks``, or None when one can."""
    alive = [n for n in nodes if n.get("Alive")]
    for node in alive:
        have = node.get("Resources", {})
        if all(have.get(k, 0.0) >= v for k, v in asks.items()):
            return None
    largest = {k: max((n.get("Resources", {}).get(k, 0.0) for n in alive), default=0.0)
               for k in asks}  # fmt: skip
    words = {"CPU": "resources.cpu", "memory": "resources.memory", "GPU": "resources.accelerator"}
    short = [
        f"{words[k]} asks {_amount(k, v)}, the largest node has {_amount(k, largest[k])}"
        for k, v in asks.items()
        if largest[k] < v
    ]
    return (
        f"no node of the Ray cluster ({len(alive)} alive) can hold one replica: "
        + "; ".join(short or ["no node has all of it at once"])
        + ". Add a node with those resources, or lower them in config.yaml"
    )


def waiting_for_room(asks: dict[str, float], free: list[dict[str, float]]) -> str | None:
    """The message of a replica some node could hold but none has room for now, from what
    it asks and what each live node has free; None when a node has room (Ray is placing
    it: starting its worker process takes a moment)."""
    if any(all(node.get(k, 0.0) >= v for k, v in asks.items()) for node in free):
        return None
    words = {"CPU": "cpu", "memory": "memory", "GPU": "GPUs"}
    asked = ", ".join(f"{words[k]} {_amount(k, v)}" for k, v in asks.items())
    most = ", ".join(
        f"{words[k]} {_amount(k, max((n.get(k, 0.0) for n in free), default=0.0))}" for k in asks
    )
    return (
        f"waiting for room on the Ray cluster: it asks {asked} on one node, and no node has "
        f"that free now (the most free on any node: {most}); it is placed when replicas "
        "elsewhere stop or a node joins"
    )


def _free_per_node() -> list[dict[str, float]]:
    """What each live node has free now. Ray has no public call for it (``ray.
    available_resources()`` sums the cluster, which hides that no one node has room); its
    GCS state does, and if that moves away, the sum stands in for one node."""
    import ray

    try:
        from ray._private.state import state

        return list(state.available_resources_per_node().values())  # type: ignore[no-untyped-call]
    except Exception:  # a Ray without it
        return [ray.available_resources()]  # type: ignore[no-untyped-call]


def _amount(kind: str, value: float) -> str:
    return f"{value / 2**30:.2f}Gi" if kind == "memory" else f"{value:g}"


def _kinds(resources: dict[str, float]) -> dict[str, float]:
    """The resources replicas ask for, of all a node reports."""
    return {k: v for k, v in resources.items() if k in ("CPU", "GPU", "memory")}


def _named_actors(scope: str | None) -> list[str]:
    from ray.util import list_named_actors

    prefix = f"kp:{scope}:" if scope else "kp:"
    return [
        a["name"]
        for a in list_named_actors(all_namespaces=True)
        if a.get("namespace") == NAMESPACE and a["name"].startswith(prefix)
    ]


@dataclass
class _RayReplica(Tracked):
    spec: ReplicaSpec | None
    """None for an actor adopted from an earlier control plane."""
    name: str = ""
    handle: Any = None
    pending: Any = None
    """The status call in flight."""
    asked_at: float = 0.0
    answered_at: float = 0.0
    placed: bool = False
    """Its actor answered once (Ray found it a node)."""
    room_checked_at: float = 0.0
    next_ask: float = 0.0
    unlocking: Any = None
    stop_call: Any = None
    stop_by: float = 0.0
    node_ip: str = ""
    node_id: str = ""
    history: list[str] = field(default_factory=list)
    project: Path | None = None
    """The project it was last reloaded onto (:meth:`RayEngine.reload`): its actor,
    restarted by Ray from what it was created with, gets it with its key."""


class RayEngine(ReplicaEngine[_RayReplica]):
    name: ClassVar[str] = "ray"
    keeps_replicas: ClassVar[bool] = True

    def __init__(self, settings: Settings) -> None:
        try:
            import ray
        except ImportError as exc:
            raise EngineError(
                "engine: the ray engine needs the `ray` package (install kingpost[ray])",
                field="engine",
                value="ray",
            ) from exc
        ray_env_defaults()
        self.settings = settings
        self.scope = scope_of(settings.home)
        self._secret_key = _installation_key(settings)
        self._archives: dict[Path, tuple[bytes, str]] = {}
        self._reloads = settings.run_dir / "ray-reloads"
        """Per replica reloaded in place, the project it runs now (:meth:`reload`)."""
        self._archive_lock = threading.Lock()
        self._source: Any = None
        if not ray.is_initialized():
            try:
                ray.init(
                    address=settings.ray_address,
                    namespace=NAMESPACE,
                    log_to_driver=False,
                    logging_level=logging.WARNING,
                    configure_logging=False,
                )
            except Exception as exc:
                raise EngineError(
                    f"ray engine: cannot join the Ray cluster at KINGPOST_RAY_ADDRESS="
                    f"{settings.ray_address!r}: {exc}. Start one (`ray start --head`) or set "
                    "KINGPOST_RAY_ADDRESS to its address",
                    field="ray_address",
                    value=settings.ray_address,
                ) from exc
        self._track()
        self._adopt()
        self._watch()

    def kept_replicas_hint(self) -> str:
        return (
            f"kill the detached actors named kp:{self.scope}:* in Ray namespace {NAMESPACE} "
            "(ray.kill(ray.get_actor(name, namespace='kingpost')))"
        )

    # -- the Engine interface ------------------------------------------------------------
    def prepare(self, config: Any, app_dir: Path, log: Any) -> Prepared:
        """Nothing here: each node prepares what its replicas run (``_ray_node``)."""
        log("ray engine: the project and its environment are prepared on each node")
        return Prepared()

    def start(self, spec: ReplicaSpec) -> None:
        with self._lock:
            if spec.replica_id in self._replicas:
                return
            self._replicas[spec.replica_id] = _RayReplica(
                spec,
                name=actor_name(self.scope, spec.deployment_id, spec.replica_id),
                replica_id=spec.replica_id,
                deployment_id=spec.deployment_id,
                generation=spec.generation,
                started_at=time.time(),
                message="waiting for Ray to place the replica",
            )

    def reload(
        self, replica_id: str, source: Path, changed: Sequence[str], removed: Sequence[str]
    ) -> Reload | None:
        """The changed files travel to the replica's actor, which patches and reloads its
        replica as the process engine does (:meth:`ReplicaHost.reload`)."""
        with self._lock:
            rep = self._replicas.get(replica_id)
        if rep is None or rep.stopping or rep.handle is None or rep.phase != ReplicaPhase.READY:
            return None
        files = {rel: (source / rel).read_bytes() for rel in changed}
        try:
            call = rep.handle.reload.remote(files, list(removed))
            answer = _get(call, self.settings.build_timeout + RELOAD_SLACK_S)
        except Exception as exc:
            return Reload(False, f"the replica's actor did not answer the reload: {exc}")
        if answer is None:
            return None
        result = Reload(**answer)
        if result.ok:
            rep.project = source
            # Kept on disk too: a restarted control plane that adopts the actor still
            # knows what a restart of it must run.
            self._reloads.mkdir(parents=True, exist_ok=True)
            tmp = self._reloads / f".{replica_id}.tmp"
            tmp.write_text(str(source))
            tmp.replace(self._reloads / replica_id)
        return result

    def _forget_replica(self, rep: _RayReplica) -> None:
        super()._forget_replica(rep)
        (self._reloads / rep.replica_id).unlink(missing_ok=True)

    def logs(self, deployment_id: str, tail: int = 200) -> list[LogLine]:

        with self._lock:
            reps = [r for r in self._replicas.values() if r.deployment_id == deployment_id]
        out: list[LogLine] = []
        for rep in reps:
            lines = list(rep.history)
            if rep.handle is not None:
                with contextlib.suppress(Exception):
                    lines += _get(rep.handle.logs.remote(tail), 5)
            out.extend(LogLine(rep.replica_id, t) for t in lines)
        return out[-tail:]

    def close(self) -> None:
        self._finish_stops(self.settings.stop_grace_period)
        self._probes.shutdown(wait=False, cancel_futures=True)

    def cluster(self) -> list[dict[str, Any]]:
        import ray

        with self._lock:
            placed = [(r.node_id, r.replica_id, r.deployment_id, r.phase.value)
                      for r in self._replicas.values() if not r.stopping]  # fmt: skip
        nodes = []
        for n in ray.nodes():  # type: ignore[no-untyped-call]
            here = [
                {"replica_id": rid, "deployment_id": dep, "phase": phase}
                for node_id, rid, dep, phase in placed
                if node_id == n["NodeID"]
            ]
            nodes.append(
                {
                    "node_id": n["NodeID"],
                    "address": n["NodeManagerAddress"],
                    "alive": bool(n["Alive"]),
                    "resources": _kinds(n.get("Resources", {})),
                    "replicas": here,
                }
            )
        return nodes

    # -- the monitor thread ---------------------------------------------------------------
    def _step(self, rep: _RayReplica, now: float) -> None:
        if rep.stopping:
            self._step_stopping(rep, now)
            return
        if rep.handle is None:
            if rep.phase != ReplicaPhase.FAILED and now >= rep.next_start:
                self._place(rep, now)
            return
        if rep.pending is None:
            if now >= rep.next_ask:
                rep.pending, rep.asked_at = rep.handle.status.remote(), now
            return
        self._collect(rep, now)

    def _place(self, rep: _RayReplica, now: float) -> None:
        import ray

        assert rep.spec is not None
        asks = replica_resources(rep.spec)
        why = unplaceable(asks, ray.nodes())  # type: ignore[no-untyped-call]
        if why is not None:
            rep.phase, rep.message = ReplicaPhase.FAILED, why
            return
        from kingpost.engines._ray_node import HostPlan, ReplicaHost

        try:
            weights = self._node_weights(rep.spec)
        except EngineError as exc:
            rep.phase, rep.message = ReplicaPhase.FAILED, str(exc)
            return
        archive, digest = self._archive(rep.spec.app_dir)
        sealed = _seal(self._replica_key(rep.replica_id), dict(rep.spec.secrets))
        spec = replace(rep.spec, secrets={}, python_executable=None, dynamic_config_dir=None)
        plan = HostPlan(
            spec,
            archive,
            digest,
            sealed,
            str(self.settings.ray_node_dir),
            self.scope,
            {k: getattr(self.settings, k) for k in _NODE_SETTINGS},
            weights,
            self._weights_source() if weights else "",
            self.settings.ray_node_cache_keep,
        )
        actor = ray.remote(ReplicaHost).options(
            name=rep.name,
            namespace=NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            max_restarts=-1,
            max_task_retries=0,
            max_concurrency=8,
            num_cpus=asks["CPU"],
            num_gpus=asks.get("GPU", 0),
            memory=asks.get("memory"),
            scheduling_strategy="SPREAD",
        )
        rep.handle = actor.remote(plan)
        rep.answered_at, rep.room_checked_at = now, now
        rep.phase, rep.message = ReplicaPhase.STARTING, "asked Ray to place it on a node"

    def _collect(self, rep: _RayReplica, now: float) -> None:
        """Take the answer of the status call in flight, if there is one yet."""
        import ray
        from ray.exceptions import ActorDiedError, RayActorError

        done, _ = ray.wait([rep.pending], timeout=0)
        if not done:
            waiting = not rep.placed and now - rep.room_checked_at >= ROOM_CHECK_S
            if waiting and rep.spec is not None:  # (an adopted actor was placed before)
                # No node took it yet: say so, with what it asks and what is free, rather
                # than leave it STARTING in silence (Ray queues it until room appears).
                rep.room_checked_at = now
                why = waiting_for_room(replica_resources(rep.spec), _free_per_node())
                rep.message = why or "asked Ray to place it on a node; its worker is starting"
            if now - rep.answered_at > UNREACHABLE_S and rep.endpoint is not None:
                rep.endpoint = None  # out of traffic until it answers again
                rep.phase = ReplicaPhase.RESTARTING
                rep.message = f"its actor on node {rep.node_ip} does not answer"
            return
        ref, rep.pending, rep.next_ask = rep.pending, None, now + POLL_S
        try:
            st = _get(ref)
        except ActorDiedError as exc:
            rep.handle, rep.endpoint = None, None
            rep.history.append(f"--- kingpost: actor died: {exc}")
            rep.back_off(now, f"its Ray actor died ({str(exc).splitlines()[0]}); starting anew")
            return
        except RayActorError as exc:  # restarting (node lost) or unreachable: ask again
            rep.endpoint = None
            rep.phase = ReplicaPhase.RESTARTING
            rep.message = f"its Ray actor is being restarted: {str(exc).splitlines()[0]}"
            return
        self._apply(rep, st, now)

    def _apply(self, rep: _RayReplica, st: dict[str, Any], now: float) -> None:
        rep.answered_at, rep.placed = now, True
        if st["node_id"] != rep.node_id and rep.node_id:
            rep.history.append(f"--- kingpost: moved from node {rep.node_ip} to {st['node_ip']}")
            rep.restarts += 1
        rep.node_id, rep.node_ip = st["node_id"], st["node_ip"]
        if st["needs_key"] and rep.unlocking is None:
            # An actor Ray restarted after a reload starts on the reloaded project.
            project = None
            if rep.project is not None and rep.project.is_dir():
                project = self._archive(rep.project)
            elif rep.project is not None:
                log.warning("ray engine: %s was reloaded onto %s, which is gone; its actor "
                            "starts on its first project", rep.replica_id, rep.project)  # fmt: skip
            key = self._replica_key(rep.replica_id)
            rep.unlocking = rep.handle.unlock.remote(key, project)
        elif not st["needs_key"]:
            rep.unlocking = None
        was = rep.phase
        rep.phase = ReplicaPhase(st["phase"])
        rep.message = st["message"]
        rep.restarts = max(rep.restarts, int(st["restarts"]))
        rep.endpoint = Endpoint(st["host"], st["port"]) if st["host"] else None
        if rep.phase == ReplicaPhase.READY != was and self.on_ready is not None:
            self.on_ready()

    def _step_stopping(self, rep: _RayReplica, now: float) -> None:
        import ray

        if rep.handle is None:
            self._forget_replica(rep)
            return
        if not rep.placed and rep.spec is not None:
            # Still in Ray's queue: nothing runs to drain, and a stop call would wait for a
            # node as long as it does. Out of the queue now, so it takes no room later.
            with contextlib.suppress(Exception):
                ray.kill(rep.handle, no_restart=True)
            self._forget_replica(rep)
            return
        if rep.stop_call is None:
            rep.stop_call = rep.handle.stop.remote(self.settings.stop_grace_period)
            rep.stop_by = now + self.settings.stop_grace_period + 10
            rep.phase = ReplicaPhase.STOPPED
            return
        done, _ = ray.wait([rep.stop_call], timeout=0)
        if done or now > rep.stop_by:
            with contextlib.suppress(Exception):
                ray.kill(rep.handle, no_restart=True)
            self._forget_replica(rep)

    # -- adoption, archives, keys ---------------------------------------------------------------
    def _adopt(self) -> None:
        """Take over this installation's actors an earlier control plane left running."""
        import ray

        names = _named_actors(self.scope)
        kept = {name.split(":", 3)[3] for name in names}
        with contextlib.suppress(OSError):
            for path in self._reloads.iterdir():  # of replicas gone meanwhile
                if path.name not in kept:
                    path.unlink(missing_ok=True)
        for name in names:
            try:
                handle = ray.get_actor(name, namespace=NAMESPACE)
            except ValueError:  # gone meanwhile
                continue
            _, _, deployment_id, replica_id = name.split(":", 3)
            rep = _RayReplica(
                None,
                name=name,
                handle=handle,
                replica_id=replica_id,
                deployment_id=deployment_id,
                started_at=time.time(),
                ever_ready=True,
                message="adopted from an earlier control plane",
            )
            with contextlib.suppress(OSError):
                reloaded = Path((self._reloads / replica_id).read_text())
                rep.project = reloaded if reloaded.is_dir() else None
            try:
                st = _get(handle.status.remote(), 10)
            except Exception:
                log.warning("ray engine: adopted replica %s does not answer yet", replica_id)
            else:
                rep.generation = int(st["generation"])
                self._apply(rep, st, time.monotonic())
                rep.message = "adopted from an earlier control plane"
            self._replicas[replica_id] = rep
            log.info("ray engine: adopted replica %s (node %s)", replica_id, rep.node_ip)

    def _archive(self, app_dir: Path) -> tuple[bytes, str]:
        from kingpost.engines._ray_node import pack_project

        with self._archive_lock:
            packed = self._archives.pop(app_dir, None)
            if packed is None:
                packed = pack_project(app_dir)
            self._archives[app_dir] = packed  # the most recent last
            while len(self._archives) > ARCHIVES_KEPT:  # a development loop packs many
                del self._archives[next(iter(self._archives))]
            return packed

    def _node_weights(self, spec: ReplicaSpec) -> tuple[Any, ...]:
        """The spec's weights as nodes fetch them: each mount's mirror manifest, found from
        its tree (``{weights_dir}/trees/{manifest id}``, or a file in one)."""
        from kingpost.engines._ray_node import NodeWeights
        from kingpost.weights.blobs import BlobStore

        out = []
        trees = self.settings.weights_dir / "trees"
        for w in spec.weights:
            rel = w.source_dir.relative_to(trees) if w.source_dir.is_relative_to(trees) else None
            manifest = None
            if rel is not None and rel.parts:
                manifest = BlobStore(self.settings.weights_dir).manifest(rel.parts[0])
            if manifest is None or rel is None:
                raise EngineError(
                    f"weights: {w.mount_location}: {w.source_dir} is not a tree of the weights "
                    f"mirror ({trees}/{{manifest}}), which the ray engine ships to the nodes",
                    field="weights",
                    value=str(w.source_dir),
                )
            single = str(Path(*rel.parts[1:])) if len(rel.parts) > 1 else None
            out.append(NodeWeights(w.mount_location, manifest, single))
        return tuple(out)

    def _weights_source(self) -> str:
        """The name of this installation's :class:`WeightsSource` actor, created once on
        the control plane's node (it reads the mirror there); detached, so a restarted
        control plane finds it again."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from kingpost.engines._ray_node import WeightsSource

        name = f"kp-weights:{self.scope}"
        with self._archive_lock:
            if self._source is None:
                here = ray.get_runtime_context().get_node_id()
                self._source = (
                    ray.remote(WeightsSource)
                    .options(
                        name=name,
                        namespace=NAMESPACE,
                        lifetime="detached",
                        get_if_exists=True,
                        max_restarts=-1,
                        max_concurrency=8,
                        num_cpus=0,
                        scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
                    )
                    .remote(str(self.settings.weights_dir))
                )
        return name

    def _replica_key(self, replica_id: str) -> bytes:
        """A Fernet key of this replica's own, derived from the installation's secret key
        (so a restarted control plane can unlock a restarted actor it adopted)."""
        digest = hmac.new(self._secret_key, f"ray:{replica_id}".encode(), hashlib.sha256)
        return base64.urlsafe_b64encode(digest.digest())


def _get(ref: Any, timeout: float | None = None) -> Any:
    """``ray.get`` of one actor call's answer (typed loosely: actor calls are untyped)."""
    import ray

    return ray.get(ref, timeout=timeout)


def _installation_key(settings: Settings) -> bytes:
    from kingpost.secrets_box import load_or_create_key

    return load_or_create_key(settings.home, settings.secret_key)


def _seal(key: bytes, secrets: dict[str, str]) -> bytes:
    from cryptography.fernet import Fernet

    return Fernet(key).encrypt(json.dumps(secrets).encode())


def ray_env_defaults() -> None:
    """Ray's usage statistics off unless the operator says otherwise."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
