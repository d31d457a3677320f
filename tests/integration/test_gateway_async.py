"""Async inference routes on a real gateway, answered from a real SQLite store."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from helpers.gateway import AUTH, RunningGateway, route
from helpers.platform import wait_for
from kingpost.asyncq.body import parse_async_body
from kingpost.asyncq.journal import AcceptJournal, read_records
from kingpost.errors import NotFoundError
from kingpost.gateway.asyncroutes import AsyncFront
from kingpost.gateway.table import DeploymentState
from kingpost.store import Database
from kingpost.store.asyncq import AsyncQueue, accepted_record
from kingpost.store.models import AsyncStatus, utcnow


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'k.db'}"
    db = Database(url)
    db.migrate()
    db.close()
    return url


@pytest.fixture
def gw(db_url: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[RunningGateway]:
    """A gateway whose accepts go through a journal (as `kingpost server` runs it), or
    with ``indirect`` param "journal-sync" fdatasync'd in groups, or "direct" straight
    into the store."""
    mode = getattr(request, "param", "journal")
    journal = tmp_path / "async" / "accepts-w.journal" if mode != "direct" else None
    running = RunningGateway()
    running.gateway.async_front = AsyncFront(
        db_url, payload_limit=4096, journal=journal, journal_sync=mode == "journal-sync"
    )
    running.table(route(1))  # a replica that never answers: nothing here calls it
    try:
        yield running
    finally:
        running.close()


def post(gw: RunningGateway, path: str, body: object, **kw: object) -> httpx.Response:
    return httpx.post(gw.url + path, json=body, headers=AUTH, **kw)  # type: ignore[arg-type]


def in_store(q: AsyncQueue, rid: str) -> bool:
    try:
        q.get(rid)
    except NotFoundError:
        return False
    return True


@pytest.mark.parametrize("gw", ["journal", "journal-sync", "direct"], indirect=True)
def test_accept_then_status_result_cancel_and_queue_status(
    gw: RunningGateway, db_url: str, tmp_path: Path
) -> None:
    r = post(gw, "/models/echo/production/async_predict", {"model_input": {"x": 1}, "priority": 1})
    assert r.status_code == 201, r.text
    rid = r.json()["request_id"]
    q = AsyncQueue(Database(db_url))
    journaled = read_records(tmp_path / "async" / "accepts-w.journal")
    assert rid in {x["id"] for x in journaled} or in_store(q, rid)  # durable before the answer
    wait_for(lambda: in_store(q, rid), 10, "the accept in the store")
    got = q.get(rid)
    assert (got.deployment_id, got.environment, got.priority) == ("d1", "production", 1)
    assert json.loads(got.model_input) == {"x": 1}

    s = httpx.get(f"{gw.url}/models/echo/async_request/{rid}", headers=AUTH).json()
    assert s["status"] == "QUEUED" and s["webhook_status"] == "NO_WEBHOOK_PROVIDED"
    assert s["model_id"] == "m1" and s["deployment_id"] == "d1" and s["errors"] == []
    qs = httpx.get(f"{gw.url}/models/echo/deployment/d1/async_queue_status", headers=AUTH)
    assert qs.json()["num_queued_requests"] == 1 and qs.json()["num_in_progress_requests"] == 0

    c = httpx.delete(f"{gw.url}/models/echo/async_request/{rid}", headers=AUTH)
    assert c.status_code == 200 and c.json()["status"] == "CANCELED"
    again = httpx.delete(f"{gw.url}/models/echo/async_request/{rid}", headers=AUTH)
    assert again.status_code == 409 and "only a QUEUED request" in again.json()["error"]
    res = httpx.get(f"{gw.url}/models/echo/async_request/{rid}/result", headers=AUTH).json()
    assert res == {"request_id": rid, "status": "CANCELED", "data": None, "errors": []}
    assert q.get(rid).status == AsyncStatus.CANCELED


def test_every_route_shape_and_the_model_scope(gw: RunningGateway) -> None:
    for path in (
        "/models/echo/deployment/d1/async_predict",
        "/models/m1/environments/production/async_predict",
    ):
        assert post(gw, path, {"model_input": 1}).status_code == 201
    r = httpx.get(f"{gw.url}/models/echo/async_request/nope", headers=AUTH)
    assert r.status_code == 404 and "not found" in r.json()["error"]
    assert post(gw, "/models/echo/async_request/x", {}).status_code == 405
    assert (
        httpx.get(f"{gw.url}/models/echo/production/async_predict", headers=AUTH).status_code == 405
    )
    assert (
        httpx.post(
            gw.url + "/models/echo/production/async_predict", json={"model_input": 1}
        ).status_code
        == 401
    )


def test_validation_errors_name_field_rule_and_value(gw: RunningGateway) -> None:
    path = "/models/echo/production/async_predict"
    r = post(gw, path, {"model_input": 1, "priority": 7})
    assert r.status_code == 400
    body = r.json()
    assert body["field"] == "priority" and body["value"] == 7 and "from 0 to 2" in body["error"]
    r = post(gw, path, {"model_input": 1, "webhook_endpoint": "http://example.com/hook"})
    assert r.status_code == 400 and "https://" in r.json()["error"]
    r = post(gw, path, {"priority": 1})
    assert r.status_code == 400 and r.json()["field"] == "model_input"
    r = httpx.post(gw.url + path, content=b"{", headers=AUTH)
    assert r.status_code == 400 and r.json()["field"] == "body"
    # A URL urlsplit cannot read was a 503 "the store failed"; one the store cannot keep
    # (a lone surrogate, sent as JSON's escape) was a 201 that then blocked the journal.
    for hook in ("https://[::1", "https://h.example:99999/", "https://h.example/\ud800"):
        raw = json.dumps({"model_input": 1, "webhook_endpoint": hook})  # "\\ud800": ASCII
        r = httpx.post(gw.url + path, content=raw.encode(), headers=AUTH)
        assert r.status_code == 400, (hook, r.text)
        assert r.json()["field"] == "webhook_endpoint", r.text


def test_payload_limit_is_413_naming_it(gw: RunningGateway) -> None:
    big = {"model_input": "x" * 5000}
    r = post(gw, "/models/echo/production/async_predict", big)
    assert r.status_code == 413
    assert r.json()["limit_bytes"] == 4096 and "4096 bytes" in r.json()["error"]

    def chunks() -> Iterator[bytes]:
        yield b'{"model_input": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    r = httpx.post(gw.url + "/models/echo/production/async_predict", content=chunks(), headers=AUTH)
    assert r.status_code == 413


def test_an_inactive_deployment_refuses_async_work(gw: RunningGateway) -> None:
    gw.table(route(1, state=DeploymentState.INACTIVE, message="deployment is deactivated"))
    r = post(gw, "/models/echo/production/async_predict", {"model_input": 1})
    assert r.status_code == 404 and "deactivated" in r.json()["error"]


def test_pipelined_async_and_keepalive(gw: RunningGateway) -> None:
    body = json.dumps({"model_input": 1}).encode()
    head = (
        f"POST /models/echo/production/async_predict HTTP/1.1\r\nhost: x\r\n"
        f"authorization: {AUTH['Authorization']}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
        s.sendall((head + body) * 3)
        data = b""
        while data.count(b"request_id") < 3:
            chunk = s.recv(65536)
            assert chunk, data
            data += chunk
    assert data.count(b"HTTP/1.1 201 Created") == 3


def test_without_a_store_async_routes_say_so() -> None:
    running = RunningGateway()
    try:
        running.table(route(1))
        r = post(running, "/models/echo/production/async_predict", {"model_input": 1})
        assert r.status_code == 503 and "--async-store" in r.json()["error"]
    finally:
        running.close()


def test_a_failing_store_is_a_503_not_a_hang_and_the_journal_waits(
    gw: RunningGateway, db_url: str
) -> None:
    db = Database(db_url)
    with db.engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE async_requests RENAME TO async_requests_away")
    path = "/models/echo/production/async_predict"
    first = post(gw, path, {"model_input": 1}, timeout=10)
    assert first.status_code == 201  # durable in the journal; the store's insert waits
    rid = first.json()["request_id"]
    status = httpx.get(f"{gw.url}/models/echo/async_request/{rid}", headers=AUTH, timeout=10)
    assert status.json()["status"] == "QUEUED"  # answered from what waits
    r = wait_answer_status(gw, path, 503)  # once the insert failed: no more accepts
    assert r.json()["code"] == "async_store_unavailable"
    r = httpx.get(f"{gw.url}/models/echo/async_request/x", headers=AUTH, timeout=10)
    assert r.status_code == 503
    with db.engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE async_requests_away RENAME TO async_requests")
    q = AsyncQueue(db)
    wait_for(lambda: in_store(q, rid), 10, "the journaled accept in the store")
    assert post(gw, path, {"model_input": 2}).status_code == 201
    db.close()


def wait_answer_status(gw: RunningGateway, path: str, status: int) -> httpx.Response:
    def answer() -> httpx.Response | None:
        r = post(gw, path, {"model_input": 1}, timeout=10)
        return r if r.status_code == status else None

    return wait_for(answer, 10, f"{status} from {path}")


def test_journaled_accepts_of_a_killed_worker_reach_the_store(db_url: str, tmp_path: Path) -> None:
    """A worker killed after answering and before inserting: its next start (its own
    journal) or any worker's start (a journal no live worker holds) inserts them, once;
    a torn last line (never answered) is skipped."""
    body = parse_async_body(b'{"model_input": {"n": 1}}')
    now = utcnow()
    own, gone = tmp_path / "j" / "accepts-a.journal", tmp_path / "j" / "accepts-b.journal"
    records = []
    for path in (own, gone):
        journal = AcceptJournal(path)
        record = accepted_record(body, "m1", "d1", "production", now)
        journal.append([record])
        journal.close()
        records.append(record)
    with gone.open("ab") as f:
        f.write(b'{"id": "torn')
    q = AsyncQueue(Database(db_url))
    q.insert_accepted([records[0]])  # inserted before the kill, not yet truncated
    front = AsyncFront(db_url, journal=own)
    try:
        assert [q.get(r["id"]).status for r in records] == [AsyncStatus.QUEUED] * 2
        assert own.stat().st_size == 0 and gone.stat().st_size == 0
        assert sum(q.counts("d1").values()) == 2
    finally:
        front.close()


def poisoned_record() -> dict[str, object]:
    """An accept the store cannot insert (validation refuses such a URL now; a journal
    written before that may still hold one)."""
    record = accepted_record(parse_async_body(b'{"model_input": 1}'), "m1", "d1", None, utcnow())
    return {**record, "webhook_endpoint": "https://h.example/\ud800"}


def test_a_record_the_store_refuses_blocks_no_other_accept(gw: RunningGateway, db_url: str) -> None:
    """It was taken for the store being down: it and every accept with it stayed out of
    the store, and every later accept was 503, forever."""
    front = gw.gateway.async_front
    assert front is not None
    path = "/models/echo/production/async_predict"
    bad = poisoned_record()
    gw.loop.call_soon_threadsafe(front._journaled, [bad])  # as an accept journals it
    ids = [post(gw, path, {"model_input": n}).json()["request_id"] for n in range(3)]
    q = AsyncQueue(Database(db_url))
    wait_for(lambda: all(in_store(q, rid) for rid in [*ids, bad["id"]]), 10, "all in the store")
    assert q.get(str(bad["id"])).status == AsyncStatus.FAILED
    assert q.get(str(bad["id"])).errors[0]["code"] == "ASYNC_REQUEST_NOT_STORED"
    assert [post(gw, path, {"model_input": 4}).status_code for _ in range(3)] == [201] * 3


def test_a_journal_with_a_record_the_store_refuses_is_inserted_at_start(
    db_url: str, tmp_path: Path
) -> None:
    path = tmp_path / "async" / "accepts-w.journal"
    good = accepted_record(parse_async_body(b'{"model_input": 1}'), "m1", "d1", None, utcnow())
    bad = poisoned_record()
    journal = AcceptJournal(path)
    journal.append([good, bad])
    journal.close()
    front = AsyncFront(db_url, journal=path)
    try:
        q = AsyncQueue(Database(db_url))
        assert q.get(good["id"]).status == AsyncStatus.QUEUED
        assert q.get(str(bad["id"])).status == AsyncStatus.FAILED
        assert not front._unflushed and path.stat().st_size == 0
    finally:
        front.close()


def test_accepts_recovered_while_the_store_is_down_go_in_without_a_new_accept(
    db_url: str, tmp_path: Path
) -> None:
    """A worker that starts while the store is unavailable keeps its journal's accepts
    waiting; they went in only when some new accept arrived at that worker."""
    path = tmp_path / "async" / "accepts-w.journal"
    record = accepted_record(parse_async_body(b'{"model_input": 1}'), "m1", "d1", None, utcnow())
    journal = AcceptJournal(path)
    journal.append([record])
    journal.close()
    db = Database(db_url)
    with db.engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE async_requests RENAME TO async_requests_away")
    running = RunningGateway()

    async def build() -> AsyncFront:  # as `kingpost server` does: on its loop
        return AsyncFront(db_url, journal=path)

    front = asyncio.run_coroutine_threadsafe(build(), running.loop).result(10)
    running.gateway.async_front = front
    try:
        assert front._unflushed  # waiting
        with db.engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE async_requests_away RENAME TO async_requests")
        q = AsyncQueue(db)
        wait_for(lambda: in_store(q, record["id"]), 10, "the recovered accept in the store")
    finally:
        running.close()
        db.close()
