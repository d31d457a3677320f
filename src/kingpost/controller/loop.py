"""The reconcile loop.

Durable state lives in the store: deployments with their desired state and
config, environments, rollouts, secrets. Everything here is soft state, rebuilt after a
restart: parsed configs (cached by project hash), preparation jobs (idempotent),
the replicas engines report through ``poll()``, the replicas being drained, and the last
routing table.

Each pass polls every engine once, advances each running rollout (one
:func:`~kingpost.controller.rollout.rollout_step`, recorded), takes a snapshot of the
store, checks each deployment's prerequisites (a value: ready, or blocked with the status
to record), computes a :class:`~kingpost.controller.plan.Plan` and applies it, recording
one status per deployment (replicas the plan stops are drained first when ready); then it
reads the deployments and environments again (the pass may have changed them) to build
the routing table, pushes it to the gateways if it changed, and pulls the gateways'
stats. A failure in one deployment's step is logged and never stops the loop.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kingpost.controller.plan import Want, plan
from kingpost.controller.prepare import Jobs, JobState
from kingpost.controller.rollout import (
    TERMINAL,
    Observed,
    Phase,
    PromotionSettings,
    RolloutState,
    rollout_step,
)
from kingpost.controller.scaling import DRAIN_MAX_S, Drains, Scaler
from kingpost.controller.specs import (
    environment_names,
    missing_secrets,
    replica_secrets,
    replica_spec,
    server_shape,
)
from kingpost.controller.table import build_table
from kingpost.engines import (
    Engine,
    LogLine,
    Prepared,
    ReplicaPhase,
    ReplicaStatus,
    create_engine,
    engine_kind,
)
from kingpost.envs.gc import GcReport, VenvInfo, collect, list_environments
from kingpost.errors import KingpostError
from kingpost.gateway.stats import GatewayStats
from kingpost.gateway.table import RoutingTable
from kingpost.housekeeping import DiskReport, collect_disk
from kingpost.server.contract import ENVIRONMENT_ENV, ENVIRONMENT_KEY
from kingpost.store import (
    DeploymentStatus,
    DeploymentView,
    DesiredState,
    EnvironmentView,
    KeyScopes,
    RolloutStatus,
    RolloutView,
    Store,
    new_id,
)
from kingpost.store.autoscaling import effective_settings

if TYPE_CHECKING:
    from kingpost.config import TrussConfig
    from kingpost.settings import Settings

__all__ = ["Controller", "LoopStats"]

log = logging.getLogger(__name__)
TABLE_REFRESH_S = 5.0
STATS_INTERVAL_S = 1.0
DRAIN_GRACE_S = DRAIN_MAX_S
"""Longest a replica left out of the table waits for its requests in flight before it is
stopped (streams included); it is stopped sooner once the gateway has none on it."""
_LIVE = (ReplicaPhase.STARTING, ReplicaPhase.READY, ReplicaPhase.NOT_READY, ReplicaPhase.RESTARTING)
_PREPARING = (DeploymentStatus.BUILDING, DeploymentStatus.WAITING_FOR_WEIGHTS)


@dataclass(frozen=True)
class _Ready:
    """Prerequisites met: what replica specs need beyond the config."""

    built: Prepared
    weights: tuple[Any, ...]


_FAILURES = (DeploymentStatus.FAILED, DeploymentStatus.BUILD_FAILED)
_IMAGE_LINE = re.compile(r"^(?:built image (\S+)|image (\S+) is up to date)$")


def _rollout_state(ro: RolloutView) -> RolloutState:
    return RolloutState(
        status=ro.status,
        phase=Phase(ro.phase),
        step=ro.step,
        steps=ro.steps,
        target_replicas=ro.target_replicas,
        previous_initial_replicas=ro.previous_initial_replicas,
        candidate_replicas=ro.candidate_replicas,
        previous_replicas=ro.previous_replicas,
        candidate_traffic_percent=ro.candidate_traffic_percent,
        phase_since=ro.phase_since.timestamp(),
        requested=ro.requested,
        message=ro.message,
    )


def _image_of(build_log: list[str]) -> str | None:
    """The image tag a docker build last ended with, from its log lines."""
    for line in reversed(build_log):
        found = _IMAGE_LINE.match(line.strip())
        if found:
            return found.group(1) or found.group(2)
    return None


@dataclass
class LoopStats:
    """The reconcile loop's own figures, for the metrics endpoint to export."""

    passes: int = 0
    """Passes finished, failed ones included."""
    failed_passes: int = 0
    """Passes that raised (the store or an engine was unreachable, say)."""
    step_errors: int = 0
    """Deployment steps that raised, over all passes (each is logged, and the deployment
    FAILED with the error)."""
    last_step_errors: int = 0
    """Deployment steps that raised in the last pass."""
    last_pass_s: float = 0.0
    max_pass_s: float = 0.0
    total_pass_s: float = 0.0


