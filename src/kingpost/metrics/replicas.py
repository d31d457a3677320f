"""The replicas' own metrics, scraped at each scrape of the control plane and re-exposed
with the replica's labels, so one scrape target covers the platform and every model.

A model-class replica's ``/metrics`` holds the model server's figures and the model's
``prometheus_client`` registry. Every ready replica is asked at once, each on a thread,
under one deadline (:data:`SCRAPE_TIMEOUT_S`): a slow or hung replica costs the scrape at
most that, and its figures are left out (``kingpost_replica_scrape_ok`` says which).
Custom servers are asked only when their config names a metrics path
(``docker_server.kingpost_metrics_endpoint``, a Kingpost extension), so nothing is sent to
a server that does not expect it.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

from kingpost.engines import Endpoint
from kingpost.metrics.text import Family
from kingpost.netns import socket_in_netns

__all__ = ["SCRAPE_TIMEOUT_S", "Scrape", "scrape_replicas"]

SCRAPE_TIMEOUT_S = 2.0
MAX_BYTES = 8 * 1024 * 1024
"""A replica's answer past this is cut off and left out."""
_OWN = ("model", "deployment", "environment", "replica")


@dataclass(frozen=True)
class Scrape:
    replica_id: str
    labels: dict[str, str]
    """model, deployment, environment (added to every sample, with ``replica``)."""
    endpoint: Endpoint
    path: str = "/metrics"


def _get(endpoint: Endpoint, path: str, deadline: float) -> str:
    """``GET path`` over HTTP/1.0 (the answer ends with the connection)."""
    if endpoint.netns:
        sock = socket_in_netns(endpoint.netns)
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with sock:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        sock.connect((endpoint.host, endpoint.port))
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: replica\r\n\r\n".encode())
        chunks: list[bytes] = []
        size = 0
        while True:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = sock.recv(65536)
            if not data:
                break
            size += len(data)
            if size > MAX_BYTES:
                raise ValueError(f"answer over {MAX_BYTES} bytes")
            chunks.append(data)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    status = head.split(b" ", 2)[1] if head.count(b" ") >= 1 else b""
    if status != b"200":
        raise ValueError(f"HTTP {status.decode('latin-1') or '?'}")
    return body.decode("utf-8", "replace")


def _relabel(text: str, extra: dict[str, str], into: dict[str, Family]) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(text):
        samples = [s for s in fam.samples if not s.name.endswith("_created")]
        if not samples:
            continue
        name = fam.name
        if fam.type == "counter" and all(s.name == f"{name}_total" for s in samples):
            name = f"{name}_total"
        kind = fam.type if fam.type in ("counter", "gauge", "histogram", "summary") else "untyped"
        out = into.get(name)
        if out is None:
            out = into[name] = Family(name, kind, fam.documentation or name)
        for s in samples:
            labels = {(f"exported_{k}" if k in _OWN else k): v for k, v in s.labels.items()}
            out.samples.append((s.name, {**extra, **labels}, float(s.value)))


def scrape_replicas(targets: Sequence[Scrape], timeout_s: float = SCRAPE_TIMEOUT_S) -> list[Family]:
    """Every target's figures with its labels, merged by family; the targets that did not
    answer in time (or not with metrics) are 0 in ``kingpost_replica_scrape_ok``."""
    ok = Family(
        "kingpost_replica_scrape_ok",
        "gauge",
        "1 when the replica's own /metrics was read in this scrape, else 0.",
    )
    if not targets:
        return [ok]
    deadline = time.monotonic() + timeout_s
    pool = ThreadPoolExecutor(max_workers=min(16, len(targets)), thread_name_prefix="kp-scrape")
    try:
        futures = {pool.submit(_get, t.endpoint, t.path, deadline): t for t in targets}
        wait(futures, timeout=timeout_s + 0.1)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    families: dict[str, Family] = {}
    for future, t in futures.items():
        extra = {**t.labels, "replica": t.replica_id}
        text = _answer(future)
        good = text is not None
        if text is not None:
            try:
                _relabel(text, extra, families)
            except Exception:  # not Prometheus text: left out
                good = False
        ok.add(extra, 1 if good else 0)
    return [*families.values(), ok]


def _answer(future: Future[str]) -> str | None:
    """The text a scrape got in time, or None: still running, failed, or cancelled (queued
    behind slow replicas when the deadline came; ``exception()`` on a cancelled future
    raises, which failed the whole ``/metrics`` answer)."""
    if not future.done() or future.cancelled() or future.exception() is not None:
        return None
    return future.result()
