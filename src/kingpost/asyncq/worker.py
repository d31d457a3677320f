"""The control plane's async workers: take queued requests per deployment, run them on
replicas through the gateway, record each outcome, deliver webhooks, sweep old results.

One thread with its own event loop (``AsyncWorkers.start``). A run that ends starts the
next request its deployment's pick names (``_ready``) at once, before any store write:
the slot is taken again within the loop's turn. The store learns of it at the next
tick (ticks come ``TICK_MIN_S`` apart or more, and ``poll_s`` apart at most), which in one
transaction (``AsyncQueue.settle``) claims what started since the last one
(QUEUED -> IN_PROGRESS, one more attempt), records the runs that ended and, per
deployment with queued work, reads its queue in scheduling order to pick the next
requests for all its slots and for what ends before the next pick (``pick_size``; the
slots: ``async_slots``, a share, ``KINGPOST_ASYNC_SHARE``, of the ready replicas'
predict slots, so sync predicts keep the rest; both in ``asyncq/policy.py``), expiring
what waited too long; then it starts what free slots allow. Claiming at the start, in
the store, kept each freed slot idle for a tick and its transaction (bench/README.md,
"Async"). The settle runs in a thread, so the runs' answers are read on the loop
meanwhile (on the loop, SQLite's settle held them up; it ran there while a freed slot
waited for it). Beside the ticks, once per ``poll_s``, a poll asks which
deployments have queued work (every ``count_every_s`` it counts it instead and hands the
backlog to the autoscaler as demand, ``backlog``), has the next tick look further for
expired requests and starts due webhooks. Runs go through the gateway's normal routing
(``/models/{m}/deployment/{d}/predict``, with a key that lives only in this process's
memory and the routing table), so they queue fairly with sync requests, wake a
deployment at zero, and reach isolated replicas.

What starts between a pick and its claim: a request a cancel reached first (the claim
finds it CANCELED; its run is cut off, its answer dropped), one that waited past its
``max_time_in_queue_seconds`` since the pick (not started; the expiry records it), and a
request of higher priority accepted after the pick (it waits for the next one, at most a
tick).

Durable: the queue. Soft: which runs are in flight here. On start every IN_PROGRESS row
(a run the last control plane began and never recorded) goes back to the queue, as does
a run started and not yet claimed (its row is still QUEUED); a run's outcome is recorded
only while its row is still IN_PROGRESS, so nothing recorded runs again and nothing is
recorded twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from urllib.parse import urlsplit

import httpx

from kingpost.asyncq.hop import GatewayHop, HopError
from kingpost.asyncq.outcome import Outcome, Verdict, classify, deployment_gone
from kingpost.asyncq.policy import (
    async_slots,
    past_wait,
    pick_size,
    retry_delay_ms,
    webhook_delay_s,
    webhook_retryable,
)
from kingpost.asyncq.webhooks import deliver, payload
from kingpost.store.asyncq import AsyncQueue, AsyncRequestView
from kingpost.store.models import utcnow

__all__ = ["AsyncWorkers", "Capacity", "WorkerSettings"]

log = logging.getLogger(__name__)
NOT_RUN_DELAY = timedelta(seconds=1)
SWEEP_EVERY_S = 3600.0
GONE_AFTER = timedelta(seconds=30)
"""How long a deployment with queued requests must be missing from the routing table
(which lists every deployment not deleted) before they are recorded FAILED: a table
being rebuilt, or not yet pushed, is not a deletion."""
TICK_MIN_S = 0.006
"""A pause between ticks, so runs that end close together share one settle. Runs start
from the pick without a tick (:func:`~kingpost.asyncq.policy.pick_size`). None: a settle
per run that ended, each holding the loop (a 10 ms model's answers waited behind them).
With an echo server, a settle every 6 ms drained 3,600-3,800 requests/s where one every
3 ms drained 3,200: each settle's Python holds the GIL that the runs' answers wait for
(bench/README.md, "Async")."""


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed, as the gateway runs on: a run's hop costs the loop less
    (the drain of an echo server went 8-12% faster; bench/README.md, "Async")."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


@dataclass(frozen=True)
class Capacity:
    """What the routing table says of a deployment."""

    model_id: str
    ready: int
    concurrency: int
    runnable: bool = True
    """False: inactive or gone; its queue waits (and expires)."""


@dataclass(frozen=True)
class WorkerSettings:
    gateway_url: str
    key: str
    """The in-memory key runs authenticate with at the gateway."""
    share: float = 0.5
    poll_s: float = 0.05
    retention: timedelta = timedelta(days=7)
    webhook_attempts: int = 5
    webhook_initial_delay_s: float = 1.0
    own_ports: Collection[int] = ()
    run_timeout_s: float = 3600.0
    """Baseten runs an async request for up to an hour."""
    count_every_s: float = 0.5
    """How often a poll counts the queued requests per deployment: the autoscaler's
    backlog, which it samples once per reconcile pass (``kingpost server`` passes its
    reconcile interval, 0.5 s at most). A count reads every queued request's index entry
    (2-3 ms at 12,000 queued) and ran on every poll, 20 a second; the other polls ask only
    which deployments have any, an index seek each (34 µs for five on SQLite)."""


class AsyncWorkers:
    def __init__(
        self,
        queue: AsyncQueue,
        settings: WorkerSettings,
        *,
        capacity: Callable[[], dict[str, Capacity]],
        backlog: Callable[[dict[str, int]], None] = lambda _: None,
        webhook_secrets: Callable[[], list[str]] = list,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.queue = queue
        self.settings = settings
        self._capacity = capacity
        self._backlog = backlog
        self._secrets = webhook_secrets
        self._clock = clock
        self._running: dict[str, int] = {}
        """Per deployment, runs started and not ended."""
        self._runs: dict[str, asyncio.Task[None]] = {}
        """Per request started and not ended, its run."""
        self._ready: dict[str, deque[AsyncRequestView]] = {}
        """Per deployment, the queued requests to start next (the last settle's pick)."""
        self._claims: list[tuple[str, datetime]] = []
        """Requests started since the last settle: (id, when), claimed by the next one."""
        self._caps: dict[str, Capacity] = {}
        """The routing table's word on each deployment, as of the last tick."""
        self._delivering: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._kick: asyncio.Event | None = None
        self._stop = threading.Event()
        self._swept_at = 0.0
        self._polled_at = -1e9
        self._poll: asyncio.Future[None] | None = None
        """The poll in flight (``_poll_once``), if any."""
        self._expire_due = False
        self._queued: set[str] = set()
        """The deployments with queued work, as of the last poll."""
        self._missing: dict[str, datetime] = {}
        """Deployments with queued work missing from the routing table, since when."""
        self._counted_at = -1e9
        self._outcomes: list[tuple[str, dict[str, object]]] = []
        """Runs ended since the last tick, recorded together (one transaction)."""
        self._ended: dict[str, int] = {}
        """Per deployment, runs that ran and ended since the last pick (how far the next
        one looks); a run the gateway turned away (not run) does not count."""

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        requeued = self.queue.requeue_in_progress(self._clock())
        if requeued:
            log.info("async: %d request(s) in progress at the last stop run again", requeued)
        self._thread = threading.Thread(target=self._main, name="kingpost-async", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        loop, kick = self._loop, self._kick
        if loop is not None and kick is not None:
            loop.call_soon_threadsafe(kick.set)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _main(self) -> None:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._kick = asyncio.Event()
        gateway = urlsplit(self.settings.gateway_url)
        self._hop = GatewayHop(
            gateway.hostname or "127.0.0.1",
            gateway.port or 80,
            timeout=self.settings.run_timeout_s,
            headers=[
                ("authorization", f"Api-Key {self.settings.key}"),
                ("content-type", "application/json"),
                # Retried here per inference_retry_config; a replica that took it and died
                # must not have the gateway run it again behind this worker's back (or,
                # after a control-plane crash, for a worker that is gone).
                ("x-kingpost-no-retry", "1"),
            ],
        )
        # Webhooks go to a checked address (webhooks.deliver): a connection kept for one
        # address must not carry a delivery for another name.
        one_shot = httpx.AsyncClient(
            timeout=httpx.Timeout(30.0),
            follow_redirects=False,
            limits=httpx.Limits(max_keepalive_connections=0),
        )
        async with one_shot as hooks:
            self._hooks = hooks
            while not self._stop.is_set():
                try:
                    await self._tick()
                except Exception:
                    log.exception("async: a worker tick failed")
                await asyncio.sleep(TICK_MIN_S)  # runs that end together share one tick
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._kick.wait(), self.settings.poll_s)
                self._kick.clear()
            pending = [
                *self._tasks,
                *self._runs.values(),
                *([self._poll] if self._poll is not None else []),
            ]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            if self._outcomes:  # ended runs are recorded; cut ones run again next start
                done = self._outcomes
                ended = {rid for rid, _ in done}  # a cut run unclaimed stays QUEUED, uncounted
                claims = [(rid, at) for rid, at in self._claims if rid in ended]
                await asyncio.to_thread(self.queue.settle, done, claims, {}, self._clock())
            await self._hop.aclose()

    def _spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[call-overload]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- one tick -------------------------------------------------------------------------
    async def _tick(self) -> None:
        now = time.monotonic()
        if self._poll is None and now - self._polled_at >= self.settings.poll_s:
            self._polled_at = now
            self._poll = asyncio.ensure_future(self._poll_once(now))
        expire, self._expire_due = self._expire_due, False
        await self._settle(expire=expire)

    async def _poll_once(self, now: float) -> None:
        """Once per ``poll_s``, beside the ticks (a settle never waits for these reads):
        which deployments have queued work (those a tick picks for) and, once per
        ``count_every_s``, how much (the autoscaler's backlog); then an expiry check on
        the next tick, due webhooks and, hourly, the sweep."""
        q = self.queue
        try:
            if now - self._counted_at >= self.settings.count_every_s:
                self._counted_at = now
                depths = await asyncio.to_thread(q.depths)
                self._backlog({dep: queued for dep, (queued, _) in depths.items()})
                self._queued = {dep for dep, (queued, _) in depths.items() if queued}
                await self._end_gone(self._queued)
            else:
                self._queued = await asyncio.to_thread(q.queued_in, list(self._caps))
            self._expire_due = True
            if self._kick is not None:
                self._kick.set()
            await self._webhooks()
            if now - self._swept_at >= SWEEP_EVERY_S:
                self._swept_at = now
                gone = await asyncio.to_thread(q.sweep, self.settings.retention, self._clock())
                if gone:
                    log.info("async: swept %d finished request(s) past their retention", gone)
        except Exception:
            log.exception("async: a worker poll failed")
        finally:
            self._poll = None

    async def _end_gone(self, queued: set[str]) -> None:
        """Record FAILED the queued requests of deployments missing from the routing table
        for ``GONE_AFTER`` (deleted): no tick picks them (``_wants`` skips what has no
        capacity), so they stayed QUEUED forever, their webhooks never sent."""
        now, caps = self._clock(), self._capacity()
        self._missing = {d: t for d, t in self._missing.items() if d in queued and d not in caps}
        for dep in queued - caps.keys():
            since = self._missing.setdefault(dep, now)
            if now - since < GONE_AFTER:
                continue
            n = await asyncio.to_thread(self.queue.fail_queued, dep, deployment_gone(dep), now)
            if n:
                log.warning("async: %d queued request(s) of deployment %s, which is gone, "
                            "recorded FAILED", n, dep)  # fmt: skip

    async def _settle(self, *, expire: bool) -> None:
        """One store transaction (``AsyncQueue.settle``): claim the runs started since the
        last one, record the runs that ended and, per deployment with queued work, pick
        the next requests to start (``_ready``); then start what the free slots allow."""
        wants = self._wants(expire=expire)
        done, self._outcomes = self._outcomes, []
        claims, self._claims = self._claims, []
        if not done and not wants and not claims:
            return
        held = {v.id: v for views in self._ready.values() for v in views}
        try:  # in a thread: the loop reads answers meanwhile (SQLite's work drops the GIL)
            settled = await asyncio.to_thread(
                self.queue.settle, done, claims, wants, self._clock(), held
            )
        except BaseException:
            self._outcomes[:0] = done  # recorded by the next tick, not lost
            self._claims[:0] = claims
            # No run starts from a pick that no settle follows: each would run unclaimed
            # (a cancel would miss it, and a crash run it again) until the store answers.
            self._ready = {}
            raise
        for rid in settled.lost:  # a cancel took it between the pick and the start
            run = self._runs.get(rid)
            if run is not None:
                log.info("async: request %s was canceled as it started: its run is cut", rid)
                run.cancel()
        # Started from the last pick while this one was read (still QUEUED in it, its
        # claim in the next settle): not started twice. Any other run's row is claimed.
        started = {rid for rid, _ in self._claims}
        rows = {**held, **settled.rows}
        self._ready = {
            dep: deque(rows[rid] for rid in run if rid in rows and rid not in started)
            for dep, run in settled.ready.items()
        }
        for dep in self._ready:
            self._fill(dep)

    def _wants(self, *, expire: bool) -> dict[str, tuple[int, int]]:
        """Per deployment with queued work: (requests to pick, candidates to read). The
        pick covers every slot, busy ones too, and what ends before the next pick lands
        (:func:`pick_size`). Expiry looks past the picked ones; between polls a few more.
        The read takes only requests due now (``not_before``), so retries backing off
        hide none behind them."""
        self._caps = caps = self._capacity()
        ended, self._ended = self._ended, {}
        wants: dict[str, tuple[int, int]] = {}
        for dep in self._queued:
            cap = caps.get(dep)
            if cap is None:
                continue
            slots = async_slots(cap.ready, cap.concurrency, self.settings.share, 0)
            pick = pick_size(slots, ended.get(dep, 0)) if cap.runnable else 0
            wants[dep] = (pick, pick + 64 if expire else pick + 8)
        return wants

    def _fill(self, dep: str) -> None:
        """Start the deployment's next picked requests while it has free slots; the next
        settle claims them (``_claims``). One that waited too long since the pick is left
        for the expiry."""
        ready, cap = self._ready.get(dep), self._caps.get(dep)
        if not ready or cap is None or not cap.runnable or self._stop.is_set():
            return
        busy = self._running.get(dep, 0)
        free = async_slots(cap.ready, cap.concurrency, self.settings.share, busy)
        now, started = self._clock(), False
        while free > 0 and ready:
            view = ready.popleft()
            if past_wait(view.attempts, view.created_at, view.max_time_in_queue_seconds, now):
                continue
            self._claims.append((view.id, now))
            run = view.claimed(now)  # the row as the claim leaves it
            self._running[dep] = self._running.get(dep, 0) + 1
            task = asyncio.ensure_future(self._run(run, cap.model_id))
            self._runs[view.id] = task
            free, started = free - 1, True
        if started and self._kick is not None:
            self._kick.set()  # the claims go in soon

    # -- one run --------------------------------------------------------------------------
    async def _run(self, view: AsyncRequestView, model_id: str) -> None:
        try:
            status, headers, body, error = await self._call(view, model_id)
            outcome = classify(status, headers, body, error)
            self._outcomes.append(self._record(view, outcome))
            if outcome.verdict != Verdict.NOT_RUN:  # a gateway's "not now" ran nothing
                dep = view.deployment_id
                self._ended[dep] = self._ended.get(dep, 0) + 1
        except Exception:
            log.exception("async: request %s: recording its run failed", view.id)
        finally:
            self._runs.pop(view.id, None)
            self._running[view.deployment_id] -= 1
            self._fill(view.deployment_id)  # the slot's next, before any settle
            if self._kick is not None:
                self._kick.set()

    async def _call(
        self, view: AsyncRequestView, model_id: str
    ) -> tuple[int | None, dict[str, str], bytes, str]:
        path = f"/models/{model_id}/deployment/{view.deployment_id}/predict"
        headers = [("x-baseten-request-id", view.id)]  # the rest go with every run (_serve)
        try:
            status, got, body = await self._hop.post(path, view.model_input.encode(), headers)
        except HopError as exc:
            return None, {}, b"", str(exc)
        return status, got, body, ""  # an event stream comes back unread

    def _record(self, view: AsyncRequestView, outcome: Outcome) -> tuple[str, dict[str, object]]:
        """What to record of a run (the next tick writes it)."""
        q, now = self.queue, self._clock()
        if outcome.verdict == Verdict.SUCCEEDED:
            return view.id, q.succeeded_values(outcome.result or "null", now)
        if outcome.verdict == Verdict.NOT_RUN:
            return view.id, q.release_values(now + NOT_RUN_DELAY, now, view.attempts - 1)
        if outcome.verdict == Verdict.MODEL_ERROR and view.attempts < view.retry.max_attempts:
            delay = retry_delay_ms(view.retry, view.attempts)
            return view.id, q.retry_values(outcome.errors, now + timedelta(milliseconds=delay), now)
        return view.id, q.failed_values(outcome.errors, now)

    # -- webhooks -------------------------------------------------------------------------
    async def _webhooks(self) -> None:
        now = self._clock()
        due = await asyncio.to_thread(self.queue.due_webhooks, now, 64)
        fresh = [v for v in due if v.id not in self._delivering]
        if not fresh:
            return
        secrets = await asyncio.to_thread(self._secrets)
        for view in fresh:
            self._delivering.add(view.id)
            self._spawn(self._deliver(view, secrets))

    async def _deliver(self, view: AsyncRequestView, secrets: list[str]) -> None:
        try:
            assert view.webhook_endpoint is not None
            body = payload(view, self._clock())
            status, error = await deliver(
                self._hooks, view.webhook_endpoint, body, secrets, self.settings.own_ports, view.id
            )
            await self._record_delivery(view, status, error)
        except Exception as exc:
            log.exception("async: delivering the webhook of %s failed", view.id)
            # Recorded as an attempt all the same (retried, then failed for good): left
            # PENDING with no attempt counted, the row was due at every poll, forever.
            error = f"the delivery failed: {type(exc).__name__}: {exc}"[:500]
            try:
                await self._record_delivery(view, None, error)
            except Exception:
                log.exception("async: recording the webhook attempt of %s failed", view.id)
        finally:
            self._delivering.discard(view.id)

    async def _record_delivery(
        self, view: AsyncRequestView, status: int | None, error: str
    ) -> None:
        """One delivery's outcome: delivered, retried after a backoff while attempts
        remain (network errors, 5xx, 429), or failed for good."""
        attempt = view.webhook_attempts + 1
        retry_at = None
        if error and webhook_retryable(status) and attempt < self.settings.webhook_attempts:
            delay = webhook_delay_s(self.settings.webhook_initial_delay_s, attempt)
            retry_at = self._clock() + timedelta(seconds=delay)
        await asyncio.to_thread(
            self.queue.record_webhook,
            view.id,
            delivered=not error,
            error=error,
            retry_at=retry_at,
        )
        if error:
            log.warning("async: webhook of %s, attempt %d: %s", view.id, attempt, error)