@dataclass(frozen=True)
class _Blocked:
    """A prerequisite not met: the status it calls for, recorded once by the pass (or not
    at all while adopted replicas serve: they keep serving, and ``message`` becomes the
    deployment's note)."""

    status: DeploymentStatus | None
    """``None``: nothing to record (e.g. a recorded BUILD_FAILED that stands)."""
    message: str = ""


class Controller:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        *,
        push: Callable[[RoutingTable], None] | None = None,
        pull_stats: Callable[[], GatewayStats] | None = None,
        engines: dict[str, Engine] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.store = store
        self._push = push
        self._pull_stats = pull_stats
        self.gateway_stats: GatewayStats | None = None
        """The gateway's last figures (every worker's, merged), pulled once a second."""
        self._stats_at = 0.0
        self._engines: dict[str, Engine] = dict(engines or {})
        for given in self._engines.values():
            given.on_ready = self.wake
        self._engine_errors: dict[str, str] = {}
        self._clock = clock
        self._configs: dict[str, TrussConfig] = {}
        self._failed_builds: set[str] = set()
        """Deployments whose BUILD_FAILED is recorded: re-activating one builds it again."""
        self._built_for: dict[str, str] = {}
        """Per deployment: the project its build job prepares (a development deployment's
        changes; a job for an older project is run again)."""
        self._failed_weights: set[str] = set()
        """Deployments whose weights mirror gave up: re-activating one mirrors afresh."""
        self._notes: dict[str, str] = {}
        """Per deployment: what a new replica would lack while the running ones serve."""
        self._jobs = Jobs(settings.build_timeout, log_dir=settings.builds_dir)
        self._weights: Any = None
        self._table = RoutingTable()
        self.internal_key_hashes: frozenset[str] = frozenset()
        """Admin keys that live only in this process (the async workers'), published
        with the stored ones."""
        self._owners: dict[str, Engine] = {}
        self._pushed_at = 0.0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._publish_lock = threading.Lock()
        self._images: set[str] | None = None
        self._images_lock = threading.Lock()
        self.stats = LoopStats()
        self._step_errors = 0
        self._told: dict[str, str] | None = None
        """What each deployment's environment file says (None until read from disk)."""
        self._rollout_targets: dict[str, int] = {}
        """Replicas a running rollout wants of each of its two deployments this pass."""
        self._splits: dict[tuple[str, str], tuple[tuple[str, float], ...]] = {}
        """(model id, environment) -> weighted deployments, for environments rolling now."""
        self._drains = Drains()
        self.scaler = Scaler()
        """The autoscaler's soft state; a rollout freezes a deployment through
        ``scaler.frozen``."""

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

    def wake_deployment(self, deployment_id: str, queued: int = 1) -> None:
        """Requests wait for a deployment (the gateway says so, or ``wake`` was called): a
        demand sample for the autoscaler, and a pass now, so one scaled to zero starts."""
        self.scaler.demand(deployment_id, queued, self._clock())
        self.wake()

    def stop(self) -> list[str]:
        """Stop the loop and close the engines. Returns, per engine that leaves replicas
        running for the next control plane (docker), a sentence saying what it left and how
        to stop it; with ``stop_replicas_on_exit`` those replicas are stopped too."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._jobs.close()
        kept: list[str] = []
        for engine in self._engines.values():
            try:
                if engine.keeps_replicas:
                    kept.extend(self._leave_or_stop(engine))
                engine.close()
            except Exception:
                log.exception("closing engine %s failed", engine.name)
        return kept

    def _leave_or_stop(self, engine: Engine) -> list[str]:
        live = [
            r for r in engine.poll() if r.phase not in (ReplicaPhase.STOPPED, ReplicaPhase.FAILED)
        ]
        if not live:
            return []
        if self.settings.stop_replicas_on_exit:
            for r in live:
                engine.stop(r.replica_id)  # close() waits for replicas asked to stop
            return []
        deployments = len({r.deployment_id for r in live})
        return [
            f"{len(live)} replica(s) of {deployments} deployment(s) left running on the "
            f"{engine.name} engine: the next `kingpost server` with home {self.settings.home} "
            "adopts them as they are, without a restart. To stop them with the server, run "
            f"it with --stop-replicas-on-exit; to remove them now: {engine.kept_replicas_hint()}"
        ]

    def _run(self) -> None:
        next_gc = time.monotonic() + self.settings.disk_gc_interval
        while not self._stop.is_set():
            try:
                self.reconcile_once()
            except Exception:  # the loop never halts
                log.exception("reconcile pass failed")
            if self.settings.disk_gc_interval > 0 and time.monotonic() >= next_gc:
                next_gc = time.monotonic() + self.settings.disk_gc_interval
                # On a thread of its own: sizing and removing big trees must not hold the
                # passes (statuses, restarts, table pushes) up.
                threading.Thread(target=self._gc_disk_logged, name="kingpost-disk-gc",
                                 daemon=True).start()  # fmt: skip
            self._wake.wait(self.settings.reconcile_interval)
            self._wake.clear()

    # -- queries --------------------------------------------------------------------
    @property
    def table(self) -> RoutingTable:
        return self._table

    def logs(self, deployment: DeploymentView, tail: int = 200) -> list[LogLine]:
        lines = [LogLine("build", t) for t in self._jobs.output(f"build:{deployment.id}")]
        mirror = self.weights_status(deployment.id)
        if mirror is not None and mirror.attempts:
            lines.append(
                LogLine("weights", f"mirror attempt {mirror.attempts} failed: {mirror.error}")
            )
        engine = self._engines.get(deployment.engine)
        if engine is not None:
            lines.extend(engine.logs(deployment.id, tail))
        return lines[-tail:]

    def engine(self, name: str) -> Engine:
        with self._lock:
            engine = self._engines.get(name)
            if engine is None:
                engine = self._engines[name] = create_engine(name, self.settings)
                engine.on_ready = self.wake  # a replica ready: route to it at once
            return engine

    # -- one pass -------------------------------------------------------------------
    def reconcile_once(self) -> RoutingTable:
        started = time.perf_counter()
        self._step_errors = 0
        try:
            return self._pass()
        except Exception:
            self.stats.failed_passes += 1
            raise
        finally:
            took = time.perf_counter() - started
            stats = self.stats
            stats.passes += 1
            stats.last_step_errors = self._step_errors
            stats.step_errors += self._step_errors
            stats.last_pass_s = took
            stats.max_pass_s = max(stats.max_pass_s, took)
            stats.total_pass_s += took

    def _pass(self) -> RoutingTable:
        replicas = self._poll_all()
        self._advance_rollouts(replicas)  # first: a finished one changes what this pass sees
        models, deployments, environments = self.store.routing_snapshot()
        self._tell_environments(deployments, environments)
        replicas = self._drained(replicas)
        self._autoscale(deployments, environments, replicas)
        known = {d.id for d in deployments}
        ready: dict[str, list[ReplicaStatus]] = {}
        for dep in deployments:
            try:
                ready[dep.id] = self._reconcile(dep, replicas.get(dep.id, []))
            except Exception as exc:
                self._step_errors += 1
                log.exception("reconciling deployment %s failed", dep.id)
                self.store.set_status(dep.id, DeploymentStatus.FAILED, f"internal error: {exc}")
        for dep_id, reps in replicas.items():
            if dep_id not in known:  # deleted deployments, or strays from an old run
                for r in reps:
                    self._stop_replica(r)
        self._jobs.cancel_others({f"build:{d}" for d in known}, "the deployment was deleted")
        _, deployments, environments = self.store.routing_snapshot()
        shapes = {d.id: self._shape(d) for d in deployments}
        with self._publish_lock:  # the keys are read under it: see publish_keys
            table = build_table(
                version=self._table.version,
                domain=self.settings.domain,
                models=models,
                deployments=deployments,
                environments=environments,
                ready=ready,
                shapes=shapes,
                keys=self._key_scopes(),
                response_timeout_s=self.settings.gateway_response_timeout,
                private_paths=(str(self.settings.home),),
                splits=self._splits,
                hold_timeout_s=self.settings.gateway_hold_timeout,
                queue_limit=self.settings.gateway_queue_limit,
            )
            self._publish(table)
        self._pull()
        return self._table

    def _drained(self, replicas: dict[str, list[ReplicaStatus]]) -> dict[str, list[ReplicaStatus]]:
        """Stops the replicas whose drain is over; ``replicas`` without those and those
        still draining (neither may get traffic or count as capacity in this pass)."""
        gone = set()
        for engine_name, replica_id in self._drains.done(self.gateway_stats, self._clock()):
            self._stop_replica_id(engine_name, replica_id)
            gone.add(replica_id)
        return {
            dep: [r for r in reps if r.replica_id not in gone and r.replica_id not in self._drains]
            for dep, reps in replicas.items()
        }

    def _autoscale(
        self,
        deployments: list[DeploymentView],
        environments: list[EnvironmentView],
        replicas: dict[str, list[ReplicaStatus]],
    ) -> None:
        """Each active deployment's count, from the gateway's samples (see
        :mod:`kingpost.controller.scaling`); a failure leaves the last count standing."""
        now = self._clock()
        active = [d for d in deployments if d.desired_state == DesiredState.ACTIVE]
        self.scaler.observe(self.gateway_stats, [d.id for d in active], now)
        self.scaler.forget(d.id for d in active)
        for dep in active:
            try:
                settings, source = effective_settings(dep, environments)
                self.scaler.step(dep, settings, replicas.get(dep.id, []), now, source)
            except Exception:
                log.exception("autoscaling deployment %s failed", dep.id)

    def _pull(self) -> None:
        """The gateway's figures, at most once a second (one request per worker's socket),
        or every pass while replicas drain: their stop waits for these figures."""
        now = self._clock()
        due = now - self._stats_at >= STATS_INTERVAL_S or len(self._drains) > 0
        if self._pull_stats is None or not due:
            return
        self._stats_at = now
        try:
            self.gateway_stats = self._pull_stats()
        except Exception as exc:  # a restarting gateway: the next pull catches up
            log.debug("pulling the gateway's stats failed: %s", exc)

    def publish_keys(self) -> None:
        """Push the current API keys to the gateways now, not at the next pass: a revoked
        key stops working before the revocation call answers.

        Keys are read from the store under the same lock a pass publishes under, so a
        pass that read the keys before a revocation cannot push them after it."""
        with self._publish_lock:
            if self._table.version == 0:
                return  # no table yet: the first pass publishes the keys with it
            keys = self._key_scopes()
            self._publish(
                replace(self._table, api_key_hashes=keys.admin, invoke_keys=dict(keys.invoke))
            )

    def _key_scopes(self) -> KeyScopes:
        keys = self.store.api_key_scopes()
        if not self.internal_key_hashes:
            return keys
        return replace(keys, admin=keys.admin | self.internal_key_hashes)

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
        """One deployment's step: check prerequisites, plan, record one status, act."""
        want_active = dep.desired_state == DesiredState.ACTIVE
        serving = bool(replicas)
        seen = (dep.activation, dep.desired_state)  # what this pass decides from
        if not want_active:  # a build still running is stopped; re-activating starts anew
            self._jobs.cancel(f"build:{dep.id}", "the deployment was deactivated")
        self._notes.pop(dep.id, None)
        gate = self._prepare(dep, serving) if want_active else None
        if isinstance(gate, _Blocked):
            if not serving:
                if gate.status is not None:
                    self.store.set_status(dep.id, gate.status, gate.message, seen=seen)
                return []  # still preparing, or failed to
            if gate.status in _FAILURES:  # replicas serve on; say what a new one would lack
                self._notes[dep.id] = gate.message
        want = Want(
            active=want_active and (isinstance(gate, _Ready) or serving),
            replicas=self._rollout_targets[dep.id]
            if dep.id in self._rollout_targets
            else self.scaler.wanted(dep.id, dep.min_replicas),
            generation=dep.activation,
            was_active=dep.status in (DeploymentStatus.ACTIVE, DeploymentStatus.UNHEALTHY),
            replace_older=dep.is_development,
            routed=self.routed(dep.id) if dep.is_development else None,
        )
        decision = plan(want, replicas)
        self._stop_or_drain(dep, decision.stop, replicas)
        status, message = None, ""
        if not want_active:
            status = DeploymentStatus.INACTIVE
        elif decision.status is not None:
            status, message = decision.status, decision.message or self._notes.get(dep.id, "")
        if decision.start and isinstance(gate, _Ready):
            refused = self._start_replicas(dep, decision.start, gate)
            if refused is not None:  # the engine refused a start: that outcome stands
                status, message = refused.status or DeploymentStatus.FAILED, refused.message
        if status is not None:  # one status per deployment per pass
            self.store.set_status(dep.id, status, message, seen=seen)
        return list(decision.ready)

    def draining(self, replica_id: str) -> bool:
        """Whether the replica is out of the table, waiting for its requests to finish."""
        return replica_id in self._drains

    # -- rollouts: controller/rollout.py decides, this applies and records ----------------
    def rollout_active(self, deployment_id: str) -> bool:
        """Whether a running rollout sets this deployment's replica count: autoscaling of
        it stays frozen until the rollout ends (SUCCEEDED, FAILED or CANCELED)."""
        return deployment_id in self._rollout_targets

    def _advance_rollouts(self, replicas: dict[str, list[ReplicaStatus]]) -> None:
        """One :func:`rollout_step` per running rollout, recorded; then the replica counts
        and traffic splits this pass applies. A rollout whose step raises keeps what it
        recorded last (logged; the next pass tries again)."""
        targets: dict[str, int] = {}
        splits: dict[tuple[str, str], tuple[tuple[str, float], ...]] = {}
        running = self.store.running_rollouts()
        by_id = {d.id: d for d in self.store.routing_snapshot()[1]} if running else {}
        for ro in running:
            try:
                st = self._advance_rollout(ro, by_id, replicas)
            except Exception:
                self._step_errors += 1
                log.exception("advancing rollout %s failed", ro.id)
                st = _rollout_state(ro)
            if st.status in TERMINAL:
                continue
            targets[ro.candidate_deployment_id] = st.candidate_replicas
            targets[ro.previous_deployment_id] = st.previous_replicas
            share = st.candidate_traffic_percent / 100.0
            pairs = (
                (ro.previous_deployment_id, 1.0 - share),
                (ro.candidate_deployment_id, share),
            )
            splits[(ro.model_id, ro.environment)] = tuple(p for p in pairs if p[1] > 0)
        self._rollout_targets, self._splits = targets, splits
        self.scaler.hold(targets)  # autoscaling stays frozen until the rollout ends

    def _advance_rollout(
        self,
        ro: RolloutView,
        by_id: dict[str, DeploymentView],
        replicas: dict[str, list[ReplicaStatus]],
    ) -> RolloutState:
        before = _rollout_state(ro)
        after = rollout_step(
            self._seed_rollout(ro, before),
            self._observe_rollout(ro, by_id, replicas),
            PromotionSettings.from_api(ro.settings),
            self._clock(),
        )
        if after == before:
            return before
        candidate = by_id.get(ro.candidate_deployment_id)
        if (
            after.status == RolloutStatus.FAILED
            and candidate is not None
            and "\n" not in after.message
        ):
            lines = [ln.text for ln in self.logs(candidate, tail=5)]
            if lines:  # why it never got ready is in its output, as for a crash
                after = replace(
                    after, message=after.message + "; last log lines:\n" + "\n".join(lines)
                )
        fields = {k: getattr(after, k) for k in before.__dataclass_fields__}
        fields["phase_since"] = datetime.fromtimestamp(after.phase_since, UTC)
        if not self.store.record_rollout(ro.id, fields, seen=(str(ro.status), ro.requested)):
            return before  # a user paused, resumed or canceled meanwhile: decide again
        if after.status != before.status or after.step != before.step:
            log.info(
                "rollout %s into %s: %s step %d/%d, %.0f%% of traffic on the candidate %s",
                ro.id, ro.environment, after.status, after.step, after.steps,
                after.candidate_traffic_percent, after.message,
            )  # fmt: skip
        return after

    def _seed_rollout(self, ro: RolloutView, state: RolloutState) -> RolloutState:
        """A rollout not begun yet starts from the replicas the previous deployment runs
        now (the autoscaler's count, not its ``min_replicas``): the candidate is brought
        to that capacity, and the previous one is not cut down to its minimum by the
        first step."""
        fresh = state.step == 0 and state.phase == Phase.STEP_DONE and not state.candidate_replicas
        if not fresh or state.status != RolloutStatus.IN_PROGRESS:
            return state
        now = self.scaler.wanted(ro.previous_deployment_id, state.previous_replicas)
        serving = max(state.previous_initial_replicas, now)
        return replace(
            state,
            previous_initial_replicas=serving,
            previous_replicas=serving,
            target_replicas=max(state.target_replicas, serving),
        )

    def _observe_rollout(
        self,
        ro: RolloutView,
        by_id: dict[str, DeploymentView],
        replicas: dict[str, list[ReplicaStatus]],
    ) -> Observed:
        def count(dep_id: str, phases: tuple[ReplicaPhase, ...]) -> int:
            return sum(
                1
                for r in replicas.get(dep_id, ())
                if r.phase in phases and r.replica_id not in self._drains
            )

        prev = ro.previous_deployment_id
        candidate = by_id.get(ro.candidate_deployment_id)
        failure = None
        if candidate is None or candidate.desired_state != DesiredState.ACTIVE:
            failure = "the candidate deployment was deactivated or deleted"
        elif candidate.status in _FAILURES:
            lines = [ln.text for ln in self.logs(candidate, tail=5)]
            failure = f"{candidate.status}: {candidate.message}"
            if lines:
                failure += "; last log lines:\n" + "\n".join(lines)
        return Observed(
            candidate_ready=count(ro.candidate_deployment_id, (ReplicaPhase.READY,)),
            previous_ready=count(prev, (ReplicaPhase.READY,)),
            previous_live=count(prev, _LIVE),
            candidate_preparing=candidate is not None and candidate.status in _PREPARING,
            candidate_failure=failure,
        )

    def _stop_or_drain(
        self, dep: DeploymentView, stop: tuple[str, ...], replicas: list[ReplicaStatus]
    ) -> None:
        """Stop what the plan lets go; a ready replica is drained first (``Drains``): left
        out of the table from this pass on, and stopped by a later pass once the gateway
        has no request in flight on it, or after :data:`DRAIN_GRACE_S`. Without gateway
        figures to tell (no gateway attached), it is stopped at once."""
        ready = {r.replica_id for r in replicas if r.phase == ReplicaPhase.READY}
        drains = self._push is not None and self._pull_stats is not None
        now = self._clock()
        for replica_id in stop:
            if drains and replica_id in ready:
                self._drains.begin(replica_id, dep.engine, now)
            else:
                self._stop_replica_id(dep.engine, replica_id)

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

    def _gc_disk_logged(self) -> None:
        try:
            self.gc_disk()
        except Exception:
            log.exception("disk gc failed")

    def gc_disk(self) -> DiskReport:
        """Remove uploaded projects and replica directories nothing needs any more (see
        :mod:`kingpost.housekeeping`)."""
        deployments = self.store.list_deployments()  # deleted ones left out
        running = {s.replica_id for reps in self._poll_all().values() for s in reps}
        report = collect_disk(
            self.settings.projects_dir,
            self.settings.replicas_dir,
            projects_in_use={d.project_hash for d in deployments},
            live_deployments={d.id for d in deployments},
            running_replicas=running,
            now=time.time(),
        )
        if report.removed:
            log.info(
                "disk gc: removed %d entries (%d bytes)", len(report.removed), report.removed_bytes
            )
        for error in report.errors:
            log.warning("disk gc: %s", error)
        return report

    def gc_images(self) -> tuple[list[str], int, str]:
        """Remove images the docker engine built that no deployment (deleted ones aside)
        uses: (tags removed, bytes, why nothing was collected, or "")."""
        engine = self._engines.get("docker")
        if engine is None or not hasattr(engine, "collect_images"):
            return [], 0, ""
        keep: set[str] = set()
        for dep in self.store.list_deployments():
            if dep.engine != "docker":
                continue
            if dep.status == DeploymentStatus.BUILDING:  # may be about to reuse a candidate
                return [], 0, f"deployment {dep.id} is building; run it again afterwards"
            tag = _image_of(self._jobs.output(f"build:{dep.id}"))
            if tag is not None:  # none: never built (failed, or still to come), so it holds
                keep.add(tag)  # no image; a build of it later finds or makes its own
        with self._images_lock:
            candidates = self._built_images() - keep
            removed, freed = engine.collect_images(candidates)
            if removed:
                left = self._built_images() - set(removed)
                self._images = left
                tmp = self._images_path().with_suffix(".tmp")
                tmp.write_text("".join(f"{t}\n" for t in sorted(left)))
                tmp.replace(self._images_path())
        return removed, freed, ""

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

    def _prepare(self, dep: DeploymentView, serving: bool) -> _Ready | _Blocked:
        """Check prerequisites in order (secrets, engine, build, weights): what the
        deployment's replicas need, or the first one missing as a status to record.
        ``serving``: adopted replicas serve (after a restart), which a recorded
        BUILD_FAILED does not stop from re-checking the build."""
        config = self._config(dep)
        missing = missing_secrets(config, self.store.secret_names())
        if missing:
            what = f"secret(s) not defined: {', '.join(missing)}; define each with "
            if serving:  # the running replicas keep the files they started with
                return _Blocked(
                    DeploymentStatus.FAILED, what + "`kingpost secrets set NAME` before a "
                    "replica starts",
                )  # fmt: skip
            return _Blocked(
                DeploymentStatus.FAILED,
                what + "`kingpost secrets set NAME` (the deployment starts once they exist)",
            )
        if dep.engine not in self._engines:
            try:
                self.engine(dep.engine)
            except KingpostError as exc:
                return _Blocked(DeploymentStatus.FAILED, exc.message)
        built = self._build_for(dep, config, serving)
        if isinstance(built, _Blocked):
            return built
        weights = self._weights_for(dep, config)
        if isinstance(weights, _Blocked):
            return weights
        return _Ready(built=built, weights=weights)

    def _build_for(
        self, dep: DeploymentView, config: TrussConfig, serving: bool
    ) -> Prepared | _Blocked:
        """What the deployment's engine builds for it (an environment, an image), once."""
        engine, app_dir = self.engine(dep.engine), self._app_dir(dep)
        key = f"build:{dep.id}"
        if dep.status == DeploymentStatus.BUILD_FAILED and not serving:
            # The recorded failure stands until the user re-activates (which resets the
            # status), a restarted control plane included: it does not build it again.
            return _Blocked(None)
        if dep.id in self._failed_builds and dep.status == DeploymentStatus.DEPLOYING:
            # BUILD_FAILED was recorded, and re-activating reset it since: build again.
            self._failed_builds.discard(dep.id)
            self._jobs.forget(key)
        if self._built_for.setdefault(dep.id, dep.project_hash) != dep.project_hash:
            # A development deployment's new project: prepare it, not the one before.
            self._jobs.cancel(key, "the deployment's project changed")
            self._jobs.forget(key)
            self._built_for[dep.id] = dep.project_hash
        job = self._jobs.ensure(key, lambda out: engine.prepare(config, app_dir, out))
        if job.state == JobState.RUNNING:
            what = engine_kind(dep.engine).builds
            return _Blocked(DeploymentStatus.BUILDING, f"building {what}")
        if job.state == JobState.FAILED:
            self._failed_builds.add(dep.id)
            return _Blocked(DeploymentStatus.BUILD_FAILED, job.error)
        built = job.result if isinstance(job.result, Prepared) else Prepared()
        if built.image is not None:
            self._record_image(built.image)
        return built

    def _images_path(self) -> Path:
        return self.settings.builds_dir / "docker-images"

    def _built_images(self) -> set[str]:
        """Every image tag this installation's builds ended with (a Docker Engine may
        serve several installations: only these are ever collected)."""
        if self._images is None:
            try:
                self._images = set(self._images_path().read_text().split())
            except FileNotFoundError:
                self._images = set()
        return self._images

    def _record_image(self, tag: str) -> None:
        with self._images_lock:
            images = self._built_images()
            if tag in images:
                return
            images.add(tag)
            path = self._images_path()
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                f.write(tag + "\n")
        engine = self._engines.get("docker")
        if engine is not None and hasattr(engine, "claim_image"):
            engine.claim_image(tag)

    def _weights_for(self, dep: DeploymentView, config: TrussConfig) -> tuple[Any, ...] | _Blocked:
        entries = list(config.weights or [])
        if not entries:
            return ()
        manager = self.weights_manager()
        if dep.id in self._failed_weights and dep.status == DeploymentStatus.DEPLOYING:
            # Gave up, recorded FAILED, and re-activating reset it since: mirror afresh.
            self._failed_weights.discard(dep.id)
            manager.forget(dep.id)
        secret_names = {e.secret_name for e in entries if e.secret_name}
        manager.start(dep.id, entries, self.store.reveal_secrets(secret_names))
        st = manager.status(dep.id)
        state = str(getattr(st.state, "value", st.state)).upper()
        if state == "COMPLETE":
            return tuple(manager.mounts(dep.id))
        if state == "FAILED" and st.retry_in_s is None:
            self._failed_weights.add(dep.id)
            return _Blocked(
                DeploymentStatus.FAILED,
                f"weights: {st.error} (gave up after {st.attempts} attempts; fix the source "
                "or its secret, then re-activate the deployment)",
            )
        if state == "FAILED":
            return _Blocked(
                DeploymentStatus.WAITING_FOR_WEIGHTS,
                f"weights: attempt {st.attempts} of {manager.attempts} failed: {st.error}; "
                f"trying again in {st.retry_in_s:.0f} s",
            )
        progress = f"{st.files_done}/{st.files_total} files, {st.bytes_done}/{st.bytes_total} bytes"
        return _Blocked(DeploymentStatus.WAITING_FOR_WEIGHTS, progress)

    def weights_manager(self) -> Any:
        if self._weights is None:
            from kingpost.weights import WeightsManager

            self._weights = WeightsManager(
                self.settings.weights_dir,
                home=self.settings.home,
                attempts=self.settings.weights_mirror_attempts,
            )
        return self._weights

    def weights_status(self, deployment_id: str) -> Any:
        return None if self._weights is None else self._weights.status(deployment_id)

    # -- replicas ---------------------------------------------------------------------
    def _start_replicas(self, dep: DeploymentView, count: int, ready: _Ready) -> _Blocked | None:
        """Starts ``count`` replicas; the status the engine's refusal calls for, if any."""
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
                generation=dep.activation,
            )
            if dep.is_development:
                spec = replace(spec, reloadable=True)
            try:
                engine.start(spec)
            except KingpostError as exc:
                build = exc.code == "build_failed"
                status = DeploymentStatus.BUILD_FAILED if build else DeploymentStatus.FAILED
                return _Blocked(status, exc.message)
        return None

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

    # -- the development deployment --------------------------------------------------------
    def prepare_again(self, deployment_id: str) -> None:
        """Its next replica is prepared afresh (environment, image, weights): the development
        deployment got a project that needs it (see :mod:`kingpost.controller.devloop`)."""
        self._jobs.cancel(f"build:{deployment_id}", "the development deployment changed again")
        self._jobs.forget(f"build:{deployment_id}")
        self._failed_builds.discard(deployment_id)
        self._failed_weights.discard(deployment_id)
        if self._weights is not None:
            self._weights.restart(deployment_id)
        self.wake()

    def routed(self, deployment_id: str) -> frozenset[str]:
        """The deployment's replicas the last published table sends traffic to."""
        route = self._table.deployments.get(deployment_id)
        return frozenset(u.replica_id for u in route.upstreams) if route else frozenset()

    def build_failure(self, deployment_id: str) -> str | None:
        """The error of the deployment's last preparation, if it failed."""
        state = self._jobs.state(f"build:{deployment_id}")
        return state[1] if state is not None and state[0] == JobState.FAILED else None

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
