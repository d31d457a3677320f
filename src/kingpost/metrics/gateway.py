"""The gateway's families, rendered by both scrape targets that show them: the control
plane's ``/metrics`` (:mod:`kingpost.metrics.platform`, with the store's labels) and the
gateway's own (``KINGPOST_GATEWAY_METRICS_LISTEN``, :func:`gateway_exposition`), which
reads every worker's control socket and labels deployments from the routing table they
hold, so it keeps answering while no control plane runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from kingpost.errors import KingpostError
from kingpost.gateway.control import fetch_stats
from kingpost.gateway.stats import LATENCY_BUCKETS, GatewayStats, merge_snapshots
from kingpost.metrics.text import Family, render

__all__ = ["gateway_exposition", "gateway_families"]

log = logging.getLogger(__name__)


def gateway_exposition(sockets: Sequence[Path], timeout_s: float = 2.0) -> str:
    """The gateway's own scrape: every worker's figures (``GET /stats`` on its control
    socket), merged as the control plane merges them. A worker that does not answer is
    left out (``kingpost_gateway_workers`` counts those that did)."""
    snapshots = []
    for sock in sockets:
        try:
            snapshots.append(fetch_stats(sock, timeout=timeout_s))
        except KingpostError as exc:
            log.warning("gateway /metrics: worker %s left out: %s", sock, exc)
    merged = merge_snapshots(snapshots)

    def of(dep_id: str) -> dict[str, str]:
        found = merged.labels.get(dep_id)
        return dict(found) if found else {"model": "", "deployment": dep_id, "environment": ""}

    return render(gateway_families(merged, of))


def gateway_families(
    stats: GatewayStats | None, of: Callable[[str], dict[str, str]]
) -> list[Family]:
    """The gateway's families from its merged figures; ``of``: a deployment id's labels."""
    requests = Family(
        "kingpost_requests_total",
        "counter",
        "Answers the gateway gave, by route kind and status class (none: the client left "
        "before an answer).",
    )
    duration = Family(
        "kingpost_request_duration_seconds",
        "histogram",
        "End-to-end time at the gateway, from the request parsed to its answer's end.",
    )
    upstream = Family(
        "kingpost_upstream_duration_seconds",
        "histogram",
        "Time a replica took, from the request sent to it to its answer's end.",
    )
    inflight = Family("kingpost_requests_in_flight", "gauge", "Requests with a replica now.")
    queued = Family("kingpost_requests_queued", "gauge", "Requests waiting for a replica slot now.")
    bytes_in = Family(
        "kingpost_request_bytes_total", "counter", "Request body bytes received from clients."
    )
    bytes_out = Family(
        "kingpost_response_bytes_total",
        "counter",
        "Bytes of replicas' answers written to clients.",
    )
    retries = Family(
        "kingpost_retries_total",
        "counter",
        "Requests sent again to another replica after the first hung up without answering.",
    )
    workers = Family(
        "kingpost_gateway_workers", "gauge", "Gateway processes whose figures are merged here."
    )
    control = Family(
        "kingpost_gateway_control_age_seconds",
        "gauge",
        "Seconds since a control plane last pushed the gateway a table (the most over its "
        "workers); it pushes every 5 s, so a larger value means none is running.",
    )
    if stats is None:
        return [workers]
    workers.add({}, stats.workers)
    if stats.control_age_s >= 0:
        control.add({}, round(stats.control_age_s, 3))
    for dep_id, s in sorted(stats.deployments.items()):
        lab = of(dep_id)
        for kind, classes in sorted(s.requests.items()):
            for cls_, n in classes.items():
                if n:
                    requests.add({**lab, "route": kind, "code_class": cls_}, n)
        duration.histogram(lab, LATENCY_BUCKETS, s.latency_buckets, s.latency_sum_s)
        upstream.histogram(lab, LATENCY_BUCKETS, s.upstream_buckets, s.upstream_sum_s)
        inflight.add(lab, s.inflight_total)
        queued.add(lab, s.queued)
        bytes_in.add(lab, s.bytes_in)
        bytes_out.add(lab, s.bytes_out)
        retries.add(lab, s.retries)
    return [
        requests,
        duration,
        upstream,
        inflight,
        queued,
        bytes_in,
        bytes_out,
        retries,
        workers,
        control,
    ]
