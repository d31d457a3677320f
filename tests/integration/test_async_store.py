"""The async queue against real databases (SQLite always; PostgreSQL when
KINGPOST_TEST_POSTGRES_URL names one), migrated by Alembic."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from helpers.postgres import worker_database
from kingpost.asyncq.body import AsyncInput
from kingpost.asyncq.policy import RetryConfig, choose
from kingpost.errors import ConflictError, NotFoundError
from kingpost.secrets_box import SecretBox, load_or_create_key
from kingpost.store import Database
from kingpost.store.asyncq import AsyncQueue
from kingpost.store.models import AsyncStatus, WebhookStatus

T0 = datetime(2026, 12, 5, 1, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgresql"])
def queue(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AsyncQueue]:
    if request.param == "postgresql":
        with worker_database() as db:
            db.migrate()
            yield AsyncQueue(db)
        return
    with sqlite_queue(tmp_path) as q:
        yield q


@contextlib.contextmanager
def sqlite_queue(directory: Path) -> Iterator[AsyncQueue]:
    """A queue on a migrated SQLite file in ``directory``."""
    db = Database(f"sqlite:///{directory / 'k.db'}")
    db.migrate()
    try:
        yield AsyncQueue(db)
    finally:
        db.close()


def put(q: AsyncQueue, prio: int = 0, at: float = 0, dep: str = "d1", **kw: object) -> str:
    inp = AsyncInput(model_input='{"x":1}', priority=prio, **kw)  # type: ignore[arg-type]
    return q.enqueue(inp, model_id="m1", deployment_id=dep, now=T0 + timedelta(seconds=at))


def test_priority_then_age_and_claim(queue: AsyncQueue) -> None:
    low = put(queue, 2, 0)
    old = put(queue, 0, 1)
    new = put(queue, 0, 2)
    mid = put(queue, 1, 0)
    put(queue, 0, 0, dep="other")
    cands = queue.candidates("d1", 10)
    assert [c.id for c in cands] == [old, new, mid, low]
    pick = choose(cands, T0 + timedelta(seconds=5), 2)
    taken = queue.claim(pick.run, now=T0 + timedelta(seconds=5))
    assert [t.id for t in taken] == [old, new]
    assert all(t.status == AsyncStatus.IN_PROGRESS and t.attempts == 1 for t in taken)
    assert queue.claim([old]) == []  # already taken: nothing runs twice
    assert queue.depths() == {"d1": (2, 2), "other": (1, 0)}
    # Which have queued work: "d1" and "other"; "none" never had any.
    assert queue.queued_in(["d1", "none", "other"]) == {"d1", "other"}
    assert queue.queued_in([]) == set()
    counts = queue.counts("d1")
    assert (counts[AsyncStatus.QUEUED], counts[AsyncStatus.IN_PROGRESS]) == (2, 2)


def test_outcomes_are_recorded_once(queue: AsyncQueue) -> None:
    rid = put(queue, webhook_endpoint="https://h.example/x")
    queue.claim([rid])
    assert queue.succeed(rid, '{"y":2}')
    assert not queue.succeed(rid, '{"y":3}')  # a second outcome is not recorded
    assert not queue.fail(rid, [{"code": "X", "message": "m"}])
    got = queue.get(rid)
    assert got.status == AsyncStatus.SUCCEEDED and got.result_dict()["data"] == {"y": 2}
    assert got.webhook_status == WebhookStatus.PENDING
    assert queue.requeue_in_progress() == 0  # a recorded completion never runs again


def test_restart_requeues_unrecorded_runs(queue: AsyncQueue) -> None:
    a, b = put(queue), put(queue, at=1)
    queue.claim([a, b])
    queue.succeed(a, "1")
    assert queue.requeue_in_progress() == 1
    assert queue.get(b).status == AsyncStatus.QUEUED and queue.get(b).attempts == 1
    assert queue.get(a).status == AsyncStatus.SUCCEEDED


def test_retry_backs_off_then_fails(queue: AsyncQueue) -> None:
    rid = put(queue, retry=RetryConfig(2, 100, 100))
    # Picked by a settle before its first run: on SQLite the settle keeps the timestamps
    # it parsed, and the backoff below must still be read as the row's new not_before.
    assert queue.settle([], [], {"d1": (5, 10)}, T0).ready == {"d1": (rid,)}
    queue.claim([rid], now=T0)
    err = [{"code": "MODEL_PREDICT_ERROR", "message": "boom"}]
    assert queue.retry_later(rid, err, T0 + timedelta(seconds=1), now=T0)
    assert choose(queue.candidates("d1", 5), T0, 5).run == ()
    assert choose(queue.candidates("d1", 5), T0 + timedelta(seconds=1), 5).run == (rid,)
    for _ in range(2):  # the workers' settle reads the same, the second time from parsed
        assert queue.settle([], [], {"d1": (5, 10)}, T0).ready == {"d1": ()}
        later = queue.settle([], [], {"d1": (5, 10)}, T0 + timedelta(seconds=1))
        assert later.ready == {"d1": (rid,)}
    queue.claim([rid])
    assert queue.fail(rid, err)
    got = queue.get(rid)
    assert (got.status, got.attempts, got.errors[0]["message"]) == (AsyncStatus.FAILED, 2, "boom")


def test_settle_claims_records_then_picks_and_expires_in_one_transaction(
    queue: AsyncQueue,
) -> None:
    ran = put(queue, 0, 0)
    queue.claim([ran], now=T0)
    started = put(queue, 0, 0.1)  # started by the workers since their last settle
    stale = put(queue, 2, 0, max_time_in_queue_seconds=10)
    low, high = put(queue, 1, 1), put(queue, 0, 2)
    canceled = put(queue, 0, 0.5)
    queue.cancel(canceled)  # after the workers picked it, before their claim
    other = put(queue, 0, 0, dep="d2")
    now = T0 + timedelta(seconds=20)
    done = [(ran, AsyncQueue.succeeded_values('"ok"', now)), ("gone", {"status": "FAILED"})]
    claims = [(started, now), (canceled, now)]
    picked = queue.get(started)
    got = queue.settle(done, claims, {"d1": (1, 10), "d2": (0, 10)}, now)
    assert queue.get(started) == picked.claimed(now)  # the workers' copy is the row
    # What started is claimed, the canceled one named lost; the run's outcome is recorded;
    # the next pick is the highest priority (not the canceled one, nor the older
    # low-priority one); the one past its wait expires.
    assert got.recorded == 1 and got.expired == 1 and got.lost == (canceled,)
    assert got.ready == {"d1": (high,), "d2": ()}
    assert got.rows == {high: queue.get(high)}  # whole, as stored, still queued
    assert got.rows[high].status == AsyncStatus.QUEUED
    taken = queue.get(started)
    assert (taken.status, taken.attempts, taken.started_at) == (AsyncStatus.IN_PROGRESS, 1, now)
    assert queue.get(canceled).status == AsyncStatus.CANCELED
    assert queue.get(ran).status == AsyncStatus.SUCCEEDED
    assert queue.get(stale).status == AsyncStatus.EXPIRED
    assert queue.get(low).status == AsyncStatus.QUEUED
    assert queue.get(other).status == AsyncStatus.QUEUED  # picked nothing there
    # The rows the workers hold already are not read again.
    again = queue.settle([], [], {"d1": (2, 10)}, now, have={high})
    assert again.ready == {"d1": (high, low)} and list(again.rows) == [low]
    assert queue.settle(done, [], {}, now).recorded == 0  # nothing is recorded twice


def test_a_run_that_ended_before_its_claim_and_a_claim_sent_again(queue: AsyncQueue) -> None:
    fast, slow = put(queue, at=1), put(queue, at=2)
    now = T0 + timedelta(seconds=5)
    # A run can end before the settle that claims it: the claim goes first, then its
    # outcome is recorded (the other order would leave it IN_PROGRESS for good).
    done = [(fast, AsyncQueue.succeeded_values('"ok"', now))]
    got = queue.settle(done, [(fast, now), (slow, now)], {}, now)
    assert (got.recorded, got.lost) == (1, ())
    assert queue.get(fast).status == AsyncStatus.SUCCEEDED
    # A claim whose commit went through and then raised is sent again: the row is the
    # workers' own claim (IN_PROGRESS since that start), not a cancel's, and not counted
    # twice; a different start is someone else's.
    assert queue.settle([], [(slow, now)], {}, now).lost == ()
    taken = queue.get(slow)
    assert (taken.status, taken.attempts) == (AsyncStatus.IN_PROGRESS, 1)
    assert queue.settle([], [(slow, now + timedelta(seconds=1))], {}, now).lost == (slow,)


def test_settle_writes_each_outcome_as_the_single_calls_do(queue: AsyncQueue) -> None:
    # Each kind of outcome a settle records leaves the row its single call does (the
    # release failed on both databases once). On SQLite settle runs its own SQL on the
    # driver's cursor, on PostgreSQL the Core statements the single calls run.
    err = [{"code": "MODEL_PREDICT_ERROR", "message": "boom"}]
    later = T0 + timedelta(seconds=30)
    kinds = {
        "succeeded": (AsyncQueue.succeeded_values('{"y": 2}', T0), queue.succeed, ('{"y": 2}', T0)),
        "failed": (AsyncQueue.failed_values(err, T0), queue.fail, (err, T0)),
        "retry": (AsyncQueue.retry_values(err, later, T0), queue.retry_later, (err, later, T0)),
        "release": (AsyncQueue.release_values(later, T0, 0), queue.release, (later, 0, T0)),
    }
    for name, (values, single, args) in kinds.items():
        a, b = put(queue, dep=f"a-{name}"), put(queue, dep=f"b-{name}")
        queue.claim([b], now=T0)
        assert queue.settle([], [(a, T0)], {}, T0).lost == ()
        claimed = queue.get(a)
        assert (claimed.status, claimed.attempts, claimed.started_at) == (
            AsyncStatus.IN_PROGRESS,
            1,
            T0,
        )
        same = ("status", "attempts", "started_at", "status_at")
        single_claim = queue.get(b)  # a settle's claim is the single call's
        assert {k: getattr(claimed, k) for k in same} == {
            k: getattr(single_claim, k) for k in same
        }, name
        assert queue.settle([(a, values)], [], {}, T0).recorded == 1
        assert single(b, *args)
        one, other = queue.get(a), queue.get(b)
        same = ("status", "attempts", "result", "errors", "webhook_status", "finished_at")
        assert {k: getattr(one, k) for k in same} == {k: getattr(other, k) for k in same}, name
        assert [c.not_before for c in queue.candidates(f"a-{name}", 5)] == [
            c.not_before for c in queue.candidates(f"b-{name}", 5)
        ], name
        # Started and ended between two settles: claimed and recorded by one of them.
        c = put(queue, dep=f"c-{name}")
        got = queue.settle([(c, values)], [(c, T0)], {}, T0)
        assert (got.recorded, got.lost) == (1, ()), name
        both = queue.get(c)
        same = (*same, "started_at", "status_at")
        assert {k: getattr(both, k) for k in same} == {k: getattr(other, k) for k in same}, name
        assert [x.not_before for x in queue.candidates(f"c-{name}", 5)] == [
            x.not_before for x in queue.candidates(f"b-{name}", 5)
        ], name
    assert queue.get(put(queue, dep="a-release")).attempts == 0
    assert queue.depths()["a-release"] == (2, 0)  # released: queued again, attempt undone
    assert queue.depths()["c-release"] == (1, 0)


def test_runs_claimed_and_ended_in_one_settle_with_a_cancel_among_them(
    queue: AsyncQueue,
) -> None:
    done_fast, canceled, claimed_before = put(queue), put(queue, at=1), put(queue, at=2)
    now = T0 + timedelta(seconds=5)
    queue.cancel(canceled)  # after the pick, before the settle that claims its run
    queue.settle([], [(claimed_before, now)], {}, now)  # a claim whose commit then raised
    ok = AsyncQueue.succeeded_values('"ok"', now)
    outcomes = [(rid, ok) for rid in (done_fast, canceled, claimed_before)]
    claims = [(rid, now) for rid in (done_fast, canceled, claimed_before)]
    got = queue.settle(outcomes, claims, {}, now)
    # The canceled run is named lost and nothing of it recorded; the two others are
    # recorded once each, the claim sent again counted as the workers' own.
    assert (got.recorded, got.lost) == (2, (canceled,))
    assert queue.get(canceled).status == AsyncStatus.CANCELED
    for rid in (done_fast, claimed_before):
        row = queue.get(rid)
        assert (row.status, row.attempts, row.started_at) == (AsyncStatus.SUCCEEDED, 1, now)
    again = queue.settle(outcomes, claims, {}, now)  # all sent again: nothing changes
    assert again.recorded == 0 and set(again.lost) == {done_fast, canceled, claimed_before}
    assert queue.get(done_fast).attempts == 1


def test_cancel_and_expire(queue: AsyncQueue) -> None:
    a, b, c = put(queue, webhook_endpoint="https://h.example/"), put(queue), put(queue)
    assert queue.cancel(a, "m1").status == AsyncStatus.CANCELED
    assert queue.get(a).webhook_status == WebhookStatus.CANCELED
    with pytest.raises(ConflictError, match="only a QUEUED request"):
        queue.cancel(a, "m1")
    with pytest.raises(NotFoundError):
        queue.cancel(b, "another-model")
    queue.claim([b])
    with pytest.raises(ConflictError, match="IN_PROGRESS"):
        queue.cancel(b)
    assert queue.expire([b, c]) == 1  # b runs: only a queued one expires
    assert queue.get(c).status == AsyncStatus.EXPIRED


def test_many_finished_requests_are_counted_at_most_once_a_second(
    queue: AsyncQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counting the finished requests reads every one the deployment keeps; from
    FINISHED_COUNTS_KEPT_FROM (1 here) the count stands for ``counts_refresh`` seconds
    (KINGPOST_ASYNC_COUNTS_REFRESH), and the live counts are read every time."""
    import kingpost.store.asyncq as asyncq

    monkeypatch.setattr(asyncq, "FINISHED_COUNTS_KEPT_FROM", 1)
    queue.counts_refresh = 0.3
    done, running = put(queue), put(queue)
    queue.claim([done, running], now=T0)
    queue.succeed(done, '"ok"', now=T0)
    first = queue.counts("d1")
    assert (first[AsyncStatus.SUCCEEDED], first[AsyncStatus.IN_PROGRESS]) == (1, 1)
    queue.succeed(running, '"ok"', now=T0)
    put(queue)
    kept = queue.counts("d1")  # the finished count stands; the live ones are read
    assert (kept[AsyncStatus.SUCCEEDED], kept[AsyncStatus.IN_PROGRESS]) == (1, 0)
    assert kept[AsyncStatus.QUEUED] == 1
    time.sleep(0.35)
    assert queue.counts("d1")[AsyncStatus.SUCCEEDED] == 2
    monkeypatch.setattr(asyncq, "FINISHED_COUNTS_KEPT_FROM", 3)  # fewer: read every time
    time.sleep(0.35)
    queue.counts("d1")  # two finished: not kept
    queue.fail(queue.claim([put(queue)], now=T0)[0].id, [], now=T0)
    assert queue.counts("d1")[AsyncStatus.FAILED] == 1
    monkeypatch.setattr(asyncq, "FINISHED_COUNTS_KEPT_FROM", 1)
    queue.counts_refresh = 0  # KINGPOST_ASYNC_COUNTS_REFRESH=0: counted on every read
    time.sleep(0.35)  # the count kept above (three finished) lapses
    queue.counts("d1")
    queue.fail(queue.claim([put(queue)], now=T0)[0].id, [], now=T0)
    assert queue.counts("d1")[AsyncStatus.FAILED] == 2


