"""Async inference end to end on PostgreSQL: a real `kingpost server` whose store is a
fresh database on the server KINGPOST_TEST_POSTGRES_URL names (skipped when unset; under
CI=true it is required). Accepts go through the gateway's journal into PostgreSQL, the
workers claim and record there, and a kill -9 of the control plane with a run in flight
loses nothing and reruns nothing recorded."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_platform_async import push_async_worker

from helpers.platform import Platform, wait_for
from helpers.postgres import fresh_database

DONE = {"SUCCEEDED", "FAILED", "EXPIRED", "CANCELED", "WEBHOOK_FAILED"}


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    """A database of its own, dropped after."""
    with fresh_database("kp_async") as url:
        yield url


@pytest.fixture(scope="module")
def platform(database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    env = {
        "KINGPOST_DATABASE_URL": database,
        "KINGPOST_ASYNC_SHARE": "1",
        "KINGPOST_ISOLATION": "off",  # the model appends to a log file the test reads
        "KINGPOST_NETNS": "off",
    }
    p = Platform(tmp_path_factory.mktemp("async-pg") / "home", extra_env=env).start()
    try:
        yield p
    finally:
        p.stop()


def test_async_end_to_end_on_postgresql(
    platform: Platform, tmp_path_factory: pytest.TempPathFactory
) -> None:
    pushed = push_async_worker(platform, tmp_path_factory)
    model, log = pushed["id"], pushed["log"]

    def enqueue(body: dict[str, Any]) -> str:
        with platform.gateway() as gw:
            r = gw.post(f"/models/{model}/production/async_predict", json=body)
        assert r.status_code == 201, r.text
        return str(r.json()["request_id"])

    def status(rid: str, what: str = "") -> Any:
        with platform.gateway() as gw:
            r = gw.get(f"/models/{model}/async_request/{rid}{what}")
        assert r.status_code == 200, r.text
        return r.json()

    def done(rid: str, timeout: float = 60) -> Any:
        return wait_for(lambda: (s := status(rid))["status"] in DONE and s, timeout, rid)

    def keys() -> list[str]:
        return [line.split(" ", 1)[0] for line in Path(log).read_text().splitlines()]

    first = enqueue({"model_input": {"key": "pg-first"}})
    assert done(first)["status"] == "SUCCEEDED"
    assert status(first, "/result")["data"] == {"echo": {"key": "pg-first"}}

    inflight = enqueue({"model_input": {"key": "pg-inflight", "sleep": 3}})
    queued = [enqueue({"model_input": {"key": f"pg-q{i}"}, "priority": 2}) for i in range(2)]
    wait_for(lambda: "pg-inflight" in keys(), 30, "the long run to begin")
    # Begun and claimed (a run starts before the workers' next settle records its claim).
    wait_for(lambda: status(inflight)["status"] == "IN_PROGRESS", 30, "its claim")
    platform.stop(signal.SIGKILL)
    platform.start()
    for rid in [inflight, *queued]:
        assert done(rid, timeout=90)["status"] == "SUCCEEDED"
    got = keys()
    assert got.count("pg-first") == 1  # recorded before the kill: never run again
    assert got.count("pg-q0") == 1 and got.count("pg-q1") == 1
    assert got.count("pg-inflight") == 2  # begun, never recorded: run again
    assert status(inflight)["attempts"] == 2
