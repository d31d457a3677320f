"""The platform's figures as Prometheus families, taken at each scrape.

Sources: the gateway's stats channel (every worker's figures, pulled at the scrape and
merged), the engines' replicas, the controller's own counts (:class:`LoopStats`, replica
events, build jobs, weight mirrors) and the store (deployment statuses, running rollouts).
Every per-deployment series carries ``model`` (its name), ``deployment`` (its name) and
``environment`` (the environment that points at it: ``production`` first, else the first
by name; empty when none does).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kingpost.engines import ReplicaPhase
from kingpost.metrics.events import COLD_START_BUCKETS
from kingpost.metrics.gateway import gateway_families
from kingpost.metrics.replicas import Scrape, scrape_replicas
from kingpost.metrics.text import Family, render
from kingpost.store import (
    DeploymentStatus,
    DeploymentView,
    DesiredState,
    EnvironmentView,
    ModelView,
)

if TYPE_CHECKING:
    from kingpost.controller.loop import Controller
    from kingpost.store import Store

__all__ = ["METRICS_KEY", "DeploymentLabels", "collect", "deployment_labels", "exposition"]

METRICS_KEY = "kingpost_metrics_endpoint"
"""``docker_server``'s key (a Kingpost extension) naming a custom server's metrics path."""


@dataclass(frozen=True)
class DeploymentLabels:
    model: str
    deployment: str
    environment: str

    def as_dict(self) -> dict[str, str]:
        return {"model": self.model, "deployment": self.deployment, "environment": self.environment}


def deployment_labels(
    models: list[ModelView], deployments: list[DeploymentView], environments: list[EnvironmentView]
) -> dict[str, DeploymentLabels]:
    names = {m.id: m.name for m in models}
    envs: dict[str, list[str]] = {}
    for env in environments:
        if env.deployment_id is not None:
            envs.setdefault(env.deployment_id, []).append(env.name)
    labels = {}
    for d in deployments:
        mine = sorted(envs.get(d.id, ()))
        name = "production" if "production" in mine else (mine[0] if mine else "")
        labels[d.id] = DeploymentLabels(names.get(d.model_id, d.model_id), d.name, name)
    return labels


def exposition(controller: Controller, store: Store) -> str:
    """The whole scrape: the platform's families, then the replicas' own."""
    return render(collect(controller, store, replicas=True))


def collect(controller: Controller, store: Store, *, replicas: bool = False) -> list[Family]:
    models, deployments, environments = store.routing_snapshot()
    labels = deployment_labels(models, deployments, environments)

    def of(dep_id: str) -> dict[str, str]:
        found = labels.get(dep_id)
        return found.as_dict() if found else {"model": "", "deployment": dep_id, "environment": ""}

    families: list[Family] = []
    families += gateway_families(controller.fresh_gateway_stats(), of)
    families += _replicas(controller, of)
    families += _deployments(controller, store, deployments, labels, of)
    families += _controller(controller)
    if replicas:
        families += scrape_replicas(_scrape_targets(controller, deployments, of))
    return families


def _scrape_targets(
    controller: Controller, deployments: list[DeploymentView], of: Callable[[str], dict[str, str]]
) -> list[Scrape]:
    """Ready replicas of model classes (``/metrics``) and of custom servers whose config
    names ``docker_server.kingpost_metrics_endpoint`` (that path; other custom servers are
    not asked: see replicas.py)."""
    paths: dict[str, str | None] = {}
    for d in deployments:
        server = d.config.get("docker_server")
        if not server:
            paths[d.id] = "/metrics"
        else:  # a custom server: only where its config names a path
            path = server.get(METRICS_KEY) if isinstance(server, dict) else None
            paths[d.id] = path if isinstance(path, str) else None
    return [
        Scrape(r.replica_id, of(r.deployment_id), r.endpoint, path)
        for r in controller.current_replicas()
        if r.phase == ReplicaPhase.READY
        and r.endpoint is not None
        and (path := paths.get(r.deployment_id, "/metrics")) is not None
    ]


def _replicas(controller: Controller, of: Callable[[str], dict[str, str]]) -> list[Family]:
    counts = Family("kingpost_replicas", "gauge", "Replicas by state, as the engines report them.")
    by: dict[tuple[str, ReplicaPhase], int] = {}
    for r in controller.current_replicas():
        by[(r.deployment_id, r.phase)] = by.get((r.deployment_id, r.phase), 0) + 1
    deps = sorted({d for d, _ in by})
    for dep_id in deps:
        for phase in ReplicaPhase:
            if phase != ReplicaPhase.STOPPED:
                counts.add({**of(dep_id), "state": phase.value}, by.get((dep_id, phase), 0))
    starts = Family("kingpost_replica_starts_total", "counter", "Replicas started.")
    restarts = Family(
        "kingpost_replica_restarts_total", "counter", "Restarts the engines made of replicas."
    )
    failures = Family(
        "kingpost_replica_failures_total", "counter", "Replicas the engines gave up on."
    )
    cold = Family(
        "kingpost_cold_starts_total",
        "counter",
        "Times a deployment went from no ready replica to one (launched while it had none).",
    )
    cold_s = Family(
        "kingpost_cold_start_duration_seconds",
        "histogram",
        "From the launch of the replica that ended a cold start to its readiness.",
    )
    for dep_id, ev in sorted(controller.replica_events.snapshot().items()):
        lab = of(dep_id)
        starts.add(lab, ev.starts)
        restarts.add(lab, ev.restarts)
        failures.add(lab, ev.failures)
        cold.add(lab, ev.cold_starts)
        cold_s.histogram(lab, COLD_START_BUCKETS, ev.cold_start_buckets, ev.cold_start_sum_s)
    return [counts, starts, restarts, failures, cold, cold_s]


def _deployments(
    controller: Controller,
    store: Store,
    deployments: list[DeploymentView],
    labels: dict[str, DeploymentLabels],
    of: Callable[[str], dict[str, str]],
) -> list[Family]:
    status = Family(
        "kingpost_deployment_status",
        "gauge",
        "1 for the status each deployment has (deleted deployments are left out).",
    )
    for dep in deployments:
        if dep.status != DeploymentStatus.DELETED and dep.desired_state != DesiredState.DELETED:
            status.add({**of(dep.id), "status": dep.status.value}, 1)
    build = Family(
        "kingpost_build_duration_seconds",
        "gauge",
        "How long each deployment's last build took (or has run so far), by its state.",
    )
    for dep_id, (state, took) in sorted(controller.build_durations().items()):
        if dep_id in labels:
            build.add({**of(dep_id), "state": state.value}, took)
    mirrored = Family("kingpost_weights_mirror_bytes", "gauge", "Bytes of weights mirrored so far.")
    mirror_total = Family(
        "kingpost_weights_mirror_total_bytes", "gauge", "Bytes of weights a mirror needs."
    )
    mirror_s = Family(
        "kingpost_weights_mirror_duration_seconds",
        "gauge",
        "How long the deployment's weights mirror took (or has taken so far).",
    )
    for dep_id in sorted(labels):
        st = controller.builds.weights_status(dep_id)
        if st is None or not st.bytes_total:
            continue
        lab = {**of(dep_id), "state": str(st.state)}
        mirrored.add(lab, st.bytes_done)
        mirror_total.add(lab, st.bytes_total)
        if st.rate_bytes_per_s > 0:
            mirror_s.add(lab, st.bytes_done / st.rate_bytes_per_s)
    rollout = Family(
        "kingpost_rollout_info",
        "gauge",
        "1 per running rollout, with its status and phase (labels: the candidate deployment).",
    )
    traffic = Family(
        "kingpost_rollout_candidate_traffic_ratio",
        "gauge",
        "Share of the environment's traffic the running rollout's candidate gets (0-1).",
    )
    for ro in store.running_rollouts():
        lab = {**of(ro.candidate_deployment_id), "environment": ro.environment}
        prev = labels.get(ro.previous_deployment_id)
        rollout.add(
            {
                **lab,
                "previous_deployment": prev.deployment if prev else ro.previous_deployment_id,
                "status": ro.status.value,
                "phase": ro.phase,
            },
            1,
        )
        traffic.add(lab, ro.candidate_traffic_percent / 100.0)
    return [status, build, mirrored, mirror_total, mirror_s, rollout, traffic]


def _controller(controller: Controller) -> list[Family]:
    s = controller.stats
    passes = Family(
        "kingpost_reconcile_duration_seconds",
        "summary",
        "Reconcile passes and the time they took.",
    )
    passes.samples.append(("kingpost_reconcile_duration_seconds_sum", {}, s.total_pass_s))
    passes.samples.append(("kingpost_reconcile_duration_seconds_count", {}, s.passes))
    last = Family(
        "kingpost_reconcile_last_duration_seconds", "gauge", "The last reconcile pass's time."
    )
    last.add({}, s.last_pass_s)
    worst = Family(
        "kingpost_reconcile_max_duration_seconds", "gauge", "The longest reconcile pass's time."
    )
    worst.add({}, s.max_pass_s)
    failed = Family("kingpost_reconcile_failures_total", "counter", "Reconcile passes that raised.")
    failed.add({}, s.failed_passes)
    steps = Family(
        "kingpost_reconcile_step_errors_total",
        "counter",
        "Deployment steps that raised (each is logged; the deployment is marked FAILED).",
    )
    steps.add({}, s.step_errors)
    return [passes, last, worst, failed, steps]
