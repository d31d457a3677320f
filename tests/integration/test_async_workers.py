"""The control plane's async workers (asyncq/worker.py) on a real SQLite store, running
their requests on a real HTTP server that stands in for the gateway and holds each run
as the case needs: what happens to a request picked to start next when, before it
starts, a cancel reaches it or its wait runs out."""

from __future__ import annotations

import asyncio
import contextlib
import json
import select
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from test_async_store import sqlite_queue

from helpers.platform import wait_for
from kingpost.asyncq.body import AsyncInput
from kingpost.asyncq.worker import AsyncWorkers, Capacity, WorkerSettings
from kingpost.store.asyncq import AsyncQueue
from kingpost.store.models import AsyncStatus, utcnow


@dataclass
class Gate:
    """What reached the stand-in gateway, and the switch that lets a held run answer."""

    seen: list[str] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    cut: list[str] = field(default_factory=list)
    """Runs whose connection closed before their answer."""


def handler_for(gate: Gate) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            rid = self.headers["x-baseten-request-id"]
            key = json.loads(self.rfile.read(int(self.headers["content-length"])))["key"]
            gate.seen.append(rid)
            if key == "hold":  # answers when the test says so
                gate.release.wait(30)
            elif key == "watch":  # answers only if its client stays 5 s
                ready, _, _ = select.select([self.connection], [], [], 5)
                if ready and self.connection.recv(1) == b"":
                    gate.cut.append(rid)
                    self.close_connection = True
                    return
            body = json.dumps({"echo": key}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    return Handler


@pytest.fixture
def gate() -> Iterator[tuple[Gate, int]]:
    g = Gate()
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_for(g))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield g, server.server_address[1]
    finally:
        g.release.set()
        server.shutdown()
        server.server_close()


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[AsyncQueue]:
    with sqlite_queue(tmp_path) as q:
        yield q


class Clock:
    def __init__(self) -> None:
        self.now = utcnow()

    def __call__(self) -> datetime:
        return self.now


@contextlib.contextmanager
def running_workers(
    queue: AsyncQueue,
    port: int,
    clock: Clock,
    deployments: tuple[str, ...] = ("d1",),
    poll_s: float = 0.05,
    backlog: Callable[[dict[str, int]], None] = lambda _: None,
    count_every_s: float = 0.5,
) -> Iterator[AsyncWorkers]:
    """The workers on ``queue`` against the stand-in gateway, one slot per deployment;
    stopped after."""
    settings = WorkerSettings(
        gateway_url=f"http://127.0.0.1:{port}",
        key="k",
        share=1.0,
        poll_s=poll_s,
        count_every_s=count_every_s,
    )
    capacity = {dep: Capacity(f"m-{dep}", 1, 1) for dep in deployments}
    workers = AsyncWorkers(queue, settings, capacity=lambda: capacity, backlog=backlog, clock=clock)
    workers.start()
    try:
        yield workers
    finally:
        workers.stop()


@contextlib.contextmanager
def past_the_held_run(
    queue: AsyncQueue,
    gate: tuple[Gate, int],
    clock: Clock,
    held: str,
    run_on: AsyncQueue | None = None,
    poll_s: float = 30.0,
) -> Iterator[AsyncWorkers]:
    """The workers on ``run_on`` (else ``queue``), once the held run reached the gateway
    and was claimed; stopped after. One slot, and by default a poll every 30 s: no tick
    comes but those the runs ask for."""
    g, port = gate
    with running_workers(run_on or queue, port, clock, poll_s=poll_s) as workers:
        wait_for(lambda: g.seen == [held], 10, "the held run to reach the gateway")
        wait_for(lambda: queue.get(held).status == AsyncStatus.IN_PROGRESS, 10, "its claim")
        yield workers


def put(queue: AsyncQueue, key: str, clock: Clock, ago: float, **kw: object) -> str:
    inp = AsyncInput(model_input=json.dumps({"key": key}), **kw)  # type: ignore[arg-type]
    at = clock.now - timedelta(seconds=ago)  # the older runs first
    return queue.enqueue(inp, model_id="m1", deployment_id="d1", now=at)


