"""The dispatcher's choice of replica (one seam, no sockets)."""

from __future__ import annotations

import asyncio
from collections import Counter

from kingpost.gateway.dispatch import Dispatcher
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
