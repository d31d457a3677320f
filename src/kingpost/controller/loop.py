"""The reconcile loop.

Durable state lives in the store: deployments with their desired state and
config, environments, rollouts, secrets. Everything here is soft state, rebuilt after a
restart: the replicas engines report through ``poll()``, the replicas being drained, the
autoscaler's samples, and what the loop's two concerns keep: preparation and housekeeping
(:class:`~kingpost.controller.builds.Builds`: parsed configs, build jobs, weights, garbage
collection) and environments with the routing table
(:class:`~kingpost.controller.routing.Routing`). The loop decides and records; those
answer and publish.

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
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from kingpost.controller.builds import Blocked as _Blocked
from kingpost.controller.builds import Builds
from kingpost.controller.builds import Ready as _Ready
from kingpost.controller.gpus import GpuPlacer, Wait
from kingpost.controller.plan import Want, plan
from kingpost.controller.prepare import JobState
from kingpost.controller.rollout import (
    TERMINAL,
    Observed,
    Phase,
    PromotionSettings,
    RolloutState,
    rollout_step,
)
from kingpost.controller.routing import TABLE_REFRESH_S, Routing
from kingpost.controller.scaling import DRAIN_MAX_S, Drains, Scaler
from kingpost.controller.specs import replica_secrets, replica_spec
from kingpost.engines import Engine, LogLine, ReplicaPhase, ReplicaStatus, create_engine
from kingpost.errors import KingpostError
from kingpost.gateway.stats import GatewayStats
from kingpost.gateway.table import RoutingTable
from kingpost.gpus import InventorySource
from kingpost.metrics.events import ReplicaEvents
from kingpost.server.contract import ENVIRONMENT_ENV
from kingpost.store import (
    DeploymentStatus,
    DeploymentView,
    DesiredState,
    EnvironmentView,
    RolloutStatus,
    RolloutView,
    Store,
    new_id,
)
from kingpost.store.autoscaling import effective_settings

if TYPE_CHECKING:
    from kingpost.settings import Settings

__all__ = ["TABLE_REFRESH_S", "Controller", "LoopStats"]

log = logging.getLogger(__name__)
STATS_INTERVAL_S = 1.0
DRAIN_GRACE_S = DRAIN_MAX_S
"""Longest a replica left out of the table waits for its requests in flight before it is
stopped (streams included); it is stopped sooner once the gateway has none on it."""
_LIVE = (ReplicaPhase.STARTING, ReplicaPhase.READY, ReplicaPhase.NOT_READY, ReplicaPhase.RESTARTING)
_PREPARING = (DeploymentStatus.BUILDING, DeploymentStatus.WAITING_FOR_WEIGHTS)


_FAILURES = (DeploymentStatus.FAILED, DeploymentStatus.BUILD_FAILED)


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
        gpus: InventorySource | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.gpus = GpuPlacer(settings, store.db, gpus)
        """The host's devices and who holds them (``gpus``: the inventory seam)."""
        self._pull_stats = pull_stats
        self.gateway_stats: GatewayStats | None = None
        """The gateway's last figures (every worker's, merged), pulled once a second."""
        self._stats_at = 0.0
        self._engines: dict[str, Engine] = dict(engines or {})
        for given in self._engines.values():
            given.on_ready = self.wake
        self._engine_errors: dict[str, str] = {}
        self._clock = clock
        self._notes: dict[str, str] = {}
        """Per deployment: what a new replica would lack while the running ones serve."""
        self._owners: dict[str, Engine] = {}
        self._polled_all = True
        self._engine_of: dict[str, str] | None = None
        """Deployment id -> its engine's name, from the last pass's snapshot."""
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.stats = LoopStats()
        self._step_errors = 0
        self.builds = Builds(
            settings,
            store,
            engine=self.engine,
            engines=self._engines,
            running=self._running,
            wake=self.wake,
        )
        """Preparation (configs, builds, weights) and housekeeping (environments, images,
        disk): see :mod:`kingpost.controller.builds`."""
        self.routing = Routing(settings, store, push=push, clock=clock)
        """Environment files and the routing table: see :mod:`kingpost.controller.routing`."""
        self._rollout_targets: dict[str, int] = {}
        """Replicas a running rollout wants of each of its two deployments this pass."""
        self._splits: dict[tuple[str, str], tuple[tuple[str, float], ...]] = {}
        """(model id, environment) -> weighted deployments, for environments rolling now."""
        self._drains = Drains()
        self.scaler = Scaler()
        """The autoscaler's soft state; a rollout freezes a deployment through
        ``scaler.frozen``."""
        self.replica_events = ReplicaEvents()
        """Replica starts, restarts, failures and cold starts seen by the passes (metrics)."""

    # -- lifecycle ----------------------------------------------------------------
    def start(self) -> None:
        """Adopt what the engines already run, publish a first table, then loop.

        The first pass runs before this returns so that, after a restart, the
        gateway knows the keys and the serving replicas before the API answers.
        """
        # The default engine too, even with no deployment on it: starting an engine clears
        # what a killed run left (processes, secret files), deleted deployments' included.
        inventory = self.gpus.read()
        log.info("GPU inventory (%s): %s", inventory.source, inventory.describe())
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
        self.builds.close()
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
                threading.Thread(target=self.builds.gc_disk_logged, name="kingpost-disk-gc",
                                 daemon=True).start()  # fmt: skip
            self._wake.wait(self.settings.reconcile_interval)
            self._wake.clear()

    # -- queries --------------------------------------------------------------------
    @property
    def table(self) -> RoutingTable:
        return self.routing.table

    def logs(self, deployment: DeploymentView, tail: int = 200) -> list[LogLine]:
        lines = [LogLine("build", t) for t in self.builds.output(deployment.id)]
        mirror = self.builds.weights_status(deployment.id)
        if mirror is not None and mirror.attempts:
            lines.append(
                LogLine("weights", f"mirror attempt {mirror.attempts} failed: {mirror.error}")
            )
        engine = self._engines.get(deployment.engine)
        if engine is not None:
            lines.extend(engine.logs(deployment.id, tail))
        return lines[-tail:]

    def created_engines(self) -> dict[str, Engine]:
        """The engines created so far, by name (``kingpost engines``)."""
        return dict(self._engines)

    def engine(self, name: str) -> Engine:
        with self._lock:
            engine = self._engines.get(name)
            if engine is None:
                engine = self._engines[name] = create_engine(name, self.settings)
                engine.on_ready = self.wake  # a replica ready: route to it at once
            return engine

    # -- metrics (kingpost.metrics reads these at each scrape) ---------------------------
    def fresh_gateway_stats(self) -> GatewayStats | None:
        """Every gateway worker's figures, pulled now (the last pulled ones if that fails)."""
        if self._pull_stats is not None:
            try:
                return self._pull_stats()
            except Exception as exc:
                log.debug("pulling the gateway's stats for a scrape failed: %s", exc)
        return self.gateway_stats

    def current_replicas(self) -> list[ReplicaStatus]:
        """Every engine's replicas now (``poll()`` does not block)."""
        out: list[ReplicaStatus] = []
        for engine in list(self._engines.values()):
            with contextlib.suppress(Exception):
                out.extend(engine.poll())
        return out

    def build_durations(self) -> dict[str, tuple[JobState, float]]:
        """Per deployment id: its last build's state and duration (so far, if running)."""
        return self.builds.jobs.durations("build:")

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
        self.replica_events.observe(replicas, self._clock())
        self._release_devices(replicas)
        self._advance_rollouts(replicas)  # first: a finished one changes what this pass sees
        models, deployments, environments = self.store.routing_snapshot()
        self._engine_of = {d.id: d.engine for d in deployments}
        self.routing.tell_environments(deployments, environments)
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
        self.builds.cancel_others(known, "the deployment was deleted")
        _, deployments, environments = self.store.routing_snapshot()
        table = self.routing.publish_pass(
            models=models,
            deployments=deployments,
            environments=environments,
            ready=ready,
            shapes={d.id: self.builds.shape(d) for d in deployments},
            splits=self._splits,
        )
        self._pull()
        return table

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

    def _running(self) -> set[str]:
        """The ids of the replicas every engine runs now (for the disk collector, on its
        own thread: it leaves the pass's record of owners alone)."""
        return {r.replica_id for r in self.current_replicas()}

    def _poll_all(self) -> dict[str, list[ReplicaStatus]]:
        """Replicas by deployment; remembers which engine reported each, for stopping."""
        out: dict[str, list[ReplicaStatus]] = {}
        self._owners = {}
        self._polled_all = True
        for engine in list(self._engines.values()):
            try:
                for status in engine.poll():
                    out.setdefault(status.deployment_id, []).append(status)
                    self._owners[status.replica_id] = engine
            except Exception:
                self._polled_all = False
                log.exception("polling engine %s failed", engine.name)
        return out

    def _release_devices(self, replicas: dict[str, list[ReplicaStatus]]) -> None:
        """Free the devices of replicas that are gone. Not while an engine's poll raised,
        and never those of deployments whose engine does not run yet (it could not be
        created, e.g. the Docker Engine is unreachable as the control plane starts): their
        replicas may still run and hold them, and that engine adopts them when it comes."""
        if not self._polled_all:
            return
        live = [
            r.replica_id
            for reps in replicas.values()
            for r in reps
            if r.phase not in (ReplicaPhase.STOPPED, ReplicaPhase.FAILED)
        ]
        if self._engine_of is None:  # the first pass: before any snapshot
            self._engine_of = {d.id: d.engine for d in self.store.routing_snapshot()[1]}
        unasked = {d for d, engine in self._engine_of.items() if engine not in self._engines}
        self.gpus.release_gone(live, self._clock(), self.settings.stop_grace_period, keep=unasked)

    def _reconcile(self, dep: DeploymentView, replicas: list[ReplicaStatus]) -> list[ReplicaStatus]:
        """One deployment's step: check prerequisites, plan, record one status, act."""
        want_active = dep.desired_state == DesiredState.ACTIVE
        serving = bool(replicas)
        seen = (dep.activation, dep.desired_state)  # what this pass decides from
        if not want_active:  # a build still running is stopped; re-activating starts anew
            self.builds.cancel(dep.id, "the deployment was deactivated")
        self._notes.pop(dep.id, None)
        gate = self.builds.prepare(dep, serving) if want_active else None
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
            routed=self.routing.routed(dep.id) if dep.is_development else None,
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
            if refused is not None and refused.status is None:  # waits for devices
                status, message = status or dep.status, refused.message
                if dep.is_development:
                    message += self._free_devices_for_swap(dep, replicas)
            elif refused is not None:  # the engine refused a start: that outcome stands
                status, message = refused.status, refused.message
        if status is not None:  # one status per deployment per pass
            self.store.set_status(dep.id, status, message, seen=seen)
        return list(decision.ready)

    def _free_devices_for_swap(self, dep: DeploymentView, replicas: list[ReplicaStatus]) -> str:
        """A development swap whose new replica waits for devices: the older replicas,
        which hold devices, stop first (a moment without a replica rather than a swap that
        never happens); what the deployment's message adds."""
        held = self.gpus.held()
        older = tuple(
            r.replica_id
            for r in replicas
            if r.generation < dep.activation and r.phase in _LIVE and r.replica_id in held
        )
        if not older:
            return ""
        self._stop_or_drain(dep, older, replicas)
        return "; the running replica stops first to free its devices"

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
        ended: dict[str, int] = {}
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
            if st.status in TERMINAL:  # ended in this pass: its final counts stand
                ended[ro.candidate_deployment_id] = st.candidate_replicas
                ended[ro.previous_deployment_id] = st.previous_replicas
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
        # Autoscaling stays frozen until the rollout ends, then starts from the counts its
        # last step set (a FAILED or CANCELED one gives the previous deployment back all
        # its replicas), not from those of the step before.
        self.scaler.hold(targets, ended)

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
        written = self.store.record_rollout(ro.id, fields, seen=(str(ro.status), ro.requested))
        if written is None:
            return before  # a user paused, resumed or canceled meanwhile: decide again
        if written.status != after.status:  # the candidate went since the snapshot: FAILED
            after = _rollout_state(written)
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
        waiting = None
        if candidate is not None and count(candidate.id, _LIVE) < ro.candidate_replicas:
            with contextlib.suppress(KingpostError):  # a config that fails says so elsewhere
                waiting = self.gpus.wait_reason(self.builds.config(candidate).resources.accelerator)
        return Observed(
            candidate_ready=count(ro.candidate_deployment_id, (ReplicaPhase.READY,)),
            previous_ready=count(prev, (ReplicaPhase.READY,)),
            previous_live=count(prev, _LIVE),
            candidate_preparing=candidate is not None and candidate.status in _PREPARING,
            candidate_failure=failure,
            candidate_waiting=waiting,
            previous_draining=self.gpus.pending(prev)
            + sum(1 for r in replicas.get(prev, ()) if r.replica_id in self._drains),
        )

    def _stop_or_drain(
        self, dep: DeploymentView, stop: tuple[str, ...], replicas: list[ReplicaStatus]
    ) -> None:
        """Stop what the plan lets go; a ready replica is drained first (``Drains``): left
        out of the table from this pass on, and stopped by a later pass once the gateway
        has no request in flight on it, or after :data:`DRAIN_GRACE_S`. Without gateway
        figures to tell (no gateway attached), it is stopped at once."""
        ready = {r.replica_id for r in replicas if r.phase == ReplicaPhase.READY}
        drains = self.routing.attached and self._pull_stats is not None
        now = self._clock()
        for replica_id in stop:
            if drains and replica_id in ready:
                self._drains.begin(replica_id, dep.engine, now)
            else:
                self._stop_replica_id(dep.engine, replica_id)

    # -- replicas ---------------------------------------------------------------------
    def _start_replicas(self, dep: DeploymentView, count: int, ready: _Ready) -> _Blocked | None:
        """Starts ``count`` replicas; the status the engine's refusal calls for, if any."""
        from kingpost.config import runtime_environment

        config = self.builds.config(dep)
        env, _dropped = runtime_environment(config)
        told = self.routing.told(dep.id)
        if told:
            # A model class gets it as ``__init__(environment=...)`` and in setup_environment;
            # the same text as the file, which this pass wrote before starting anything.
            env = {**env, ENVIRONMENT_ENV: told}
        secrets = replica_secrets(config, self.store.reveal_secrets(config.secrets or {}))
        engine = self.engine(dep.engine)
        model_name = next((m.name for m in self.store.list_models() if m.id == dep.model_id), "")
        for _ in range(count):
            replica_id = f"{dep.id}-{new_id(5)}"
            gpus = self.gpus.devices_for(dep.id, replica_id, config.resources.accelerator)
            if isinstance(gpus, Wait):  # no replica starts on the wrong devices
                return _Blocked(None, str(gpus))
            spec = replica_spec(
                replica_id=replica_id,
                deployment_id=dep.id,
                model_id=dep.model_id,
                model_name=model_name,
                app_dir=self.builds.app_dir(dep),
                config=config,
                env=env,
                secrets=secrets,
                weights=ready.weights,
                python_executable=ready.built.python_executable,
                image=ready.built.image,
                dynamic_config_dir=self.settings.dynamic_dir / dep.id,
                generation=dep.activation,
            )
            spec = replace(spec, gpus=gpus)
            if dep.is_development:
                spec = replace(spec, reloadable=True)
            try:
                engine.start(spec)
            except KingpostError as exc:
                self.gpus.release(replica_id)
                build = exc.code == "build_failed"
                status = DeploymentStatus.BUILD_FAILED if build else DeploymentStatus.FAILED
                return _Blocked(status, exc.message)
        return None

    def _stop_replica(self, status: ReplicaStatus) -> None:
        engine = self._owners.get(status.replica_id)
        if engine is not None:
            engine.stop(status.replica_id)

    def _stop_replica_id(self, engine_name: str, replica_id: str) -> None:
        engine = self._engines.get(engine_name)
        if engine is not None:
            engine.stop(replica_id)