def test_a_request_canceled_after_its_pick_is_cut_off_when_it_starts(
    queue: AsyncQueue, gate: tuple[Gate, int]
) -> None:
    g, _ = gate
    clock = Clock()
    held, picked = put(queue, "hold", clock, 2), put(queue, "watch", clock, 1)
    with past_the_held_run(queue, gate, clock, held):
        # The workers picked the next request already; a cancel reaches it first.
        assert queue.cancel(picked).status == AsyncStatus.CANCELED
        g.release.set()  # the held run ends; its slot starts the pick before any settle
        wait_for(lambda: g.cut == [picked], 10, "the canceled run to be cut off")
        wait_for(lambda: queue.get(held).status == AsyncStatus.SUCCEEDED, 10, "the held run")
    got = queue.get(picked)
    assert (got.status, got.result, got.attempts) == (AsyncStatus.CANCELED, None, 0)
    assert g.seen == [held, picked]


def test_a_request_past_its_wait_since_its_pick_does_not_start(
    queue: AsyncQueue, gate: tuple[Gate, int]
) -> None:
    g, _ = gate
    clock = Clock()
    held = put(queue, "hold", clock, 2)
    late = put(queue, "plain", clock, 1, max_time_in_queue_seconds=10)
    with past_the_held_run(queue, gate, clock, held):
        clock.now += timedelta(seconds=10)  # the pick's next request waited too long
        g.release.set()
        wait_for(lambda: queue.get(late).status == AsyncStatus.EXPIRED, 10, "the expiry")
        assert queue.get(held).status == AsyncStatus.SUCCEEDED
    assert g.seen == [held]  # never started


class HeldSettle(AsyncQueue):
    """A queue whose next settle, once armed, returns only when the test lets it: the
    loop goes on meanwhile, as it does while a settle waits on the database."""

    def __init__(self, queue: AsyncQueue) -> None:
        super().__init__(queue.db)
        self.armed = False
        self.inside = threading.Event()
        self.let_go = threading.Event()

    def settle(self, *args: Any, **kw: Any) -> Any:
        got = super().settle(*args, **kw)
        if self.armed:
            self.armed = False
            self.inside.set()
            self.let_go.wait(10)
        return got

    @contextlib.contextmanager
    def let_go_at_the_end(self) -> Iterator[None]:
        """Inside the workers' block: a settle held would keep them from stopping."""
        try:
            yield
        finally:
            self.let_go.set()
            self.close()


def test_a_request_started_while_a_settle_read_it_as_queued_runs_once(
    queue: AsyncQueue, gate: tuple[Gate, int]
) -> None:
    g, _ = gate
    clock = Clock()
    held, picked = put(queue, "hold", clock, 2), put(queue, "plain", clock, 1)
    q = HeldSettle(queue)
    with (
        past_the_held_run(queue, gate, clock, held, run_on=q, poll_s=0.1),
        q.let_go_at_the_end(),
    ):
        q.armed = True
        assert q.inside.wait(10)  # a settle read the pick, `picked` still QUEUED in it
        g.release.set()  # the held run ends: its slot starts `picked` from the last pick
        wait_for(lambda: g.seen == [held, picked], 10, "the picked run")
        q.let_go.set()  # the settle's pick names `picked` again: not started twice
        wait_for(lambda: queue.get(picked).status == AsyncStatus.SUCCEEDED, 10, "its record")
        time.sleep(0.3)  # a second start would have reached the gateway by now
    assert g.seen == [held, picked]
    assert queue.get(picked).attempts == 1


def test_work_accepted_between_counts_is_found_by_the_next_poll(
    queue: AsyncQueue, gate: tuple[Gate, int]
) -> None:
    """The queue is counted (the autoscaler's backlog) once per ``count_every_s``; the
    polls between ask which deployments have work, and a request accepted then runs."""
    g, port = gate
    clock = Clock()
    first = put(queue, "plain", clock, 1)
    counts: list[dict[str, int]] = []
    once = {"count_every_s": 3600.0}  # the count at start, then none
    with running_workers(queue, port, clock, ("d1", "d2"), backlog=counts.append, **once):
        wait_for(lambda: queue.get(first).status == AsyncStatus.SUCCEEDED, 10, "the first run")
        time.sleep(0.2)  # polls, none of them counting
        later = queue.enqueue(
            AsyncInput(model_input=json.dumps({"key": "plain"})),
            model_id="m-d2",
            deployment_id="d2",
            now=clock.now,
        )
        wait_for(lambda: queue.get(later).status == AsyncStatus.SUCCEEDED, 10, "the later run")
    assert counts == [{"d1": 1}]
    assert g.seen == [first, later]