def test_an_expired_requests_webhook_is_due(queue: AsyncQueue) -> None:
    """An expiry finishes a request as a run does: its webhook is due at once (it was
    never due once, and the request was never swept either), by either path."""
    hook = {"webhook_endpoint": "https://h.example/", "max_time_in_queue_seconds": 10}
    by_call, by_settle = put(queue, **hook), put(queue, dep="d2", **hook)
    later = T0 + timedelta(seconds=30)
    assert queue.expire([by_call], now=later) == 1
    assert queue.settle([], [], {"d2": (1, 10)}, later).expired == 1
    assert {v.id for v in queue.due_webhooks(later)} == {by_call, by_settle}
    for rid in (by_call, by_settle):
        queue.record_webhook(rid, delivered=True, now=later)
    assert queue.sweep(timedelta(days=7), now=later + timedelta(days=8)) == 2


def test_webhook_delivery_records_and_sweep(queue: AsyncQueue, tmp_path: Path) -> None:
    rid = put(queue, webhook_endpoint="https://h.example/")
    queue.claim([rid], now=T0)
    queue.succeed(rid, '"ok"', now=T0)
    assert [v.id for v in queue.due_webhooks(T0)] == [rid]
    queue.record_webhook(rid, delivered=False, error="503", retry_at=T0 + timedelta(seconds=2))
    assert queue.due_webhooks(T0 + timedelta(seconds=1)) == []
    queue.record_webhook(rid, delivered=False, error="connection refused", now=T0)
    got = queue.get(rid)
    assert (got.status, got.webhook_status) == (AsyncStatus.WEBHOOK_FAILED, WebhookStatus.FAILED)
    assert (got.webhook_attempts, got.webhook_error) == (2, "connection refused")
    assert got.result_dict()["data"] == "ok"  # readable after the webhook failed
    assert queue.sweep(timedelta(days=7), now=T0 + timedelta(days=6)) == 0
    assert queue.sweep(timedelta(days=7), now=T0 + timedelta(days=8)) == 1
    with pytest.raises(NotFoundError):
        queue.get(rid)


