"""Scraping replicas' own /metrics is bounded: a replica that never answers costs the scrape
its deadline, not more, and the others' figures are still there (real sockets)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from kingpost.engines import Endpoint
from kingpost.metrics.replicas import Scrape, scrape_replicas

BODY = b"# HELP up_total Ups.\n# TYPE up_total counter\nup_total 3\n"


@pytest.fixture
def servers() -> Iterator[tuple[int, int]]:
    """(a port that answers metrics, a port that accepts and never answers)."""
    fast, slow = socket.create_server(("127.0.0.1", 0)), socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()
    held: list[socket.socket] = []

    def serve_fast() -> None:
        fast.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = fast.accept()
            except TimeoutError:
                continue
            with conn:
                conn.recv(4096)
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n" + BODY)

    def serve_slow() -> None:
        slow.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(slow.accept()[0])  # kept open, never answered
            except TimeoutError:
                continue

    threads = [threading.Thread(target=serve_fast), threading.Thread(target=serve_slow)]
    for t in threads:
        t.start()
    try:
        yield fast.getsockname()[1], slow.getsockname()[1]
    finally:
        stop.set()
        for t in threads:
            t.join()
        for s in [fast, slow, *held]:
            s.close()


def test_a_hung_replica_costs_the_deadline_and_the_others_are_kept(
    servers: tuple[int, int],
) -> None:
    fast, slow = servers
    labels = {"model": "m", "deployment": "d", "environment": "production"}
    targets = [
        Scrape("r-fast", labels, Endpoint("127.0.0.1", fast)),
        Scrape("r-slow", labels, Endpoint("127.0.0.1", slow)),
    ]
    started = time.monotonic()
    families = scrape_replicas(targets, timeout_s=0.5)
    took = time.monotonic() - started
    assert took < 1.5  # the deadline (0.5 s) and some slack, never the hung replica's time
    samples = {(n, lab.get("replica")): v for f in families for n, lab, v in f.samples}
    assert samples[("up_total", "r-fast")] == 3
    assert ("up_total", "r-slow") not in samples
    assert samples[("kingpost_replica_scrape_ok", "r-fast")] == 1
    assert samples[("kingpost_replica_scrape_ok", "r-slow")] == 0


def test_scrapes_still_queued_at_the_deadline_count_as_failed(servers: tuple[int, int]) -> None:
    """More hung replicas than scraping threads: the scrapes still queued at the deadline
    are cancelled, and reading a cancelled one's exception raised CancelledError, which
    made the control plane's whole /metrics a 500. (Each scrape started after the deadline
    still waits its 10 ms floor, so 500 of them on 16 threads outlast the wait.)"""
    _, slow = servers
    labels = {"model": "m", "deployment": "d", "environment": "production"}
    targets = [Scrape(f"r-{i}", labels, Endpoint("127.0.0.1", slow)) for i in range(500)]
    started = time.monotonic()
    families = scrape_replicas(targets, timeout_s=0.3)
    assert time.monotonic() - started < 1.5
    ok = {lab["replica"]: v for f in families for n, lab, v in f.samples if n.endswith("_ok")}
    assert ok == {t.replica_id: 0 for t in targets}