def test_the_backlog_is_counted_again_as_the_queue_drains(
    queue: AsyncQueue, gate: tuple[Gate, int]
) -> None:
    """The autoscaler's backlog follows the queue: counted again every ``count_every_s``,
    it is empty once the work ran (a backlog left standing would hold replicas up)."""
    _, port = gate
    clock = Clock()
    rid = put(queue, "plain", clock, 1)
    counts: list[dict[str, int]] = []
    with running_workers(queue, port, clock, backlog=counts.append, count_every_s=0.1):
        wait_for(lambda: queue.get(rid).status == AsyncStatus.SUCCEEDED, 10, "the run")
        wait_for(lambda: counts and counts[-1] == {}, 5, "an empty backlog")
    assert counts[0] == {"d1": 1}


def idle_workers(queue: AsyncQueue, caps: dict[str, Capacity]) -> AsyncWorkers:
    """Workers never started: their steps are called one at a time."""
    settings = WorkerSettings(gateway_url="http://127.0.0.1:9", key="k", share=1.0)
    return AsyncWorkers(queue, settings, capacity=lambda: caps)


def test_the_pick_grows_with_the_runs_that_ended_and_shrinks_again(queue: AsyncQueue) -> None:
    """A tick picks two per slot, more after many runs ended since the last (what ends
    before the next pick lands), and two again once that count is used; an inactive
    deployment gets no pick, only its expiry read."""
    w = idle_workers(queue, {"d1": Capacity("m1", 1, 8), "d2": Capacity("m2", 1, 8, False)})
    w._queued = {"d1", "d2"}
    assert w._wants(expire=False) == {"d1": (16, 24), "d2": (0, 8)}
    w._ended = {"d1": 20, "d2": 5}
    assert w._wants(expire=True) == {"d1": (48, 112), "d2": (0, 64)}
    assert w._wants(expire=False)["d1"] == (16, 24)


@pytest.mark.parametrize(
    ("status", "body", "counted"),
    [
        (200, b'{"echo": 1}', 1),
        (500, b"boom", 1),  # a model error ran: it counts
        (429, b'{"code": "overloaded"}', 0),  # the gateway turned it away: nothing ran
        (503, b'{"code": "unavailable"}', 0),
    ],
)
def test_a_run_counts_toward_the_next_pick_only_when_it_ran(
    queue: AsyncQueue, status: int, body: bytes, counted: int
) -> None:
    w = idle_workers(queue, {})
    view = queue.get(put(queue, "plain", Clock(), 1)).claimed(utcnow())

    async def call(*_: object) -> tuple[int, dict[str, str], bytes, str]:
        return status, {"content-type": "application/json"}, body, ""

    w._call = call  # type: ignore[method-assign]
    w._running["d1"] = 1
    asyncio.run(w._run(view, "m1"))
    assert len(w._outcomes) == 1
    assert w._ended == ({"d1": 1} if counted else {})


def test_a_settle_that_fails_starts_nothing_from_its_last_pick(queue: AsyncQueue) -> None:
    """Runs started from a pick no settle follows would go unclaimed: the pick is dropped,
    the outcomes and claims wait for the next settle."""
    w = idle_workers(queue, {"d1": Capacity("m1", 1, 8)})
    picked = queue.get(put(queue, "plain", Clock(), 1))
    w._ready = {"d1": deque([picked])}
    w._outcomes = [("r-done", {"status": "SUCCEEDED"})]
    w._claims = [("r-claimed", utcnow())]

    def broken(*_: object) -> object:
        raise OSError("the store is gone")

    w.queue.settle = broken  # type: ignore[method-assign]
    with pytest.raises(OSError, match="the store is gone"):
        asyncio.run(w._settle(expire=False))
    assert w._ready == {}
    assert [rid for rid, _ in w._outcomes] == ["r-done"]
    assert [rid for rid, _ in w._claims] == ["r-claimed"]


def test_the_control_planes_workers_count_once_per_reconcile_pass(tmp_path: Path) -> None:
    """``kingpost server``'s workers count the backlog as often as the autoscaler samples
    it (twice a second at least), and the routing table learns the hash of their
    in-memory key."""
    from types import SimpleNamespace

    from kingpost.asyncq.plane import prepare_async_workers
    from kingpost.settings import Settings
    from kingpost.store.db import Database

    db = Database(f"sqlite:///{tmp_path / 'k.db'}")
    db.migrate()
    controller = SimpleNamespace(routing=SimpleNamespace(internal_key_hashes=frozenset()))
    try:
        settings = Settings(home=tmp_path / "home", reconcile_interval=0.25)
        workers = prepare_async_workers(
            settings,
            SimpleNamespace(db=db, box=None),  # type: ignore[arg-type]
            controller,  # type: ignore[arg-type]
        )
        assert workers.settings.count_every_s == 0.25
        assert len(controller.routing.internal_key_hashes) == 1
        slow = Settings(home=tmp_path / "home", reconcile_interval=5.0)
        again = prepare_async_workers(slow, SimpleNamespace(db=db, box=None), controller)  # type: ignore[arg-type]
        assert again.settings.count_every_s == 0.5  # a backlog never older than that
    finally:
        db.close()