def test_the_sweep_goes_in_batches_and_keeps_what_is_young_or_due(
    queue: AsyncQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kingpost.store.asyncq as store_asyncq

    monkeypatch.setattr(store_asyncq, "SWEEP_BATCH", 2)
    old = [put(queue) for _ in range(5)]
    due = put(queue, webhook_endpoint="https://h.example/")
    young = put(queue)
    queue.claim([*old, due], now=T0)
    for rid in [*old, due]:
        assert queue.succeed(rid, '"ok"', now=T0)
    queue.claim([young], now=T0 + timedelta(days=5))
    assert queue.succeed(young, '"ok"', now=T0 + timedelta(days=5))
    assert queue.sweep(timedelta(days=7), now=T0 + timedelta(days=8)) == 5  # three batches
    assert queue.get(due).webhook_status == WebhookStatus.PENDING  # its webhook is still due
    assert queue.get(young).status == AsyncStatus.SUCCEEDED
    for rid in old:
        with pytest.raises(NotFoundError):
            queue.get(rid)


def test_webhook_secrets_are_sealed(queue: AsyncQueue, tmp_path: Path) -> None:
    box = SecretBox(load_or_create_key(tmp_path, None))
    first, value = queue.create_webhook_secret(box)
    assert value.startswith("whsec_")
    _, newer = queue.create_webhook_secret(box)
    assert set(queue.webhook_secrets(box)) == {value, newer}
    queue.delete_webhook_secret(first.id)
    assert queue.webhook_secrets(box) == [newer]
    with pytest.raises(NotFoundError, match="webhook secret"):
        queue.delete_webhook_secret(first.id)


def test_the_workers_reads_use_their_indexes_on_sqlite(tmp_path: Path) -> None:
    """With no statistics (SQLite is never ANALYZEd here), a claim by ``id IN (...) AND
    status = ?`` was planned on the status index: a scan of every queued request per
    claim. The statements a queue read and a claim run must each go by an index that
    finds just their rows (a performance guard: their plans, not a timing)."""
    import sqlite3

    from sqlalchemy import event

    from kingpost.store.asyncq import _queued_probe_sql

    db = Database(f"sqlite:///{tmp_path / 'k.db'}")
    db.migrate()
    q = AsyncQueue(db)
    ids = [put(q) for _ in range(10)]
    ran: list[tuple[str, Any]] = []

    def grab(_c: Any, _cur: Any, sql: str, params: Any, _ctx: Any, many: bool) -> None:
        ran.append((sql, params[0] if many else params))

    for engine in {db.engine, q._reader}:  # the writer, and the reads' own engine
        event.listen(engine, "before_cursor_execute", grab)
    assert len(q.candidates("d1", 8)) == 8
    assert q.queued_in(["d1", "d2"]) == {"d1"}  # one probe per deployment, on the driver
    assert len(q.claim(ids[:8], now=T0)) == 8  # a worker's claim: up to its free slots
    hot = q._local  # the settle's own SQL on the driver's cursor
    assert hot is not None
    ran += [
        (hot._candidates, ("d1", "QUEUED", "2026-12-05 01:00:00.000000", 8)),
        (hot._claim, ("IN_PROGRESS", "t", "t", ids[8], "QUEUED")),
        (f"{hot._rows_by_id}(?, ?)", (ids[8], ids[9])),
        (_queued_probe_sql(2), ("d1", "QUEUED", "d2", "QUEUED")),
    ]
    q.close()
    db.close()
    conn = sqlite3.connect(tmp_path / "k.db")
    plans = [
        [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params)]
        for sql, params in ran
        if "async_requests" in sql
    ]
    probes = [p for p in plans if p[0] == "SCAN CONSTANT ROW"]  # a subquery per deployment
    assert len(probes) == 1 and len(probes[0]) == 5, probes
    for step in probes[0][1:]:  # a seek on both columns (either index has them)
        if not step.startswith("SCALAR SUBQUERY"):
            assert step.startswith("SEARCH async_requests USING"), step
            assert "deployment_id=?" in step and "status=?" in step, step
    plans = [p for p in plans if p not in probes]
    assert len(plans) >= 6, [sql for sql, _ in ran]  # the read, the claim, the read-back
    for steps in plans:
        assert len(steps) == 1, steps  # one search, no sort
        assert steps[0].startswith("SEARCH async_requests USING INDEX"), steps
        assert "ix_async_requests_status" not in steps[0], steps


