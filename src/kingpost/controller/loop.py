"""The reconcile loop.

Durable state lives in the store: deployments with their desired state and
config, environments, secrets. Everything here is soft state, rebuilt after a
restart: parsed configs (cached by project hash), preparation jobs (idempotent),
the replicas engines report through ``poll()``, and the last routing table.

Each pass reads the store once, polls every engine once, computes a
:class:`~kingpost.controller.plan.Plan` per deployment and applies it, then
pushes the routing table to the gateways if it changed. A failure in one
deployment's step is logged and never stops the loop.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kingpost.controller.plan import BUILD_FAILED_PREFIX, Want, plan
from kingpost.controller.prepare import Jobs, JobState
from kingpost.controller.specs import (
    environment_names,
    missing_secrets,
    replica_secrets,
    replica_spec,
    server_shape,
)
from kingpost.controller.table import build_table
from kingpost.engines import Engine, LogLine, Prepared, ReplicaStatus, create_engine
from kingpost.envs.gc import GcReport, VenvInfo, collect, list_environments
from kingpost.errors import KingpostError
from kingpost.gateway.table import RoutingTable
from kingpost.server.contract import ENVIRONMENT_ENV, ENVIRONMENT_KEY
from kingpost.store import (
    DeploymentStatus,
    DeploymentView,
    DesiredState,
    EnvironmentView,
    Store,
    new_id,
)

if TYPE_CHECKING:
    from kingpost.config import TrussConfig
    from kingpost.settings import Settings

__all__ = ["Controller"]

log = logging.getLogger(__name__)
TABLE_REFRESH_S = 5.0


@dataclass(frozen=True)
class _Ready:
    """Prerequisites met: what replica specs need beyond the config."""

    built: Prepared
    weights: tuple[Any, ...]


class Controller:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        *,
        push: Callable[[RoutingTable], None] | None = None,
        engines: dict[str, Engine] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.store = store
        self._push = push
        self._engines: dict[str, Engine] = dict(engines or {})
        self._engine_errors: dict[str, str] = {}
        self._clock = clock
        self._configs: dict[str, TrussConfig] = {}
        self._failed_builds: set[str] = set()
        """Deployments whose BUILD_FAILED is recorded: re-activating one builds it again."""
        self._notes: dict[str, str] = {}
        """Per deployment: what a new replica would lack while the running ones serve."""
        self._jobs = Jobs(settings.build_timeout, log_dir=settings.builds_dir)
        self._weights: Any = None
        self._table = RoutingTable()
        self._owners: dict[str, Engine] = {}
        self._pushed_at = 0.0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._told: dict[str, str] | None = None
        """What each deployment's environment file says (None until read from disk)."""

    # -- lifecycle ----------------------------------------------------------------
    def start(self) -> None:
        """Adopt what the engines already run, publish a first table, then loop.

        The first pass runs before this returns so that, after a restart, the
        gateway knows the keys and the serving replicas before the API answers.
        """
        # The default engine too, even with no deployment on it: starting an engine clears
        # what a killed run left (processes, secret files), deleted deployments' included.
        in_use = {d.engine for d in self.store.routing_snapshot()[1]}
        for name in sorted(in_use | {self.settings.engine}):
            try:
                self.engine(name)
            except KingpostError as exc:  # recorded per deployment by the pass
                log.warning("engine %s is unavailable: %s", name, exc.message)
        try:
            self.reconcile_once()
        except Exception:
            log.exception("first reconcile pass failed")
        self._thread = threading.Thread(target=self._run, name="kingpost-controller", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Reconcile now instead of at the next tick (after a user action)."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._jobs.close()
        for engine in self._engines.values():
            try:
                engine.close()
            except Exception:
                log.exception("closing engine %s failed", engine.name)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.reconcile_once()
            except Exception:  # the loop never halts
                log.exception("reconcile pass failed")
            self._wake.wait(self.settings.reconcile_interval)
            self._wake.clear()

    # -- queries --------------------------------------------------------------------
    @property
    def table(self) -> RoutingTable:
        return self._table

    def logs(self, deployment: DeploymentView, tail: int = 200) -> list[LogLine]:
        lines = [LogLine("build", t) for t in self._jobs.output(f"build:{deployment.id}")]
        engine = self._engines.get(deployment.engine)
        if engine is not None:
            lines.extend(engine.logs(deployment.id, tail))
        return lines[-tail:]

    def engine(self, name: str) -> Engine:
        with self._lock:
            engine = self._engines.get(name)
            if engine is None:
                engine = self._engines[name] = create_engine(name, self.settings)
            return engine

    # -- one pass -------------------------------------------------------------------
    def reconcile_once(self) -> RoutingTable:
        models, deployments, environments = self.store.routing_snapshot()
        replicas = self._poll_all()
        self._tell_environments(deployments, environments)
        known = {d.id for d in deployments}
        ready: dict[str, list[ReplicaStatus]] = {}
        for dep in deployments:
            try:
                ready[dep.id] = self._reconcile(dep, replicas.get(dep.id, []))
            except Exception as exc:
                log.exception("reconciling deployment %s failed", dep.id)
                self.store.set_status(dep.id, DeploymentStatus.FAILED, f"internal error: {exc}")
        for dep_id, reps in replicas.items():
            if dep_id not in known:  # deleted deployments, or strays from an old run
                for r in reps:
                    self._stop_replica(r)
        self._jobs.cancel_others({f"build:{d}" for d in known}, "the deployment was deleted")
        _, deployments, _ = self.store.routing_snapshot()
        table = build_table(
            version=self._table.version,
            domain=self.settings.domain,
            models=models,
            deployments=deployments,
            environments=environments,
            ready=ready,
            shapes={d.id: self._shape(d) for d in deployments},
            key_hashes=self.store.api_key_hashes(),
            response_timeout_s=self.settings.gateway_response_timeout,
            private_paths=(str(self.settings.home),),
        )
        self._publish(table)
        return self._table

    def _poll_all(self) -> dict[str, list[ReplicaStatus]]:
        """Replicas by deployment; remembers which engine reported each, for stopping."""
        out: dict[str, list[ReplicaStatus]] = {}
        self._owners = {}
        for engine in list(self._engines.values()):
            try:
                for status in engine.poll():
                    out.setdefault(status.deployment_id, []).append(status)
                    self._owners[status.replica_id] = engine
            except Exception:
                log.exception("polling engine %s failed", engine.name)
        return out

    def _reconcile(self, dep: DeploymentView, replicas: list[ReplicaStatus]) -> list[ReplicaStatus]:
        want_active = dep.desired_state == DesiredState.ACTIVE
        if not want_active:  # a build still running is stopped; re-activating starts anew
            self._jobs.cancel(f"build:{dep.id}", "the deployment was deactivated")
        prepared = self._prepare(dep, serving=bool(replicas)) if want_active else None
        if want_active and prepared is None and not replicas:
            return []  # still preparing, or failed to; status already recorded
        want = Want(
            active=want_active and (prepared is not None or bool(replicas)),
            replicas=dep.min_replicas,
            reset_after=dep.updated_at.timestamp()
            if dep.status == DeploymentStatus.DEPLOYING
            else 0.0,
            was_active=dep.status in (DeploymentStatus.ACTIVE, DeploymentStatus.UNHEALTHY),
        )
        decision = plan(want, replicas)
        for replica_id in decision.stop:
            self._stop_replica_id(dep.engine, replica_id)
        # The status goes first: a change moves ``updated_at``, which ``reset_after``
        # compares start times with, so replicas started below must come after it (else
        # the next pass takes their first failure for one from before a re-activation).
        if not want_active:
            self.store.set_status(dep.id, DeploymentStatus.INACTIVE)
        elif decision.status is not None:
            message = decision.message or self._notes.get(dep.id, "")
            self.store.set_status(dep.id, decision.status, message)
        if decision.start and prepared is not None:
            self._start_replicas(dep, decision.start, prepared)  # records a refusal
        return list(decision.ready)

    # -- Python environments ------------------------------------------------------------
    def venvs_in_use(self) -> dict[str, list[str]]:
        """Environment hash -> ids of the deployments (not deleted) that use it.

        A deployment whose environment cannot be told (its config no longer loads, its
        engine is unavailable, the Python it asks for is gone) is left out: it could
        not be built either."""
        used: dict[str, list[str]] = {}
        for dep in self.store.list_deployments():
            try:
                env = self.engine(dep.engine).environment_hash(
                    self._config(dep), self._app_dir(dep)
                )
            except KingpostError as exc:
                log.info("no environment known for deployment %s: %s", dep.id, exc.message)
                continue
            if env is not None:
                used.setdefault(env, []).append(dep.id)
        return used

    def venvs(self) -> list[tuple[VenvInfo, list[str]]]:
        """Every environment under ``{home}/envs`` with the deployments that use it."""
        used = self.venvs_in_use()
        return [(v, used.get(v.hash, [])) for v in list_environments(self.settings.envs_dir)]

    def gc_venvs(self) -> GcReport:
        """Remove the environments no deployment uses (see :mod:`kingpost.envs.gc`)."""
        started = time.time()
        return collect(self.settings.envs_dir, set(self.venvs_in_use()), started)

    # -- preparation ------------------------------------------------------------------
    def _config(self, dep: DeploymentView) -> TrussConfig:
        cfg = self._configs.get(dep.project_hash)
        if cfg is None:
            from kingpost.config import load_config

            cfg = load_config(self._app_dir(dep)).config
            self._configs[dep.project_hash] = cfg
        return cfg

    def _app_dir(self, dep: DeploymentView) -> Path:
        return self.settings.projects_dir / dep.project_hash

    def _shape(self, dep: DeploymentView) -> Any:
        try:
            return server_shape(self._config(dep))
        except KingpostError:
            return None

    def _prepare(self, dep: DeploymentView, serving: bool = False) -> _Ready | None:
        """Check prerequisites; record BUILDING/WAITING/FAILED; return them once met.

        While replicas already serve (adopted after a restart), progress is not
        recorded: the deployment stays as it is until a replica must be started.
        """
        config = self._config(dep)
        missing = missing_secrets(config, self.store.secret_names())
        self._notes.pop(dep.id, None)
        if missing:
            what = f"secret(s) not defined: {', '.join(missing)}; define each with "
            if serving:  # the running replicas keep the files they started with
                self._notes[dep.id] = what + "`kingpost secrets set NAME` before a replica starts"
                return None
            self.store.set_status(
                dep.id,
                DeploymentStatus.FAILED,
                what + "`kingpost secrets set NAME` (the deployment starts once they exist)",
            )
            return None
        if dep.engine not in self._engines:
            try:
                self.engine(dep.engine)
            except KingpostError as exc:
                self.store.set_status(dep.id, DeploymentStatus.FAILED, exc.message)
                return None
        built = self._build_for(dep, config, serving)
        if built is None:
            return None
        weights = self._weights_for(dep, config, serving)
        if weights is None:
            return None
        return _Ready(built=built, weights=weights)

    def _build_for(
        self, dep: DeploymentView, config: TrussConfig, serving: bool = False
    ) -> Prepared | None:
        """What the deployment's engine builds for it (an environment, an image), once."""
        engine, app_dir = self.engine(dep.engine), self._app_dir(dep)
        key = f"build:{dep.id}"
        if dep.status == DeploymentStatus.BUILD_FAILED and not serving:
            # The recorded failure stands until the user re-activates (which resets the
            # status), a restarted control plane included: it does not build it again.
            return None
        if dep.id in self._failed_builds and dep.status == DeploymentStatus.DEPLOYING:
            # BUILD_FAILED was recorded, and re-activating reset it since: build again.
            self._failed_builds.discard(dep.id)
            self._jobs.forget(key)
        job = self._jobs.ensure(key, lambda out: engine.prepare(config, app_dir, out))
        if job.state == JobState.RUNNING:
            if serving:
                return None
            what = "the image" if dep.engine == "docker" else "the Python environment"
            self.store.set_status(dep.id, DeploymentStatus.BUILDING, f"building {what}")
            return None
        if job.state == JobState.FAILED:
            self.store.set_status(dep.id, DeploymentStatus.BUILD_FAILED, job.error)
            self._failed_builds.add(dep.id)
            return None
        return job.result if isinstance(job.result, Prepared) else Prepared()

    def _weights_for(
        self, dep: DeploymentView, config: TrussConfig, serving: bool = False
    ) -> tuple[Any, ...] | None:
        entries = list(config.weights or [])
        if not entries:
            return ()
        manager = self.weights_manager()
        secret_names = {e.secret_name for e in entries if e.secret_name}
        manager.start(dep.id, entries, self.store.reveal_secrets(secret_names))
        st = manager.status(dep.id)
        state = str(getattr(st.state, "value", st.state)).upper()
        if state == "COMPLETE":
            return tuple(manager.mounts(dep.id))
        if state == "FAILED":
            self.store.set_status(dep.id, DeploymentStatus.FAILED, f"weights: {st.error}")
            return None
        if serving:
            return None
        progress = f"{st.files_done}/{st.files_total} files, {st.bytes_done}/{st.bytes_total} bytes"
        self.store.set_status(dep.id, DeploymentStatus.WAITING_FOR_WEIGHTS, progress)
        return None

    def weights_manager(self) -> Any:
        if self._weights is None:
            from kingpost.weights import WeightsManager

            self._weights = WeightsManager(self.settings.weights_dir)
        return self._weights

    def weights_status(self, deployment_id: str) -> Any:
        return None if self._weights is None else self._weights.status(deployment_id)

    # -- replicas ---------------------------------------------------------------------
    def _start_replicas(self, dep: DeploymentView, count: int, ready: _Ready) -> None:
        from kingpost.config import runtime_environment

        config = self._config(dep)
        env, _dropped = runtime_environment(config)
        told = (self._told or {}).get(dep.id)
        if told:
            # A model class gets it as ``__init__(environment=...)`` and in setup_environment;
            # the same text as the file, which this pass wrote before starting anything.
            env = {**env, ENVIRONMENT_ENV: told}
        secrets = replica_secrets(config, self.store.reveal_secrets(config.secrets or {}))
        engine = self.engine(dep.engine)
        model_name = next((m.name for m in self.store.list_models() if m.id == dep.model_id), "")
        for _ in range(count):
            spec = replica_spec(
                replica_id=f"{dep.id}-{new_id(5)}",
                deployment_id=dep.id,
                model_id=dep.model_id,
                model_name=model_name,
                app_dir=self._app_dir(dep),
                config=config,
                env=env,
                secrets=secrets,
                weights=ready.weights,
                python_executable=ready.built.python_executable,
                image=ready.built.image,
                dynamic_config_dir=self.settings.dynamic_dir / dep.id,
            )
            try:
                engine.start(spec)
            except KingpostError as exc:
                prefix = BUILD_FAILED_PREFIX if exc.code == "build_failed" else ""
                status = DeploymentStatus.BUILD_FAILED if prefix else DeploymentStatus.FAILED
                self.store.set_status(dep.id, status, exc.message)
                return

    def _tell_environments(
        self, deployments: list[DeploymentView], environments: list[EnvironmentView]
    ) -> None:
        """Keep each deployment's environment file current, so a promotion or demotion
        reaches replicas that are already running (their server watches the file)."""
        names = environment_names(environments)
        known = {d.id for d in deployments}
        if self._told is None:
            self._told = {}
            root = self.settings.dynamic_dir
            for path in root.iterdir() if root.is_dir() else ():
                if path.name not in known:  # deleted while the control plane was down
                    shutil.rmtree(path, ignore_errors=True)
                    continue
                with contextlib.suppress(OSError):
                    self._told[path.name] = (path / ENVIRONMENT_KEY).read_text()
        for dep_id in [d for d in self._told if d not in known]:
            del self._told[dep_id]
            shutil.rmtree(self.settings.dynamic_dir / dep_id, ignore_errors=True)
        for dep in deployments:
            if dep.desired_state == DesiredState.ACTIVE:
                self._tell_environment(dep.id, names.get(dep.id))

    def _tell_environment(self, dep_id: str, name: str | None) -> None:
        content = json.dumps({"name": name}) if name is not None else ""
        told = self._told
        assert told is not None
        if told.get(dep_id) == content:
            return
        directory = self.settings.dynamic_dir / dep_id
        try:
            directory.mkdir(parents=True, exist_ok=True)
            tmp = directory / f".{ENVIRONMENT_KEY}.tmp"
            tmp.write_text(content)
            os.replace(tmp, directory / ENVIRONMENT_KEY)  # readers see old or new, whole
        except OSError:
            log.exception("cannot write the environment of deployment %s", dep_id)
            return
        told[dep_id] = content

    def _stop_replica(self, status: ReplicaStatus) -> None:
        engine = self._owners.get(status.replica_id)
        if engine is not None:
            engine.stop(status.replica_id)

    def _stop_replica_id(self, engine_name: str, replica_id: str) -> None:
        engine = self._engines.get(engine_name)
        if engine is not None:
            engine.stop(replica_id)

    # -- gateway ----------------------------------------------------------------------
    def _publish(self, table: RoutingTable) -> None:
        changed = self._table.version == 0 or (
            table.to_json() | {"version": 0} != self._table.to_json() | {"version": 0}
        )
        now = self._clock()
        if changed:
            table = RoutingTable(**{**table.__dict__, "version": self._table.version + 1})
            self._table = table
        if self._push is not None and (changed or now - self._pushed_at >= TABLE_REFRESH_S):
            try:
                self._push(self._table)
                self._pushed_at = now
            except Exception as exc:
                log.warning("pushing the routing table failed: %s", exc)