@pytest.mark.parametrize(
    "url",
    [
        "https://h.example:99999/h",  # ValueError from the port
        "https://h.example:abc/h",
        "https://" + "a" * 64 + ".example/h",  # UnicodeError from the resolver (IDNA)
        "https://[::1]x/h",  # a URL httpx refuses
    ],
)
def test_a_webhook_no_delivery_can_use_is_refused_for_good(queue: AsyncQueue, url: str) -> None:
    """Kept before accepts checked port and host, such a URL raised in every delivery
    before anything was recorded: PENDING, no attempt counted, due at every poll
    forever (and 64 of them held up every other webhook)."""
    rid = queue.enqueue(AsyncInput("{}", webhook_endpoint=url), model_id="m1", deployment_id="d1")
    queue.claim([rid])
    assert queue.succeed(rid, '{"ok":1}')
    w = idle_workers(queue, {})
    asyncio.run(deliver_due(w))
    got = queue.get(rid)
    assert (got.status, got.webhook_attempts) == (AsyncStatus.WEBHOOK_FAILED, 1)
    assert got.webhook_error.startswith("refused:"), got.webhook_error
    assert queue.due_webhooks(utcnow() + timedelta(days=1)) == []


def test_a_delivery_that_raises_still_counts_its_attempt(queue: AsyncQueue) -> None:
    """Whatever raises in a delivery (here the payload: a result that is not JSON), the
    attempt is recorded and retried with backoff, then failed for good."""
    rid = queue.enqueue(
        AsyncInput("{}", webhook_endpoint="https://h.example/h"), model_id="m1", deployment_id="d1"
    )
    queue.claim([rid])
    assert queue.succeed(rid, "not json")
    w = idle_workers(queue, {})
    w.settings = WorkerSettings(gateway_url="http://127.0.0.1:9", key="k", webhook_attempts=2)
    asyncio.run(deliver_due(w))
    got = queue.get(rid)
    assert (got.webhook_status.value, got.webhook_attempts) == ("PENDING", 1)
    assert "the delivery failed" in got.webhook_error
    assert queue.due_webhooks(utcnow()) == []  # backing off, not due at every poll
    asyncio.run(deliver_due(w, utcnow() + timedelta(minutes=5)))
    got = queue.get(rid)
    assert (got.status, got.webhook_attempts) == (AsyncStatus.WEBHOOK_FAILED, 2)


async def deliver_due(w: AsyncWorkers, now: datetime | None = None) -> None:
    """One poll's webhooks, waited for."""
    import httpx

    if now is not None:
        w._clock = lambda: now
    async with httpx.AsyncClient() as client:
        w._hooks = client
        await w._webhooks()
        await asyncio.gather(*w._tasks)


def test_requests_of_a_deleted_deployment_are_failed_not_left_queued(queue: AsyncQueue) -> None:
    """No tick picks for a deployment missing from the routing table (deleted): its
    queued requests stayed QUEUED forever, never expired, their webhooks never sent.
    After ``GONE_AFTER`` missing they are recorded FAILED; a deployment in the table,
    even an inactive one, keeps its queue."""
    clock = Clock()
    inp = AsyncInput(model_input="{}")
    gone = queue.enqueue(inp, model_id="m1", deployment_id="deleted", now=clock.now)
    kept = queue.enqueue(inp, model_id="m1", deployment_id="inactive", now=clock.now)
    caps = {"inactive": Capacity("m1", 0, 1, runnable=False)}
    settings = WorkerSettings(
        gateway_url="http://127.0.0.1:9", key="k", poll_s=0.02, count_every_s=0.02
    )
    w = AsyncWorkers(queue, settings, capacity=lambda: caps, clock=clock)
    w.start()
    try:
        time.sleep(0.3)  # counted: the deployment is seen missing
        assert queue.get(gone).status == AsyncStatus.QUEUED  # missing a moment: kept
        clock.now += timedelta(seconds=31)
        wait_for(lambda: queue.get(gone).status == AsyncStatus.FAILED, 10, "FAILED")
    finally:
        w.stop()
    errors = queue.get(gone).errors
    assert errors[0]["code"] == "MODEL_DOES_NOT_EXIST" and "deleted" in errors[0]["message"]
    assert queue.get(kept).status == AsyncStatus.QUEUED