def test_sqlite_cursor_writes_on_a_full_disk_are_507_and_leave_nothing(tmp_path: Path) -> None:
    """The SQLite hot path (accepts inserted, settles) writes through the driver's cursor;
    SQLITE_FULL there is the same 507 as through SQLAlchemy, and rolls back whole."""
    from sqlalchemy import event, text

    from kingpost.errors import InsufficientStorageError
    from kingpost.store.asyncq import accepted_record

    db = Database(f"sqlite:///{tmp_path / 'k.db'}")
    db.migrate()
    queue = AsyncQueue(db)
    kept = put(queue)
    with db.engine.connect() as conn:
        pages = int(conn.execute(text("PRAGMA page_count")).scalar_one())

    def cap(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.execute(f"PRAGMA max_page_count = {pages + 2}")

    event.listen(db.engine, "connect", cap)
    db.engine.dispose()
    big = AsyncInput(model_input='"' + "x" * 100_000 + '"')
    records = [accepted_record(big, "m1", "d1", None, T0) for _ in range(20)]
    with pytest.raises(InsufficientStorageError, match="its disk is full"):
        queue.insert_accepted(records)
    assert queue.depths() == {"d1": (1, 0)}  # none of the 20: the transaction rolled back
    got = queue.settle([], [], {"d1": (1, 5)}, T0)  # the pool's connection is clean again
    assert got.ready == {"d1": (kept,)} and list(got.rows) == [kept]
    db.close()


@pytest.mark.parametrize("bad", ["https://h.example/\ud800", "https://h.example/\x00"])
def test_a_record_the_store_refuses_is_set_aside_and_the_rest_inserted(
    queue: AsyncQueue, bad: str
) -> None:
    """A record the store cannot take (SQLite: a lone surrogate; PostgreSQL: either) used
    to fail the whole batch, taken for the store being down, forever: now the rest go in
    and it is recorded FAILED, its webhook dropped."""
    from kingpost.store.asyncq import NOT_STORED, accepted_record, store_unavailable

    def record(hook: str | None = None) -> dict[str, Any]:
        inp = AsyncInput(model_input='{"x":1}', webhook_endpoint=hook)
        return accepted_record(inp, "m1", "d1", "production", T0)

    poisoned = not (queue.db.url.startswith("sqlite") and "\x00" in bad)  # SQLite keeps NUL
    if poisoned:
        with pytest.raises(Exception) as info:  # whatever the driver raises
            queue.insert_accepted([record(), record(bad)])
        assert not store_unavailable(info.value), info.value  # the record's fault
    fresh = [record(), record(bad), record("https://h.example/ok")]
    apart = queue.insert_accepted_apart(fresh)
    assert apart == ([fresh[1]["id"]] if poisoned else [])
    assert queue.get(fresh[0]["id"]).status == AsyncStatus.QUEUED
    assert queue.get(fresh[2]["id"]).webhook_status == WebhookStatus.PENDING
    got = queue.get(fresh[1]["id"])
    if poisoned:
        assert got.status == AsyncStatus.FAILED
        assert got.webhook_status == WebhookStatus.NO_WEBHOOK_PROVIDED
        assert got.errors[0]["code"] == NOT_STORED and "not run" in got.errors[0]["message"]
        assert queue.insert_accepted_apart(fresh) == [fresh[1]["id"]]  # a replay: the same
    assert queue.depths()["d1"][0] >= 2


def test_a_store_that_refuses_everything_is_never_taken_for_bad_records(
    queue: AsyncQueue,
) -> None:
    from sqlalchemy import text

    from kingpost.store.asyncq import accepted_record, store_unavailable

    rec = accepted_record(AsyncInput(model_input="1"), "m1", "d1", None, T0)
    with queue.db.engine.begin() as conn:
        conn.execute(text("ALTER TABLE async_requests RENAME TO async_requests_away"))
    try:
        with pytest.raises(Exception) as info:  # whatever the driver raises: it waits
            queue.insert_accepted_apart([rec])
        assert store_unavailable(info.value), info.value
    finally:
        with queue.db.engine.begin() as conn:
            conn.execute(text("ALTER TABLE async_requests_away RENAME TO async_requests"))
    with pytest.raises(NotFoundError):
        queue.get(rec["id"])
    assert queue.insert_accepted_apart([rec]) == []
    assert queue.get(rec["id"]).status == AsyncStatus.QUEUED


def test_retries_backing_off_do_not_hide_the_requests_behind_them(queue: AsyncQueue) -> None:
    """The queue's read took the first pick+8 queued rows, backing off or not, and left
    the choice to ``choose``: ten retries waiting out their backoff (older, so first)
    hid a newer request from an idle slot until it expired unrun. Both the settle's
    paths (SQLite's cursor, PostgreSQL's Core statement) read only what is due."""
    retry = RetryConfig(max_attempts=3, initial_delay_ms=10_000, max_delay_ms=60_000)
    err = [{"code": "MODEL_PREDICT_ERROR", "message": "500"}]
    backing_off = []
    for i in range(10):
        rid = put(queue, at=i / 1000, retry=retry)
        queue.claim([rid], T0 + timedelta(seconds=1))
        assert queue.retry_later(rid, err, T0 + timedelta(seconds=31), T0 + timedelta(seconds=1))
        backing_off.append(rid)
    fresh = put(queue, at=2, max_time_in_queue_seconds=10)
    at = T0 + timedelta(seconds=3)
    got = queue.settle([], [], {"d1": (1, 9)}, at)
    assert got.ready == {"d1": (fresh,)} and list(got.rows) == [fresh]
    assert [c.id for c in queue.candidates("d1", 20, at)] == [fresh]
    # One that waited too long is still found and expired; the retries never expire.
    late = put(queue, at=3, max_time_in_queue_seconds=10)
    got = queue.settle([], [], {"d1": (0, 8)}, T0 + timedelta(seconds=14))
    assert got.expired == 2 and queue.get(late).status == AsyncStatus.EXPIRED
    due = queue.settle([], [], {"d1": (20, 28)}, T0 + timedelta(seconds=31))
    assert due.ready == {"d1": tuple(backing_off)}


def test_failing_a_gone_deployments_queue_makes_its_webhooks_due(queue: AsyncQueue) -> None:
    from kingpost.asyncq.outcome import deployment_gone

    ids = [put(queue, dep="gone", webhook_endpoint="https://h.example/x") for _ in range(3)]
    other = put(queue, dep="d1")
    queue.claim([ids[0]], T0)  # running: its run's outcome is recorded, not this
    assert queue.fail_queued("gone", deployment_gone("gone"), T0 + timedelta(seconds=1)) == 2
    assert [queue.get(r).status for r in ids] == [AsyncStatus.IN_PROGRESS] + [
        AsyncStatus.FAILED
    ] * 2
    assert queue.get(ids[1]).errors[0]["code"] == "MODEL_DOES_NOT_EXIST"
    due = {v.id for v in queue.due_webhooks(T0 + timedelta(seconds=1))}
    assert due == set(ids[1:]) and queue.get(other).status == AsyncStatus.QUEUED
