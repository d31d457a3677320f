"""The dispatcher's choice of replica (one seam, no sockets)."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import replace
from typing import Any

import pytest

from kingpost.gateway import dispatch
from kingpost.gateway.dispatch import Dispatcher, Rejected, Slot
from kingpost.gateway.table import DeploymentRoute, DeploymentState, Upstream


def _route(n: int, concurrency: int = 4) -> DeploymentRoute:
    return DeploymentRoute(
        "dep",
        "model",
        "/predict",
        DeploymentState.SERVING,
        tuple(Upstream(f"r{i}", "127.0.0.1", 9000 + i) for i in range(n)),
        concurrency=concurrency,
    )


def test_one_request_at_a_time_spreads_over_every_replica() -> None:
    async def run() -> Counter[str]:
        d, seen = Dispatcher(_route(3)), Counter[str]()
        for _ in range(30):
            slot = await d.acquire()
            seen[slot.upstream.replica_id] += 1
            d.release(slot)
        return seen

    assert asyncio.run(run()) == {"r0": 10, "r1": 10, "r2": 10}


def test_the_least_loaded_replica_wins_over_rotation() -> None:
    async def run() -> list[str]:
        d = Dispatcher(_route(2))
        held = [await d.acquire() for _ in range(3)]  # r? r? then the one with 1
        loads = Counter(s.upstream.replica_id for s in held)
        assert sorted(loads.values()) == [1, 2]
        nxt = await d.acquire()
        return [nxt.upstream.replica_id, min(loads, key=lambda r: loads[r])]

    chosen, least = asyncio.run(run())
    assert chosen == least


def test_a_waiter_cancelled_as_its_slot_arrives_gives_the_slot_back() -> None:
    # The client of a queued request leaves in the same loop turn as a slot is handed to
    # it: the cancelled acquire must not keep the slot, or the replica is one short for good.
    async def run() -> None:
        d = Dispatcher(_route(1, concurrency=1))
        held = await d.acquire()
        waiting = asyncio.ensure_future(d.acquire())
        await asyncio.sleep(0)  # queued behind the held slot
        d.release(held)  # handed straight to the waiter ...
        waiting.cancel()  # ... whose client has just left
        try:
            await waiting
        except asyncio.CancelledError:
            pass
        else:
            raise AssertionError("a cancelled acquire returned a slot")
        assert d.try_acquire() is not None

    asyncio.run(run())


def test_a_waiter_that_times_out_in_the_queue_holds_no_slot() -> None:
    async def run() -> None:
        d = Dispatcher(replace(_route(1, concurrency=1), hold_timeout_s=0.05))
        held = await d.acquire()
        try:
            await d.acquire()
        except Rejected as rej:
            assert (rej.status, rej.code) == (503, "unavailable")
        else:
            raise AssertionError("no 503 after the hold timeout")
        d.release(held)
        assert d.inflight == {"r0": 0}

    asyncio.run(run())


def test_a_slot_handed_to_a_waiter_costs_no_failed_queue_removal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Every request queued under predict_concurrency 1 takes this path. Removing a waiter
    # the hand-over already took off the queue raised ValueError, whose message formats
    # the waiter and its future: about 50 us a request, found by profiling.
    def no_repr(self: object) -> str:
        raise AssertionError("a waiter was formatted")

    monkeypatch.setattr(dispatch.Waiter, "__repr__", no_repr)

    async def run() -> None:
        d = Dispatcher(_route(1, concurrency=1))
        held = await d.acquire()
        waiting = asyncio.ensure_future(d.acquire())
        await asyncio.sleep(0)
        d.release(held)
        d.release(await waiting)
        assert d.inflight == {"r0": 0} and not d._waiters

    asyncio.run(run())


class _Parked:
    def __init__(self) -> None:
        self.slots: list[str] = []
        self.refusals: list[tuple[int, str]] = []

    def give(self, slot: Slot) -> None:
        self.slots.append(slot.upstream.replica_id)

    def refuse(self, rej: Rejected) -> None:
        self.refusals.append((rej.status, rej.code))


def test_a_parked_request_gets_its_slot_inside_the_release_that_frees_it() -> None:
    async def run() -> None:
        d = Dispatcher(replace(_route(1, concurrency=1), queue_limit=2))
        held = d.try_acquire()
        assert held is not None
        first, second, gone = _Parked(), _Parked(), _Parked()
        d.park(first)
        left = d.park(gone)
        with pytest.raises(Rejected) as full:
            d.park(_Parked())
        assert full.value.status == 429
        d.unpark(left)  # its client left: it takes no slot and frees its place
        d.park(second)
        assert d.snapshot().queued == 2
        d.release(held)
        assert first.slots == ["r0"] and not second.slots  # no loop turn in between
        assert d.snapshot().queued == 1 and d.inflight == {"r0": 1}
        d.release(Slot(held.upstream, held.key))
        assert second.slots == ["r0"] and not gone.slots and not d._waiters

    asyncio.run(run())


def test_a_parked_request_is_refused_after_the_hold_timeout_or_a_deactivation() -> None:
    async def run() -> None:
        d = Dispatcher(replace(_route(1, concurrency=1), hold_timeout_s=0.05))
        held = d.try_acquire()
        assert held is not None
        late, deactivated = _Parked(), _Parked()
        d.park(late)
        await asyncio.sleep(0.15)
        assert late.refusals == [(503, "unavailable")] and not d._waiters
        d.park(deactivated)
        d.update(replace(d.route, state=DeploymentState.INACTIVE))
        assert deactivated.refusals == [(404, "not_found")] and not deactivated.slots
        d.release(held)
        assert late.slots == [] and d.inflight == {"r0": 0}

    asyncio.run(run())


def test_a_request_waiting_for_a_deployment_with_no_ready_replica_wakes_it() -> None:
    """A complete request is parked (no Task) when no slot is free: for a deployment scaled
    to zero that path too must tell the control plane at once, or the wake waits for the
    next stats pull. A wait for a busy replica is not a wake."""

    async def run() -> None:
        cold: list[tuple[str, int]] = []
        d = Dispatcher(_route(0))
        d.on_cold = lambda dep, n: cold.append((dep, n))
        d.park(_Parked())
        assert cold == [("dep", 1)]
        waiting = asyncio.ensure_future(d.acquire())
        await asyncio.sleep(0)
        assert cold == [("dep", 1), ("dep", 2)]
        waiting.cancel()
        busy = Dispatcher(_route(1, concurrency=1))
        busy.on_cold = lambda dep, n: cold.append((dep, n))
        assert busy.try_acquire() is not None
        busy.park(_Parked())
        assert len(cold) == 2

    asyncio.run(run())


class _Signalled(_Parked):
    def __init__(self) -> None:
        super().__init__()
        self.refused = asyncio.Event()

    def refuse(self, rej: Rejected) -> None:
        super().refuse(rej)
        self.refused.set()


def test_parked_requests_share_one_hold_timer_and_each_expires_at_its_own_deadline() -> None:
    """Under predict_concurrency 1 nearly every request parks: a timer started and
    cancelled per request cost more than the rest of the queueing (about 4 of 6 us,
    measured). One timer, due at the earliest deadline, must still refuse each request when
    its own hold ends, not the first one's or the last one's."""

    async def run() -> None:
        loop = asyncio.get_running_loop()
        armed: list[float] = []
        call_at = loop.call_at

        def counting_call_at(when: float, *args: Any, **kwargs: Any) -> asyncio.TimerHandle:
            armed.append(when)
            return call_at(when, *args, **kwargs)

        loop.call_at = counting_call_at  # type: ignore[method-assign]
        d = Dispatcher(replace(_route(1, concurrency=1), hold_timeout_s=0.2))
        held = d.try_acquire()
        assert held is not None
        first, second = _Signalled(), _Signalled()
        d.park(first)
        for _ in range(50):  # requests parked behind it whose clients left: no timer each
            d.unpark(d.park(_Parked()))
        assert len(armed) == 1
        await asyncio.sleep(0.1)
        d.park(second)  # due 0.1 s after the first
        await asyncio.wait_for(first.refused.wait(), 2)
        assert first.refusals == [(503, "unavailable")]
        assert not second.refusals  # its own hold has not ended yet
        await asyncio.wait_for(second.refused.wait(), 2)
        assert second.refusals == [(503, "unavailable")] and not d._waiters
        d.release(held)
        assert d.inflight == {"r0": 0}

    asyncio.run(run())
