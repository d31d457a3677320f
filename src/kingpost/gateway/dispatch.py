"""Per-deployment admission: concurrency per replica, a bounded queue, holding while waking.

A request asks :meth:`Dispatcher.acquire` for a replica slot. It gets the
least-loaded ready replica with a free slot at once; otherwise it waits in the
deployment's FIFO queue (429 when the queue is full), also while the deployment
has no ready replica yet (503 after ``hold_timeout_s``). ``release`` hands the
slot straight to the next waiter.

A waiter is a Task awaiting :meth:`Dispatcher.acquire`, or a :class:`Parked` request
(:meth:`Dispatcher.park`) that takes its slot in the very call that frees it: a request
queued from the gateway's callbacks is then sent to the replica as soon as the answer
before it ends, without waiting for a Task to be woken on a later loop turn.

A request that waits while the deployment has no ready replica (scaled to zero, or still
starting) calls ``on_cold``, which the gateway passes on to the control plane at once
(see ``Gateway.note_demand``): only that path pays for it, never a request a ready
replica takes.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from kingpost.gateway.stats import DeploymentCounters, DeploymentStats
from kingpost.gateway.table import DeploymentRoute, DeploymentState, Upstream

__all__ = ["Dispatcher", "Parked", "Rejected", "Slot", "Waiter"]


class Rejected(Exception):
    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


@dataclass(eq=False)
class Slot:
    upstream: Upstream
    key: tuple[str, int, str | None]


class Parked(Protocol):
    """A queued request that is handed its slot, or refused, by a call (see :meth:`park`)."""

    def give(self, slot: Slot) -> None:
        """Take ``slot`` now (its owner from here on), inside the call that freed it."""

    def refuse(self, rej: Rejected) -> None:
        """The request waited too long, or its deployment went inactive."""


@dataclass(eq=False, slots=True)
class Waiter:
    """One request in a deployment's queue."""

    future: asyncio.Future[Slot] | None
    """What a Task awaits (:meth:`Dispatcher.acquire`); None for a parked request."""
    exclude: frozenset[str] = field(default_factory=frozenset)
    queued: bool = True
    """Still in the deployment's queue (a waiter handed a slot or refused leaves it)."""
    parked: Parked | None = None
    deadline: float = 0.0
    """When a parked request's hold timeout ends (the loop's clock; see :meth:`park`)."""
    hold: float = 0.0
    """The hold timeout it was parked with, for the 503's message."""
    ended: bool = False
    """A parked request was handed a slot, refused, or left (:meth:`Dispatcher.unpark`)."""

    def done(self) -> bool:
        return self.ended if self.future is None else self.future.done()

    def give(self, slot: Slot) -> None:
        if self.future is not None:
            self.future.set_result(slot)
            return
        self.ended = True
        assert self.parked is not None
        self.parked.give(slot)

    def refuse(self, rej: Rejected) -> None:
        if self.future is not None:
            self.future.set_exception(rej)
            return
        self.ended = True
        assert self.parked is not None
        self.parked.refuse(rej)


