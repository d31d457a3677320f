"""How fast the async workers' design can drain with the store's cost taken out.

`bench/async.py` measures the whole path: the store's claims, outcomes and picks, the
control plane's hop to the gateway, the gateway, the replica. This one keeps all of it
but the store: :class:`AsyncWorkers` run here, in this process, against a real ``kingpost
server``'s gateway and one replica of ``examples/echo-server`` (8 slots), with an
in-memory queue (:class:`MemoryQueue`) whose settle only hands out the next ids. What it
drains is the ceiling of runs that go through an HTTP hop to the gateway, whatever the
store does; against the sync rate of the same replica (wrk, 8 connections), it says how
far a faster store alone could take async toward sync. A little more than that: the
workers here share their GIL with nothing else, where in ``kingpost server`` they share
it with the control plane's other threads.

    .venv/bin/python bench/async_ceiling.py [--rounds 3] [--seconds 4] [--json out.json]

Each round measures sync, then the drain (after a 2 s warm-up, the runs recorded over
``--seconds``); the report gives each figure's median and spread (min-max).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Collection, Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

from helpers.platform import Platform  # noqa: E402
from kingpost.asyncq.body import AsyncInput  # noqa: E402
from kingpost.asyncq.worker import AsyncWorkers, Capacity, WorkerSettings  # noqa: E402
from kingpost.store.asyncq import AsyncQueue, AsyncRequestView, Settled  # noqa: E402
from kingpost.store.db import Database  # noqa: E402
from kingpost.store.models import utcnow  # noqa: E402

_bench = __import__("async")  # bench/async.py: its push and sync measure
SLOTS = 8


class MemoryQueue:
    """What the workers ask of :class:`AsyncQueue`, in memory: an endless queue of copies
    of ``template``; a settle counts the outcomes and names the next ones."""

    succeeded_values = staticmethod(AsyncQueue.succeeded_values)
    failed_values = staticmethod(AsyncQueue.failed_values)
    retry_values = staticmethod(AsyncQueue.retry_values)
    release_values = staticmethod(AsyncQueue.release_values)

    def __init__(self, template: AsyncRequestView) -> None:
        self._template = template
        self._ids = itertools.count()
        self._queue: deque[str] = deque()
        """The front of an endless queue, refilled as it is claimed."""
        self._claimed: set[str] = set()
        self._refill()
        self._lock = threading.Lock()
        self.recorded = 0
        self.failed = 0

    def _refill(self) -> None:
        while len(self._queue) < 4096:
            self._queue.append(f"mem-{next(self._ids)}")

    def requeue_in_progress(self, now: datetime) -> int:
        return 0

    def depths(self) -> dict[str, tuple[int, int]]:
        return {self._template.deployment_id: (len(self._queue), 0)}

    def queued_in(self, deployment_ids: Collection[str]) -> set[str]:
        return {self._template.deployment_id}  # never empty

    def due_webhooks(self, now: datetime, limit: int = 32) -> list[AsyncRequestView]:
        return []

    def sweep(self, retention: timedelta, now: datetime | None = None) -> int:
        return 0

    def settle(
        self,
        outcomes: Sequence[tuple[str, dict[str, Any]]],
        claims: Sequence[tuple[str, datetime]],
        wants: Mapping[str, tuple[int, int]],
        now: datetime,
        have: Collection[str] = (),
    ) -> Settled:
        with self._lock:
            self.recorded += len(outcomes)
            self.failed += sum(1 for _, v in outcomes if v.get("status") != "SUCCEEDED")
            self._claimed.update(rid for rid, _ in claims)
            while self._queue and self._queue[0] in self._claimed:
                self._claimed.discard(self._queue.popleft())
            self._refill()
            ready: dict[str, tuple[str, ...]] = {}
            rows: dict[str, AsyncRequestView] = {}
            for dep, (pick, _) in wants.items():
                run: list[str] = []
                for rid in self._queue:
                    if len(run) >= pick:
                        break
                    if rid not in self._claimed:
                        run.append(rid)
                ready[dep] = tuple(run)
                for rid in run:
                    if rid not in have:  # accepted now: never past its wait
                        rows[rid] = dataclasses.replace(self._template, id=rid, created_at=now)
        return Settled(len(outcomes), (), 0, ready, rows)


def template(work: Path, model: str, dep: str) -> AsyncRequestView:
    """One request as the store holds it (the runs' body: bench/async.py's input)."""
    db = Database(f"sqlite:///{work / 'template.db'}")
    try:
        db.migrate()
        queue = AsyncQueue(db)
        body = AsyncInput(model_input=json.dumps(_bench.INPUT))
        rid = queue.enqueue(body, model_id=model, deployment_id=dep, now=utcnow())
        return queue.get(rid)
    finally:
        db.close()


def drain(platform: Platform, view: AsyncRequestView, seconds: float) -> float:
    queue = MemoryQueue(view)
    settings = WorkerSettings(gateway_url=platform.gateway_url, key=platform.api_key, share=1.0)
    capacity = {view.deployment_id: Capacity(view.model_id, 1, SLOTS)}
    workers = AsyncWorkers(queue, settings, capacity=lambda: capacity)  # type: ignore[arg-type]
    workers.start()
    try:
        time.sleep(2.0)
        before, start = queue.recorded, time.monotonic()
        time.sleep(seconds)
        ran, took = queue.recorded - before, time.monotonic() - start
    finally:
        workers.stop()
    if queue.failed:
        raise SystemExit(f"{queue.failed} run(s) did not succeed: see the server's log")
    return ran / took


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    rounds: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="kp-bench-ceiling-") as tmp:
        work = Path(tmp)
        platform = Platform(work / "home", extra_env={"KINGPOST_ASYNC_SHARE": "1"})
        platform.env.pop("PYTHONPATH", None)
        platform.start()
        try:
            model, dep = _bench.push(platform, work / "project", 0.0)
            view = template(work, model, dep)
            for _ in range(args.rounds):
                sync = _bench.sync_rps(platform, model, args.seconds)
                got = drain(platform, view, args.seconds)
                rounds.append({"sync_rps": sync, "memory_drain_rps": got, "ratio": got / sync})
                print(json.dumps(rounds[-1]), file=sys.stderr, flush=True)
        finally:
            platform.stop()
    report: dict[str, Any] = {
        "rounds": rounds,
        "load_average": os.getloadavg(),
        "summary": {
            key: {
                "median": round(statistics.median(r[key] for r in rounds), 3),
                "min": round(min(r[key] for r in rounds), 3),
                "max": round(max(r[key] for r in rounds), 3),
            }
            for key in ("sync_rps", "memory_drain_rps", "ratio")
        },
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
