"""The control plane's async workers: take queued requests per deployment, run them on
replicas through the gateway, record each outcome, deliver webhooks, sweep old results.

One thread with its own event loop (``AsyncWorkers.start``). Each tick (every
``poll_s``, and at once when a run ends) it records the runs that ended and, per
deployment with queued work, takes as many requests as
:func:`~kingpost.asyncq.policy.async_slots` allows, all in one store transaction
(``AsyncQueue.settle``: one commit, so a slot freed by a run that ended is taken again with
the same commit that records it): a share (``KINGPOST_ASYNC_SHARE``) of the ready
replicas' predict slots, so sync predicts keep the rest. On SQLite the settle runs on the
workers' loop itself: it waits on no network, and a hop to a thread and back, with the
control plane's other threads holding the GIL, doubled how long a freed slot stayed idle
(bench/README.md, "Async"). Beside the ticks, once per ``poll_s``, a poll reads the queue
depth per deployment, hands the backlog to the autoscaler as demand (``backlog``), has the
next tick expire what waited too long and starts due webhooks. Runs go through the
gateway's normal routing (``/models/{m}/deployment/{d}/predict``, with a key that lives
only in this process's memory and the routing table), so they queue fairly with sync
requests, wake a deployment at zero, and reach isolated replicas.

Durable: the queue. Soft: which runs are in flight here. On start every IN_PROGRESS row
(a run the last control plane began and never recorded) goes back to the queue; a run's
outcome is recorded only while its row is still IN_PROGRESS, so nothing recorded runs
again and nothing is recorded twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from urllib.parse import urlsplit

import httpx

from kingpost.asyncq.hop import GatewayHop, HopError
from kingpost.asyncq.outcome import Outcome, Verdict, classify
from kingpost.asyncq.policy import (
    async_slots,
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
TICK_MIN_S = 0.0
"""A pause between ticks. None: a run that ends starts a tick at once, and runs that end
while a tick's transaction is in flight share the next one (a tick awaits its own), so
they batch without a wait. 10 ms left a replica's slot idle 10 ms of every 60 with a
50 ms model; 2 ms still cost the echo server 6% of its async throughput."""


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
        self._depths: dict[str, tuple[int, int]] = {}
        """Queue depth per deployment, read once per ``poll_s``."""
        self._outcomes: list[tuple[str, dict[str, object]]] = []
        """Runs ended since the last tick, recorded together (one transaction)."""
        self._models: dict[str, str] = {}
        """Per deployment the tick claims for, its model (the run's route)."""

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
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._kick = asyncio.Event()
        gateway = urlsplit(self.settings.gateway_url)
        self._hop = GatewayHop(
            gateway.hostname or "127.0.0.1",
            gateway.port or 80,
            timeout=self.settings.run_timeout_s,
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
            pending = [*self._tasks, *([self._poll] if self._poll is not None else [])]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            if self._outcomes:  # ended runs are recorded; cut ones run again next start
                await asyncio.to_thread(self.queue.finish_many, self._outcomes)
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
        the queue depths (the autoscaler's backlog, and which deployments a tick claims
        for), then an expiry check on the next tick, due webhooks and, hourly, the sweep."""
        q = self.queue
        try:
            self._depths = await asyncio.to_thread(q.depths)
            self._backlog({dep: queued for dep, (queued, _) in self._depths.items()})
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

    async def _settle(self, *, expire: bool) -> None:
        """Record the runs that ended and claim what each deployment's free slots allow,
        in one store transaction (``AsyncQueue.settle``); with no slot free, only look
        for expired requests (``expire``: once per poll, not on every tick)."""
        wants = self._wants(expire=expire)
        done, self._outcomes = self._outcomes, []
        if not done and not wants:
            return
        try:
            if self.queue.local:  # a local file: on this loop, no thread hop (see above)
                settled = self.queue.settle(done, wants, self._clock())
            else:
                settled = await asyncio.to_thread(self.queue.settle, done, wants, self._clock())
        except BaseException:
            self._outcomes[:0] = done  # recorded by the next tick, not lost
            raise
        models = self._models
        for dep, views in settled.claimed.items():
            for view in views:
                self._running[dep] = self._running.get(dep, 0) + 1
                self._spawn(self._run(view, models[dep]))

    def _wants(self, *, expire: bool) -> dict[str, tuple[int, int]]:
        """Per deployment with queued work: (free slots, candidates to read). Expiry looks
        past the ones that run; between polls a few more than the free slots, in case the
        first are backing off (``not_before``)."""
        caps = self._capacity()
        wants: dict[str, tuple[int, int]] = {}
        self._models = {}
        for dep, (queued, _) in self._depths.items():
            cap = caps.get(dep)
            if not queued or cap is None:
                continue
            busy = self._running.get(dep, 0)
            free = async_slots(cap.ready, cap.concurrency, self.settings.share, busy)
            if not cap.runnable:
                free = 0
            if free == 0 and not expire:
                continue
            wants[dep] = (free, free + 64 if expire else free + 8)
            self._models[dep] = cap.model_id
        return wants

    # -- one run --------------------------------------------------------------------------
    async def _run(self, view: AsyncRequestView, model_id: str) -> None:
        try:
            status, headers, body, error = await self._call(view, model_id)
            self._outcomes.append(self._record(view, classify(status, headers, body, error)))
        except Exception:
            log.exception("async: request %s: recording its run failed", view.id)
        finally:
            self._running[view.deployment_id] -= 1
            if self._kick is not None:
                self._kick.set()

    async def _call(
        self, view: AsyncRequestView, model_id: str
    ) -> tuple[int | None, dict[str, str], bytes, str]:
        path = f"/models/{model_id}/deployment/{view.deployment_id}/predict"
        headers = [
            ("authorization", f"Api-Key {self.settings.key}"),
            ("content-type", "application/json"),
            ("x-baseten-request-id", view.id),
            # Retried here per inference_retry_config; a replica that took it and died
            # must not have the gateway run it again behind this worker's back (or, after
            # a control-plane crash, for a worker that is gone).
            ("x-kingpost-no-retry", "1"),
        ]
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
        except Exception:
            log.exception("async: delivering the webhook of %s failed", view.id)
        finally:
            self._delivering.discard(view.id)