class Dispatcher:
    def __init__(self, route: DeploymentRoute) -> None:
        self.route = route
        self.inflight: dict[str, int] = {}
        self.counters = DeploymentCounters()
        """What this deployment answered (see :mod:`kingpost.gateway.stats`)."""
        self._waiters: deque[Waiter] = deque()
        self._turn = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        """One timer for the parked requests' hold timeouts, due at the earliest of them."""
        self._timer_at = 0.0
        self.on_cold: Callable[[str, int], None] | None = None
        """Called with (deployment id, requests waiting) when a request starts to wait
        while no replica is ready."""

    def snapshot(self) -> DeploymentStats:
        """In flight and queued now, and what it answered: read, never counted per request."""
        return DeploymentStats.of(
            self.counters,
            queued=sum(1 for w in self._waiters if not w.done()),
            inflight={rid: n for rid, n in self.inflight.items() if n > 0},
        )

    def has_waiters(self) -> bool:
        return bool(self._waiters)

    def update(self, route: DeploymentRoute) -> None:
        self.route = route
        live = {u.replica_id for u in route.upstreams}
        for rid in list(self.inflight):
            if rid not in live and self.inflight[rid] <= 0:
                del self.inflight[rid]
        if route.state == DeploymentState.INACTIVE:
            while self._waiters:
                w = self._waiters.popleft()
                w.queued = False
                if not w.done():
                    w.refuse(Rejected(404, route.message or "deployment is inactive", "not_found"))
            return
        self._drain()

    def _free(self, exclude: frozenset[str] = frozenset()) -> Upstream | None:
        """The least-loaded replica with room; ties rotate, so light traffic spreads."""
        upstreams = self.route.upstreams
        n = len(upstreams)
        if n == 0:
            return None
        self._turn = (self._turn + 1) % n
        best, best_load = None, self.route.concurrency
        for i in range(n):
            u = upstreams[(self._turn + i) % n]
            if u.replica_id in exclude:
                continue
            load = self.inflight.get(u.replica_id, 0)
            if load < best_load:
                best, best_load = u, load
        return best

    def _take(self, u: Upstream) -> Slot:
        self.inflight[u.replica_id] = self.inflight.get(u.replica_id, 0) + 1
        return Slot(u, (u.host, u.port, u.netns))

    def try_acquire(self, exclude: frozenset[str] = frozenset()) -> Slot | None:
        """A slot if one is free and nobody queues ahead; None when the caller must wait."""
        route = self.route
        if route.state == DeploymentState.INACTIVE:
            raise Rejected(404, route.message or "deployment is inactive", "not_found")
        if not self._waiters:
            u = self._free(exclude)
            if u is not None:
                return self._take(u)
        return None

    def _check_room(self) -> None:
        route = self.route
        if len(self._waiters) >= route.queue_limit:
            raise Rejected(
                429,
                f"deployment {route.deployment_id} is at capacity: {route.queue_limit} requests "
                "queued; retry later",
                "overloaded",
            )

    def park(self, parked: Parked) -> Waiter:
        """Queue a request that :meth:`try_acquire` found no slot for: ``parked.give`` gets
        a slot from the :meth:`release` (or table update) that frees one, ``parked.refuse``
        the 503 after ``hold_timeout_s`` or the 404 of a deactivation. Raises the 429 of a
        full queue. The caller keeps the waiter to :meth:`unpark` it if its client leaves."""
        self._check_room()
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        hold = self.route.hold_timeout_s
        deadline = loop.time() + hold
        waiter = Waiter(None, parked=parked, deadline=deadline, hold=hold)
        self._waiters.append(waiter)
        self._note_cold()
        # No timer per request (under predict_concurrency 1 nearly every request parks, and
        # a timer's start and cancel cost more than the rest of the queueing): one timer,
        # due at the earliest deadline, expires what is due and is armed again.
        if self._timer is None or deadline < self._timer_at:
            self._arm(loop, deadline)
        return waiter

    def _arm(self, loop: asyncio.AbstractEventLoop, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = loop.call_at(at, self._expire_due), at

    def _expire_due(self) -> None:
        """Refuse the parked requests whose hold timeout has passed; arm for the next."""
        self._timer = None
        loop = self._loop
        assert loop is not None
        now = loop.time() + 0.001  # (a loop may run a timer up to its clock's resolution early)
        due: list[Waiter] = []
        next_at: float | None = None
        for w in self._waiters:
            if w.future is not None or w.ended:
                continue
            if w.deadline <= now:
                due.append(w)
            elif next_at is None or w.deadline < next_at:
                next_at = w.deadline
        for w in due:
            self._expire(w, w.hold)  # (a refusal may park this client's next request)
        if next_at is not None and (self._timer is None or next_at < self._timer_at):
            self._arm(loop, next_at)

    def unpark(self, waiter: Waiter) -> None:
        """A parked request's client left: it leaves the queue, holding no slot."""
        if waiter.ended:
            return
        waiter.ended = True
        if waiter.queued:
            waiter.queued = False
            self._waiters.remove(waiter)

    def _note_cold(self) -> None:
        """A request waits while no replica is ready: tell the control plane (a parked
        request and an awaited one alike; a wait for a busy replica is not news)."""
        if not self.route.upstreams and self.on_cold is not None:
            self.on_cold(self.route.deployment_id, len(self._waiters))

    async def acquire(self, exclude: frozenset[str] = frozenset()) -> Slot:
        slot = self.try_acquire(exclude)
        if slot is not None:
            return slot
        self._check_room()
        route = self.route
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Slot] = loop.create_future()
        waiter = Waiter(future, exclude)
        self._waiters.append(waiter)
        self._drain()  # a retry may fall back to the replica it excluded
        self._note_cold()
        # The timeout ends the future itself (not the awaiting task, as ``wait_for`` would),
        # so a slot handed over in the same loop turn is never lost between the two.
        timer = loop.call_later(route.hold_timeout_s, self._expire, waiter, route.hold_timeout_s)
        try:
            return await future
        except asyncio.CancelledError:
            # Cancelled (the client left) in the loop turn that handed it a slot: give it back.
            if future.done() and not future.cancelled() and future.exception() is None:
                self.release(future.result())
            raise
        finally:
            timer.cancel()
            if not future.done():
                future.cancel()
            if waiter.queued:
                # Only a waiter that timed out or was cancelled is still queued: removing
                # one that is not costs a ValueError whose message formats the waiter.
                waiter.queued = False
                self._waiters.remove(waiter)

    def _expire(self, waiter: Waiter, hold_timeout_s: float) -> None:
        if waiter.done():
            return
        if self.route.upstreams:
            message = f"timed out after {hold_timeout_s:.0f}s in the queue"
        else:
            why = self.route.message or "no replica is ready"
            message = f"{why}; no replica became ready within {hold_timeout_s:.0f}s"
        if waiter.future is None and waiter.queued:  # a parked request leaves the queue now
            waiter.queued = False
            self._waiters.remove(waiter)
        waiter.refuse(Rejected(503, message, "unavailable"))

    def release(self, slot: Slot) -> None:
        rid = slot.upstream.replica_id
        self.inflight[rid] = self.inflight.get(rid, 1) - 1
        self._drain()

    def _drain(self) -> None:
        while self._waiters:
            waiter = self._waiters[0]
            if waiter.done():
                self._waiters.popleft()
                waiter.queued = False
                continue
            u = self._free(waiter.exclude) or (self._free() if waiter.exclude else None)
            if u is None:
                return
            self._waiters.popleft()
            waiter.queued = False
            # A parked request sends right here, and may free a slot again (its client
            # gone): that nested drain finds this waiter already off the queue.
            waiter.give(self._take(u))
