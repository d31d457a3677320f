"""The async request queue: every read and write of ``async_requests`` and
``webhook_secrets``.

Written by the gateway (accept, cancel, status reads; its own small engine, see
``gateway/asyncroutes.py``) and by the control plane's workers (claim, outcome, webhook
deliveries, sweep). Each transition is one conditional ``UPDATE`` guarded by the status it
leaves, so a cancel racing a claim, or a restarted control plane, never applies twice: an
outcome is recorded only for a request still IN_PROGRESS, and a request whose outcome is
recorded is never run again.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import json
import logging
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

from sqlalchemy import (
    Engine,
    Integer,
    Table,
    Update,
    bindparam,
    create_engine,
    delete,
    event,
    exists,
    func,
    select,
    update,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session
from sqlalchemy.sql.expression import Executable

from kingpost.asyncq.body import AsyncInput
from kingpost.asyncq.policy import Candidate, RetryConfig, choose
from kingpost.errors import ConflictError, InsufficientStorageError, NotFoundError
from kingpost.secrets_box import SecretBox
from kingpost.store.db import Database, _sqlite_pragmas, full_disk_is_507
from kingpost.store.models import (
    AsyncRequest,
    AsyncStatus,
    UTCDateTime,
    WebhookSecret,
    WebhookStatus,
    utcnow,
)

__all__ = [
    "DONE",
    "AsyncQueue",
    "AsyncRequestView",
    "Settled",
    "WebhookSecretView",
    "accepted_record",
    "accepted_view",
    "store_unavailable",
]

log = logging.getLogger(__name__)

DONE = (
    AsyncStatus.SUCCEEDED,
    AsyncStatus.FAILED,
    AsyncStatus.EXPIRED,
    AsyncStatus.CANCELED,
    AsyncStatus.WEBHOOK_FAILED,
)
"""Statuses after which nothing runs again."""
SWEEP_BATCH = 500
"""Requests one transaction of the sweep deletes. An hour of a busy queue is millions of
rows: deleted at once they held SQLite's write lock for seconds, and the workers' settles
and the gateway's accepts would wait that long."""
_DELIVERABLE = (AsyncStatus.SUCCEEDED, AsyncStatus.FAILED, AsyncStatus.EXPIRED)
FINISHED_COUNTS_KEPT_FROM = 10_000
FINISHED_COUNTS_KEPT_S = 1.0
"""A queue status read counted every request the deployment keeps, an index entry each:
15 ms at 100,000 (a day of 1 req/s is 86,400), on every read, holding up the gateway's
inserts of accepted requests meanwhile. From ``FINISHED_COUNTS_KEPT_FROM`` finished
requests, their counts are read again at most once per ``KINGPOST_ASYNC_COUNTS_REFRESH``
(this by default) by each process; the live ones (QUEUED, IN_PROGRESS, Baseten's two)
are always read."""


def _iso(t: datetime | None) -> str | None:
    return t.isoformat() if t is not None else None


@dataclass(frozen=True)
class AsyncRequestView:
    id: str
    model_id: str
    deployment_id: str
    environment: str | None
    priority: int
    model_input: str
    webhook_endpoint: str | None
    retry: RetryConfig
    max_time_in_queue_seconds: int
    status: AsyncStatus
    webhook_status: WebhookStatus
    attempts: int
    result: str | None
    errors: tuple[dict[str, Any], ...]
    webhook_attempts: int
    webhook_error: str
    created_at: datetime
    status_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    def claimed(self, at: datetime) -> AsyncRequestView:
        """The row as a claim at ``at`` leaves it (IN_PROGRESS, one more attempt). Copied
        by its ``__dict__``: ``dataclasses.replace`` took 10 µs for these 20 fields, on
        every run the workers start."""
        view = object.__new__(type(self))
        view.__dict__.update(
            self.__dict__,
            status=AsyncStatus.IN_PROGRESS,
            attempts=self.attempts + 1,
            status_at=at,
            started_at=at,
        )
        return view

    def status_dict(self) -> dict[str, Any]:
        """Baseten's ``GET /async_request/{id}`` answer, plus Kingpost's attempt counts."""
        return {
            "request_id": self.id,
            "model_id": self.model_id,
            "deployment_id": self.deployment_id,
            "status": self.status.value,
            "webhook_status": self.webhook_status.value,
            "created_at": _iso(self.created_at),
            "status_at": _iso(self.status_at),
            "errors": list(self.errors),
            "attempts": self.attempts,
            "webhook_attempts": self.webhook_attempts,
            "webhook_error": self.webhook_error or None,
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
        }

    def result_dict(self) -> dict[str, Any]:
        """``GET /async_request/{id}/result`` (Kingpost's): the outcome as stored."""
        out: dict[str, Any] = {"request_id": self.id, "status": self.status.value}
        out["data"] = json.loads(self.result) if self.result is not None else None
        out["errors"] = list(self.errors)
        return out


@dataclass(frozen=True)
class WebhookSecretView:
    id: str
    created_at: datetime


def _view(r: Any) -> AsyncRequestView:
    """From an ``AsyncRequest`` or a plain row of its table (same attribute names)."""
    return AsyncRequestView(
        id=r.id,
        model_id=r.model_id,
        deployment_id=r.deployment_id,
        environment=r.environment,
        priority=r.priority,
        model_input=r.model_input,
        webhook_endpoint=r.webhook_endpoint,
        retry=RetryConfig(r.max_attempts, r.initial_delay_ms, r.max_delay_ms),
        max_time_in_queue_seconds=r.max_time_in_queue_seconds,
        status=AsyncStatus(r.status),
        webhook_status=WebhookStatus(r.webhook_status),
        attempts=r.attempts,
        result=r.result,
        errors=tuple(r.errors or ()),
        webhook_attempts=r.webhook_attempts,
        webhook_error=r.webhook_error,
        created_at=r.created_at,
        status_at=r.status_at,
        started_at=r.started_at,
        finished_at=r.finished_at,
    )


class AsyncQueue:
    def __init__(self, db: Database, *, counts_refresh: float = FINISHED_COUNTS_KEPT_S) -> None:
        """``counts_refresh``: how long a count of finished requests stands (``counts``)."""
        self.db = db
        self.counts_refresh = counts_refresh
        self._reader: Engine = db.engine
        self._local = _SqliteHotPath(db.engine) if db.url.startswith("sqlite") else None
        if self._local is not None:
            # Reads need no write lock: on SQLite every transaction of ``db`` takes one
            # (BEGIN IMMEDIATE), and the workers' polls would queue the gateway's accepts
            # behind them. In WAL mode a plain read sees the last commit.
            self._reader = create_engine(db.url, connect_args={"check_same_thread": False})
            event.listen(self._reader, "connect", _sqlite_pragmas)
        self._finished: dict[str, tuple[float, dict[AsyncStatus, int]]] = {}
        """Per deployment keeping many finished requests: their counts, and until when
        they stand (``counts``)."""
        self._finished_lock = threading.Lock()

    def _read(self) -> Session:
        return Session(self._reader, expire_on_commit=False)

    def close(self) -> None:
        if self._reader is not self.db.engine:
            self._reader.dispose()

    # -- the gateway's side ---------------------------------------------------------------
    def enqueue(
        self,
        req: AsyncInput,
        *,
        model_id: str,
        deployment_id: str,
        environment: str | None = None,
        now: datetime | None = None,
    ) -> str:
        return self.enqueue_many([(req, model_id, deployment_id, environment)], now)[0]

    def enqueue_many(
        self,
        items: Sequence[tuple[AsyncInput, str, str, str | None]],
        now: datetime | None = None,
    ) -> list[str]:
        """Queue requests ``(input, model_id, deployment_id, environment)`` in one
        transaction (the gateway commits the accepts that arrive together as a group);
        their ids, in order."""
        now = now or utcnow()
        records = [accepted_record(req, model, dep, env, now) for req, model, dep, env in items]
        self.insert_accepted(records)
        return [str(r["id"]) for r in records]

    def insert_accepted(self, records: Sequence[dict[str, Any]]) -> None:
        """Insert accepted requests (:func:`accepted_record`) in one transaction; an id
        already in the store is left as it is (the gateway's journal may replay a record
        it inserted before a crash)."""
        if records:
            self._insert_rows([_row(r) for r in records])

    def insert_accepted_apart(self, records: Sequence[dict[str, Any]]) -> list[str]:
        """:meth:`insert_accepted`, where one record the store cannot take keeps none of
        the others out: when the batch fails for a reason that is not the store's own
        (:func:`store_unavailable`: those raise, and the batch waits whole), each record
        is inserted alone, and one that still fails is set aside: recorded FAILED
        ``ASYNC_REQUEST_NOT_STORED`` as far as it can be written (its webhook dropped,
        its text escaped), logged. The ids set aside. Raises when nothing could be
        written at all: an error no record caused (a store refusing everything) is
        never taken for a bad record."""
        try:
            self.insert_accepted(records)
            return []
        except Exception as exc:
            if store_unavailable(exc):
                raise
            log.warning("async: a batch of %d accept(s) failed to insert (%s: %s); "
                        "inserting them one by one", len(records), type(exc).__name__,
                        _storable(str(exc)))  # fmt: skip
        apart: list[str] = []
        wrote = False
        for record in records:
            try:
                self.insert_accepted([record])
                wrote = True
                continue
            except Exception as exc:
                if store_unavailable(exc):
                    raise
                why = exc
            log.error("async: accepted request %s cannot be stored (%s: %s); it is "
                      "recorded FAILED and will not run", record["id"], type(why).__name__,
                      _storable(str(why)))  # fmt: skip
            try:
                self._insert_rows([_not_stored_row(record, why, utcnow())])
                wrote = True
            except Exception:
                if not wrote:
                    raise
                log.exception("async: accepted request %s could not even be recorded "
                              "FAILED: it is dropped", record["id"])  # fmt: skip
            apart.append(str(record["id"]))
        return apart

    def _insert_rows(self, rows: Sequence[dict[str, Any]]) -> None:
        if self._local is not None:
            with self._local.transaction() as cur:
                self._local.insert(cur, rows)
            return
        stmt: Executable
        if self.db.engine.dialect.name == "postgresql":
            stmt = pg_insert(AsyncRequest).on_conflict_do_nothing(index_elements=["id"])
        else:
            stmt = sqlite_insert(AsyncRequest).on_conflict_do_nothing(index_elements=["id"])
        with self.db.session() as s:
            s.execute(stmt, rows)

    def get(self, request_id: str, model_id: str | None = None) -> AsyncRequestView:
        """The request, if it belongs to ``model_id`` (when given); else 404."""
        with self._read() as s:
            row = s.get(AsyncRequest, request_id)
            if row is None or (model_id is not None and row.model_id != model_id):
                raise NotFoundError(
                    f"async request {request_id!r} not found", request_id=request_id
                )
            return _view(row)

    def cancel(
        self, request_id: str, model_id: str | None = None, now: datetime | None = None
    ) -> AsyncRequestView:
        """Cancel a QUEUED request; 409 naming its status otherwise."""
        now = now or utcnow()
        with self.db.session() as s:
            row = s.get(AsyncRequest, request_id)
            if row is None or (model_id is not None and row.model_id != model_id):
                raise NotFoundError(
                    f"async request {request_id!r} not found", request_id=request_id
                )
            done = s.execute(
                update(AsyncRequest)
                .where(AsyncRequest.id == request_id, AsyncRequest.status == AsyncStatus.QUEUED)
                .values(
                    status=AsyncStatus.CANCELED,
                    status_at=now,
                    finished_at=now,
                    webhook_status=_no_delivery(row),
                )
            )
            if done.rowcount != 1:  # type: ignore[attr-defined]
                raise ConflictError(
                    f"async request {request_id!r} is {row.status}: only a QUEUED request "
                    "can be canceled",
                    request_id=request_id,
                    status=str(row.status),
                )
            s.refresh(row)
            return _view(row)

    def counts(self, deployment_id: str) -> dict[AsyncStatus, int]:
        """Requests per status, all read by one statement (one snapshot); but once there
        are ``FINISHED_COUNTS_KEPT_FROM`` finished ones (kept for the retention, 7 days),
        those are counted again at most once per ``counts_refresh`` seconds here, and
        the reads between count QUEUED and IN_PROGRESS alone."""
        out = dict.fromkeys(AsyncStatus, 0)
        now = time.monotonic()
        with self._finished_lock:
            kept = self._finished.get(deployment_id)
        if kept is not None and now < kept[0]:  # the finished counts stand: the live ones
            with self._reader.connect() as conn:
                for status, n in conn.execute(_LIVE_COUNTS, {"dep": deployment_id}):
                    out[AsyncStatus(status)] = int(n)
            out.update(kept[1])
            return out
        with self._reader.connect() as conn:
            for status, n in conn.execute(_ALL_COUNTS, {"dep": deployment_id}):
                out[AsyncStatus(status)] = int(n)
        finished = {status: out[status] for status in DONE}
        with self._finished_lock:
            if sum(finished.values()) >= FINISHED_COUNTS_KEPT_FROM and self.counts_refresh > 0:
                self._finished[deployment_id] = (now + self.counts_refresh, finished)
            else:
                self._finished.pop(deployment_id, None)
        return out

    # -- the workers' side ----------------------------------------------------------------
    def depths(self) -> dict[str, tuple[int, int]]:
        """Per deployment with async work: (queued, in progress)."""
        live = (AsyncStatus.QUEUED, AsyncStatus.IN_PROGRESS)
        with self._read() as s:
            rows = s.execute(
                select(AsyncRequest.deployment_id, AsyncRequest.status, func.count())
                .where(AsyncRequest.status.in_(live))
                .group_by(AsyncRequest.deployment_id, AsyncRequest.status)
            ).all()
        out: dict[str, tuple[int, int]] = {}
        for dep, status, n in rows:
            q, p = out.get(dep, (0, 0))
            out[dep] = (q + int(n), p) if status == AsyncStatus.QUEUED else (q, p + int(n))
        return out

    def queued_in(self, deployment_ids: Collection[str]) -> set[str]:
        """Which of these deployments have a request queued: one index seek each (the
        queue index), where :meth:`depths` counts every queued request."""
        deps, out = list(deployment_ids), set[str]()
        chunks = [
            deps[i : i + _PROBES_PER_STATEMENT] for i in range(0, len(deps), _PROBES_PER_STATEMENT)
        ]
        if self._local is not None:  # SQL on the driver: SQLAlchemy's part was 5 times it
            raw = self._reader.raw_connection()
            try:
                cur = raw.cursor()
                queued = AsyncStatus.QUEUED.value
                for chunk in chunks:
                    args = [x for dep in chunk for x in (dep, queued)]
                    row = cur.execute(_queued_probe_sql(len(chunk)), args).fetchone()
                    out.update(dep for dep, hit in zip(chunk, row, strict=True) if hit)
            finally:
                raw.close()
            return out
        with self._reader.connect() as conn:
            for chunk in chunks:
                params = {f"d{j}": dep for j, dep in enumerate(chunk)}
                row = conn.execute(_queued_probe(len(chunk)), params).one()
                out.update(dep for dep, hit in zip(chunk, row, strict=True) if hit)
        return out

    def candidates(
        self, deployment_id: str, limit: int, now: datetime | None = None
    ) -> list[Candidate]:
        """A deployment's queued requests due at ``now`` in scheduling order (the first
        ``limit``); without ``now``, every queued one, backing off or not."""
        with self._read() as s:
            return _candidates(s, deployment_id, limit, now or _ANY_TIME)

    def settle(
        self,
        outcomes: Sequence[tuple[str, dict[str, Any]]],
        claims: Sequence[tuple[str, datetime]],
        wants: Mapping[str, tuple[int, int]],
        now: datetime,
        have: Collection[str] = (),
    ) -> Settled:
        """The workers' whole turn in one write transaction (one commit): claim the
        requests the workers started since the last turn (``claims``: ``(id, started
        at)``; those a cancel took first are ``lost``), record ``outcomes`` as
        :meth:`finish_many` does, then per deployment in ``wants`` (``dep -> (slots,
        candidates to read)``) read its queue in scheduling order, expire what waited too
        long and name what :func:`~kingpost.asyncq.policy.choose` picks for ``slots`` as
        the next to start (``ready``), with the rows of those not in ``have`` (the ones
        the workers hold already)."""
        if self._local is not None:
            with self._local.transaction() as cur:
                return self._local.settle(cur, outcomes, claims, wants, now, have)
        ready: dict[str, tuple[str, ...]] = {}
        expired = 0
        with self.db.session() as s:
            conn = s.connection()
            lost = []
            for rid, at in claims:  # one by one: a claim a cancel took first is named
                if conn.execute(_CLAIM, {"rid": rid, "now": at}).rowcount != 1:
                    mine = conn.execute(_CLAIM_OF, {"rid": rid}).first()
                    if tuple(mine or ()) != (AsyncStatus.IN_PROGRESS, at):
                        lost.append(rid)
            recorded = _finish_in(s, outcomes)
            for dep, (slots, limit) in wants.items():
                choice = choose(_candidates(s, dep, limit, now), now, slots)
                if choice.expire:
                    expired += _expire_in(s, choice.expire, now)
                ready[dep] = choice.run
            new = [rid for run in ready.values() for rid in run if rid not in have]
            rows = conn.execute(_ROWS, {"ids": new}).all() if new else []
            queued = {r.id: _view(r) for r in rows if r.status == AsyncStatus.QUEUED}
        return Settled(recorded, tuple(lost), expired, ready, queued)

    def claim(self, ids: Sequence[str], now: datetime | None = None) -> list[AsyncRequestView]:
        """Take queued requests to run (QUEUED -> IN_PROGRESS, one more attempt), in one
        transaction; those a cancel took first are left out."""
        if not ids:
            return []
        with self.db.session() as s:
            return _claim_in(s, ids, now or utcnow())

    def expire(self, ids: Iterable[str], now: datetime | None = None) -> int:
        with self.db.session() as s:
            return _expire_in(s, ids, now or utcnow())

    def _finish(self, rid: str, values: dict[str, Any]) -> bool:
        return self.finish_many([(rid, values)]) == 1

    def finish_many(self, outcomes: Sequence[tuple[str, dict[str, Any]]]) -> int:
        """Record several runs' outcomes in one transaction (the workers batch them);
        each only while its request is still IN_PROGRESS. Returns how many were."""
        with self.db.session() as s:
            return _finish_in(s, outcomes)

    @staticmethod
    def succeeded_values(result: str, now: datetime) -> dict[str, Any]:
        return {
            "status": AsyncStatus.SUCCEEDED,
            "result": result,
            "errors": [],
            "status_at": now,
            "finished_at": now,
            "webhook_not_before": now,
        }

    @staticmethod
    def failed_values(errors: list[dict[str, Any]], now: datetime) -> dict[str, Any]:
        return {
            "status": AsyncStatus.FAILED,
            "errors": errors,
            "status_at": now,
            "finished_at": now,
            "webhook_not_before": now,
        }

    def fail_queued(self, deployment_id: str, errors: list[dict[str, Any]], now: datetime) -> int:
        """Record up to ``SWEEP_BATCH`` of a deployment's queued requests FAILED with
        ``errors`` (its webhooks then due, as every finish's), in one short transaction;
        how many. For a deployment that is gone: nothing else would ever end them."""
        some = (
            select(_T.c.id)
            .where(_T.c.deployment_id == deployment_id, _T.c.status == AsyncStatus.QUEUED)
            .limit(SWEEP_BATCH)
        )
        with self.db.session() as s:
            done = s.execute(
                update(_T)
                .where(_T.c.id.in_(some.scalar_subquery()), _T.c.status == AsyncStatus.QUEUED)
                .values(self.failed_values(errors, now))
            )
            return int(done.rowcount)  # type: ignore[attr-defined]

    @staticmethod
    def retry_values(
        errors: list[dict[str, Any]], not_before: datetime, now: datetime
    ) -> dict[str, Any]:
        return {
            "status": AsyncStatus.QUEUED,
            "errors": errors,
            "status_at": now,
            "not_before": not_before,
        }

    @staticmethod
    def release_values(not_before: datetime, now: datetime, attempts: int) -> dict[str, Any]:
        """Back to the queue with ``attempts`` (those before the claim that is undone: the
        row's count cannot change while it is IN_PROGRESS). A plain value: the outcome
        statements bind every value (an ``attempts - 1`` expression here once failed
        every tick that tried to record it)."""
        return {
            "status": AsyncStatus.QUEUED,
            "status_at": now,
            "not_before": not_before,
            "attempts": attempts,
        }

    def succeed(self, rid: str, result: str, now: datetime | None = None) -> bool:
        """Record the model's answer (JSON text); False when the request is no longer
        IN_PROGRESS (nothing is recorded twice)."""
        return self._finish(rid, self.succeeded_values(result, now or utcnow()))

    def fail(self, rid: str, errors: list[dict[str, Any]], now: datetime | None = None) -> bool:
        return self._finish(rid, self.failed_values(errors, now or utcnow()))

    def retry_later(
        self,
        rid: str,
        errors: list[dict[str, Any]],
        not_before: datetime,
        now: datetime | None = None,
    ) -> bool:
        """Back to the queue after a failed attempt, not before ``not_before``."""
        return self._finish(rid, self.retry_values(errors, not_before, now or utcnow()))

    def release(
        self, rid: str, not_before: datetime, attempts: int, now: datetime | None = None
    ) -> bool:
        """Back to the queue without counting the attempt (``attempts``: the count before
        its claim): the gateway could not run it now (no replica in time, a full queue),
        which says nothing of the model."""
        return self._finish(rid, self.release_values(not_before, now or utcnow(), attempts))

    def requeue_in_progress(self, now: datetime | None = None) -> int:
        """After a control-plane restart: every run with no recorded outcome runs again."""
        now = now or utcnow()
        with self.db.session() as s:
            done = s.execute(
                update(AsyncRequest)
                .where(AsyncRequest.status == AsyncStatus.IN_PROGRESS)
                .values(status=AsyncStatus.QUEUED, status_at=now, not_before=now)
            )
            return int(done.rowcount)  # type: ignore[attr-defined]

    # -- webhooks and retention -----------------------------------------------------------
    def due_webhooks(self, now: datetime, limit: int = 32) -> list[AsyncRequestView]:
        """Finished requests whose webhook is due, the longest due first (every poll asks:
        plain rows of a statement built once, a third of the ORM's cost)."""
        with self._reader.connect() as conn:
            rows = conn.execute(_DUE_WEBHOOKS, {"now": now, "limit": limit}).all()
        return [_view(r) for r in rows]

    def record_webhook(
        self,
        rid: str,
        *,
        delivered: bool,
        error: str = "",
        retry_at: datetime | None = None,
        now: datetime | None = None,
    ) -> None:
        """One delivery's outcome: delivered, to be retried at ``retry_at``, or failed for
        good (the request becomes WEBHOOK_FAILED; its result stays readable)."""
        now = now or utcnow()
        values: dict[str, Any] = {
            "webhook_attempts": AsyncRequest.webhook_attempts + 1,
            "webhook_error": error,
        }
        if delivered:
            values["webhook_status"] = WebhookStatus.SUCCEEDED
        elif retry_at is not None:
            values["webhook_not_before"] = retry_at
        else:
            values.update(
                webhook_status=WebhookStatus.FAILED,
                status=AsyncStatus.WEBHOOK_FAILED,
                status_at=now,
            )
        with self.db.session() as s:
            s.execute(
                update(AsyncRequest)
                .where(AsyncRequest.id == rid, AsyncRequest.webhook_status == WebhookStatus.PENDING)
                .values(**values)
            )

    def sweep(self, retention: timedelta, now: datetime | None = None) -> int:
        """Delete finished requests (and their results) older than ``retention``; one
        whose webhook is still due is kept."""
        cutoff = (now or utcnow()) - retention
        old = (
            AsyncRequest.status.in_(DONE),
            AsyncRequest.finished_at < cutoff,
            AsyncRequest.webhook_status != WebhookStatus.PENDING,
        )
        gone = 0
        while True:  # a batch per transaction: the write lock is never held for long
            with self.db.session() as s:
                ids = s.scalars(select(AsyncRequest.id).where(*old).limit(SWEEP_BATCH)).all()
                if ids:
                    done = s.execute(delete(AsyncRequest).where(AsyncRequest.id.in_(ids), *old))
                    gone += int(done.rowcount)  # type: ignore[attr-defined]
            if len(ids) < SWEEP_BATCH:
                return gone

    # -- webhook secrets ------------------------------------------------------------------
    def create_webhook_secret(self, box: SecretBox) -> tuple[WebhookSecretView, str]:
        """A new signing secret (``whsec_`` and 32 random characters), shown once here."""
        value = "whsec_" + secrets.token_urlsafe(24)
        row = WebhookSecret(
            id=secrets.token_hex(4), ciphertext=box.seal(value), created_at=utcnow()
        )
        with self.db.session() as s:
            s.add(row)
        return WebhookSecretView(row.id, row.created_at), value

    def list_webhook_secrets(self) -> list[WebhookSecretView]:
        with self.db.session() as s:
            rows = s.scalars(select(WebhookSecret).order_by(WebhookSecret.created_at)).all()
            return [WebhookSecretView(r.id, r.created_at) for r in rows]

    def delete_webhook_secret(self, secret_id: str) -> None:
        with self.db.session() as s:
            done = s.execute(delete(WebhookSecret).where(WebhookSecret.id == secret_id))
            if done.rowcount != 1:  # type: ignore[attr-defined]
                raise NotFoundError(
                    f"webhook secret {secret_id!r} not found; "
                    "`kingpost webhooks secret list` shows them",
                    secret_id=secret_id,
                )

    def webhook_secrets(self, box: SecretBox) -> list[str]:
        """Every active secret's value, newest first (each signs every delivery)."""
        with self.db.session() as s:
            rows = s.scalars(select(WebhookSecret).order_by(WebhookSecret.created_at.desc())).all()
            return [box.open(f"webhook secret {r.id}", r.ciphertext) for r in rows]


def accepted_record(
    req: AsyncInput, model_id: str, deployment_id: str, environment: str | None, now: datetime
) -> dict[str, Any]:
    """What is kept of an accepted request (plain JSON: the gateway journals it)."""
    return {
        "id": secrets.token_hex(16),
        "model_id": model_id,
        "deployment_id": deployment_id,
        "environment": environment,
        "priority": req.priority,
        "model_input": req.model_input,
        "webhook_endpoint": req.webhook_endpoint,
        "max_attempts": req.retry.max_attempts,
        "initial_delay_ms": req.retry.initial_delay_ms,
        "max_delay_ms": req.retry.max_delay_ms,
        "max_time_in_queue_seconds": req.max_time_in_queue_seconds,
        "created_at": now.isoformat(),
    }


def _row(record: dict[str, Any]) -> dict[str, Any]:
    """An accepted record as a new ``async_requests`` row (QUEUED)."""
    created = datetime.fromisoformat(record["created_at"])
    return {
        **record,
        "status": AsyncStatus.QUEUED,
        "webhook_status": WebhookStatus.PENDING
        if record["webhook_endpoint"]
        else WebhookStatus.NO_WEBHOOK_PROVIDED,
        "attempts": 0,
        "not_before": created,
        "result": None,
        "errors": [],
        "webhook_attempts": 0,
        "webhook_error": "",
        "webhook_not_before": None,
        "created_at": created,
        "status_at": created,
        "started_at": None,
        "finished_at": None,
    }


NOT_STORED = "ASYNC_REQUEST_NOT_STORED"
"""The error code of an accepted request the store could not keep as it was."""


def _storable(text: str) -> str:
    """``text`` as any store keeps it: a lone surrogate escaped (SQLite cannot encode it)
    and NUL too (PostgreSQL refuses it)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


def _not_stored_row(record: dict[str, Any], why: BaseException, now: datetime) -> dict[str, Any]:
    """An accepted request the store refused as it was, as a FAILED row that names why:
    its text escaped, its webhook dropped (a URL the store refused is no URL to call)."""
    safe = {k: _storable(v) if isinstance(v, str) else v for k, v in record.items()}
    safe["webhook_endpoint"] = None
    message = (
        f"the request was accepted, but the store could not keep it as it was "
        f"({type(why).__name__}: {why}); it was not run"
    )
    return _row(safe) | {
        "status": AsyncStatus.FAILED,
        "status_at": now,
        "finished_at": now,
        "errors": [{"code": NOT_STORED, "message": _storable(message)[:2000]}],
    }


def store_unavailable(exc: BaseException) -> bool:
    """Whether a write failed for a reason of the store's, which every record would meet
    alike (no connection, a lock, a missing table, a full disk, no pooled connection in
    time), rather than of the data written (a value the driver or the database refuses:
    a lone surrogate on SQLite, NUL on PostgreSQL, a constraint)."""
    if isinstance(exc, (sa_exc.DataError, sa_exc.IntegrityError)):
        return False
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(
        exc,
        (
            InsufficientStorageError,
            OSError,
            sqlite3.OperationalError,
            sqlite3.InterfaceError,
            sa_exc.OperationalError,
            sa_exc.InterfaceError,
            sa_exc.ProgrammingError,
            sa_exc.InternalError,
            sa_exc.DisconnectionError,
            sa_exc.TimeoutError,
        ),
    )


def accepted_view(record: dict[str, Any]) -> AsyncRequestView:
    """An accepted request not yet in the store, as the store would show it (QUEUED)."""
    row = _row(record)
    return AsyncRequestView(
        id=row["id"],
        model_id=row["model_id"],
        deployment_id=row["deployment_id"],
        environment=row["environment"],
        priority=row["priority"],
        model_input=row["model_input"],
        webhook_endpoint=row["webhook_endpoint"],
        retry=RetryConfig(row["max_attempts"], row["initial_delay_ms"], row["max_delay_ms"]),
        max_time_in_queue_seconds=row["max_time_in_queue_seconds"],
        status=AsyncStatus.QUEUED,
        webhook_status=row["webhook_status"],
        attempts=0,
        result=None,
        errors=(),
        webhook_attempts=0,
        webhook_error="",
        created_at=row["created_at"],
        status_at=row["status_at"],
        started_at=None,
        finished_at=None,
    )


def _no_delivery(row: AsyncRequest) -> WebhookStatus:
    if row.webhook_status == WebhookStatus.NO_WEBHOOK_PROVIDED:
        return WebhookStatus.NO_WEBHOOK_PROVIDED
    return WebhookStatus.CANCELED


@dataclass(frozen=True)
class Settled:
    """What :meth:`AsyncQueue.settle` did."""

    recorded: int
    """Outcomes recorded (those whose request was still IN_PROGRESS)."""
    lost: tuple[str, ...]
    """Claims a cancel (or an expiry) took first: their runs are cut off."""
    expired: int
    ready: dict[str, tuple[str, ...]]
    """Per deployment, the queued requests to start next, in scheduling order."""
    rows: dict[str, AsyncRequestView]
    """The rows of those in ``ready`` the workers did not hold."""


_EXPIRED = [
    {
        "code": "EXPIRED",
        "message": "the request waited longer than its "
        "max_time_in_queue_seconds before a replica took it",
    }
]


_ANY_TIME = datetime(9999, 1, 1, tzinfo=UTC)
"""A ``now`` past every ``not_before``: the whole queue, backing off or not."""
# The queue's read leaves out what is not due yet (a retry backing off): read and dropped
# by ``choose``, those filled the read's first rows, and with more of them than the read
# takes (a retry keeps its age) every newer request behind them waited, and expired. A
# request that never ran is due from its acceptance (or a second after the gateway turned
# it away), so its expiry is seen at most that second late.
# The workers' statements, built once on the table (Core, not the ORM): each tick runs them,
# and building an ORM statement and its bulk-update plan anew cost more than the SQL
# (3.9 ms of a 2-outcome, 2-claim settle on SQLite; see bench/README.md, "Async").
_T: Table = AsyncRequest.__table__  # type: ignore[assignment]
_CANDIDATES = (
    select(
        _T.c.id,
        _T.c.priority,
        _T.c.created_at,
        _T.c.not_before,
        _T.c.max_time_in_queue_seconds,
        _T.c.attempts,
    )
    .where(
        _T.c.deployment_id == bindparam("dep"),
        _T.c.status == AsyncStatus.QUEUED,
        _T.c.not_before <= bindparam("now", type_=UTCDateTime),
    )
    .order_by(_T.c.priority, _T.c.created_at, _T.c.id)
    .limit(bindparam("limit", type_=Integer))
)
# One request per statement (executemany), and the rows read back by id alone: with
# ``id IN (...) AND status = ?`` SQLite's planner (no statistics) picked the status index
# and scanned every queued request, 5-7 ms a claim with 20,000 queued against 0.02.
_CLAIM = (
    update(_T)
    .where(_T.c.id == bindparam("rid"), _T.c.status == AsyncStatus.QUEUED)
    .values(
        status=AsyncStatus.IN_PROGRESS,
        attempts=_T.c.attempts + 1,
        status_at=bindparam("now", type_=UTCDateTime),
        started_at=bindparam("now", type_=UTCDateTime),
    )
)
_ROWS = select(_T).where(_T.c.id.in_(bindparam("ids", expanding=True)))
_DUE_WEBHOOKS = (
    select(_T)
    .where(
        _T.c.status.in_(_DELIVERABLE),
        _T.c.webhook_status == WebhookStatus.PENDING,
        _T.c.webhook_not_before <= bindparam("now", type_=UTCDateTime),
    )
    .order_by(_T.c.webhook_not_before)
    .limit(bindparam("limit", type_=Integer))
)
_CLAIM_OF = select(_T.c.status, _T.c.started_at).where(_T.c.id == bindparam("rid"))
"""A claim that took no row: the workers' own, if its first commit went through and
then raised (the claim is sent again), else a cancel's or an expiry's."""
_CLAIMED = select(_T).where(
    _T.c.id.in_(bindparam("ids", expanding=True)),
    _T.c.started_at == bindparam("now", type_=UTCDateTime),
)


_PROBES_PER_STATEMENT = 100
_LIVE_COUNTS = (
    select(_T.c.status, func.count())
    .where(
        _T.c.deployment_id == bindparam("dep"),
        _T.c.status.in_((AsyncStatus.QUEUED, AsyncStatus.IN_PROGRESS)),
    )
    .group_by(_T.c.status)
)
_ALL_COUNTS = (
    select(_T.c.status, func.count())
    .where(_T.c.deployment_id == bindparam("dep"))
    .group_by(_T.c.status)
)


@functools.cache
def _queued_probe_sql(n: int) -> str:
    """:func:`_queued_probe` as SQLite's SQL, parameters ``(deployment, QUEUED)`` each."""
    probe = "EXISTS (SELECT 1 FROM async_requests WHERE deployment_id = ? AND status = ?)"
    return "SELECT " + ", ".join([probe] * n)


@functools.cache
def _queued_probe(n: int) -> Executable:
    """Whether each of ``n`` deployments (parameters ``d0`` …) has a request queued."""
    return select(
        *(
            exists()
            .where(_T.c.deployment_id == bindparam(f"d{i}"), _T.c.status == AsyncStatus.QUEUED)
            .label(f"q{i}")
            for i in range(n)
        )
    )


@functools.cache
def _finish_statement(columns: tuple[str, ...]) -> Update:
    """Record an outcome (``columns`` set from parameters ``v_{column}``) while the request
    is still IN_PROGRESS; one statement per set of columns an outcome writes."""
    return (
        update(_T)
        .where(_T.c.id == bindparam("rid"), _T.c.status == AsyncStatus.IN_PROGRESS)
        .values({c: bindparam(f"v_{c}", type_=_T.c[c].type) for c in columns})
    )


def _candidates(s: Session, deployment_id: str, limit: int, now: datetime) -> list[Candidate]:
    params = {"dep": deployment_id, "limit": limit, "now": now}
    rows = s.connection().execute(_CANDIDATES, params).all()
    return [Candidate(r[0], r[1], r[2], r[3], r[4], r[5]) for r in rows]


def _claim_in(s: Session, ids: Sequence[str], now: datetime) -> list[AsyncRequestView]:
    conn = s.connection()
    conn.execute(_CLAIM, [{"rid": rid, "now": now} for rid in ids])
    rows = conn.execute(_CLAIMED, {"ids": list(ids), "now": now}).all()  # plain rows
    order = {rid: i for i, rid in enumerate(ids)}
    taken = (_view(r) for r in rows if r.status == AsyncStatus.IN_PROGRESS)  # by this claim
    return sorted(taken, key=lambda v: order[v.id])


def _expired_values(now: datetime) -> dict[str, Any]:
    """An expiry, as every finish: its webhook (if any) is due at once."""
    return {
        "status": AsyncStatus.EXPIRED,
        "status_at": now,
        "finished_at": now,
        "errors": _EXPIRED,
        "webhook_not_before": now,
    }


def _expire_in(s: Session, ids: Iterable[str], now: datetime) -> int:
    n = 0
    for rid in ids:
        done = s.execute(
            update(AsyncRequest)
            .where(AsyncRequest.id == rid, AsyncRequest.status == AsyncStatus.QUEUED)
            .values(_expired_values(now))
        )
        n += done.rowcount  # type: ignore[attr-defined]
    return n


def _finish_in(s: Session, outcomes: Sequence[tuple[str, dict[str, Any]]]) -> int:
    conn = s.connection()
    n = 0
    for rid, values in outcomes:
        stmt = _finish_statement(tuple(sorted(values)))
        params = {"rid": rid, **{f"v_{c}": v for c, v in values.items()}}
        n += conn.execute(stmt, params).rowcount
    return n


PARSED_KEPT = 16384
"""Timestamps the SQLite settle keeps parsed (``_SqliteHotPath._parsed``) before it starts
over (about 3 MB; one settle's reads past it). What it reads again is the front of each
deployment's queue: for 8 slots up to 72 rows, 128 on the ticks that look for expired
requests, two timestamps each (often the same text)."""


class _SqliteHotPath:
    """On SQLite, what runs per request: the workers' settle (:meth:`AsyncQueue.settle`)
    and the gateway's insert of accepted requests, the same statements run on the driver's
    cursor of a pooled connection, in a transaction of their own (:meth:`transaction`,
    ``BEGIN IMMEDIATE`` as every transaction on the store). SQLAlchemy's execution of a
    cached Core statement cost about 100 µs of Python, three quarters of a settle (1.0 ms
    against 0.35 ms for the same SQL, 2 outcomes and 2 claims) and a third of an insert
    (1.5 ms for 20 rows against 0.9 ms), time the control plane's or the gateway's GIL
    waits for. Values go through the columns' own bind and result processors for the dialect,
    so rows read and written here are the ones the Core statements read and write. The
    settle's claims go in one ``executemany``; only when some took no row is each looked
    at (``_CLAIM_OF``)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        d = engine.dialect
        self._names = tuple(c.name for c in _T.columns)
        self._bind = {c.name: c.type.dialect_impl(d).bind_processor(d) for c in _T.columns}
        self._result = tuple(c.type.dialect_impl(d).result_processor(d, None) for c in _T.columns)
        when = self._result[self._names.index("created_at")]
        assert when is not None  # SQLite keeps timestamps as text
        self._when: Callable[[Any], Any] = when
        self._parsed: dict[str, datetime] = {}
        """Timestamps read, by their text: every settle reads its candidates again."""
        self._processed = tuple((i, p) for i, p in enumerate(self._result) if p is not None)
        self._status_i = self._names.index("status")
        cols = ", ".join(self._names)
        self._candidates = (
            "SELECT id, priority, created_at, not_before, max_time_in_queue_seconds, attempts "
            "FROM async_requests WHERE deployment_id = ? AND status = ? AND not_before <= ? "
            "ORDER BY priority, created_at, id LIMIT ?"
        )
        self._claim = (
            "UPDATE async_requests SET status = ?, attempts = attempts + 1, status_at = ?, "
            "started_at = ? WHERE id = ? AND status = ?"
        )
        self._rows_by_id = f"SELECT {cols} FROM async_requests WHERE id IN "
        self._claim_of = "SELECT status, started_at FROM async_requests WHERE id = ?"

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Any]:
        """A cursor in a write transaction: committed when the block ends, rolled back if
        it raises (a disk full: 507, as :meth:`Database.session`)."""
        raw = self._engine.raw_connection()  # the pragmas: isolation_level None, WAL, ...
        driver = raw.driver_connection
        assert driver is not None
        try:
            with full_disk_is_507():
                cur = raw.cursor()
                try:
                    cur.execute("BEGIN IMMEDIATE")
                    try:
                        yield cur
                    except BaseException:
                        if driver.in_transaction:  # SQLITE_FULL may have ended it itself
                            cur.execute("ROLLBACK")
                        raise
                    cur.execute("COMMIT")
                finally:
                    cur.close()
        finally:
            raw.close()  # back to the pool, which rolls back whatever a failed COMMIT left

    def insert(self, cur: Any, rows: Sequence[dict[str, Any]]) -> None:
        """New rows (:func:`_row`, every one with the same columns); an id already there is
        left as it is."""
        names = tuple(rows[0])
        marks = ", ".join("?" * len(names))
        sql = (
            f"INSERT INTO async_requests ({', '.join(names)}) VALUES ({marks}) "
            "ON CONFLICT (id) DO NOTHING"
        )
        cur.executemany(sql, [tuple(self._value(n, r[n]) for n in names) for r in rows])

    def settle(
        self,
        cur: Any,
        outcomes: Sequence[tuple[str, dict[str, Any]]],
        claims: Sequence[tuple[str, datetime]],
        wants: Mapping[str, tuple[int, int]],
        now: datetime,
        have: Collection[str],
    ) -> Settled:
        running, queued = AsyncStatus.IN_PROGRESS.value, AsyncStatus.QUEUED.value
        lost = []
        started = [(rid, self._value("started_at", at)) for rid, at in claims]
        cur.executemany(self._claim, [(running, t, t, rid, queued) for rid, t in started])
        if cur.rowcount != len(started):  # some took no row: which, and whose (_CLAIM_OF)
            for rid, t in started:
                mine = cur.execute(self._claim_of, (rid,)).fetchone()
                if tuple(mine or ()) != (running, t):
                    lost.append(rid)
        recorded = self._set(cur, outcomes, AsyncStatus.IN_PROGRESS)
        ready: dict[str, tuple[str, ...]] = {}
        expired = 0
        for dep, (slots, limit) in wants.items():
            choice = choose(self._read_candidates(cur, dep, limit, now), now, slots)
            if choice.expire:
                gone = [(rid, _expired_values(now)) for rid in choice.expire]
                expired += self._set(cur, gone, AsyncStatus.QUEUED)
            ready[dep] = choice.run
        new = [rid for run in ready.values() for rid in run if rid not in have]
        return Settled(recorded, tuple(lost), expired, ready, self._rows(cur, new))

    def _value(self, column: str, value: Any) -> Any:
        """``value`` as the driver takes it for ``column``: its bind processor's output. A
        name that is not a column is refused here, before any SQL names it."""
        if isinstance(value, enum.Enum):
            value = value.value
        try:
            process = self._bind[column]
        except KeyError:
            raise KeyError(f"async_requests has no column {column!r}") from None
        return value if process is None or value is None else process(value)

    def _set(
        self, cur: Any, changes: Sequence[tuple[str, Mapping[str, Any]]], guard: AsyncStatus
    ) -> int:
        """Guarded transitions, ``(id, values)``: each written while the request's status
        is ``guard``; one statement per set of columns, run for all its requests. How
        many were written."""
        groups: dict[tuple[str, ...], list[tuple[Any, ...]]] = {}
        for rid, values in changes:
            columns = tuple(values)
            params = [self._value(c, values[c]) for c in columns]
            groups.setdefault(columns, []).append((*params, rid, guard.value))
        n = 0
        for columns, rows in groups.items():
            sets = ", ".join(f"{c} = ?" for c in columns)
            cur.executemany(f"UPDATE async_requests SET {sets} WHERE id = ? AND status = ?", rows)
            n += cur.rowcount
        return n

    def _read_candidates(self, cur: Any, dep: str, limit: int, now: datetime) -> list[Candidate]:
        """Each settle reads the front of the queue again (72 rows for 8 slots at full
        speed, 128 when it looks for expired ones), and parsing their two timestamps was
        a fifth of its Python: each text is parsed once."""
        due = self._value("not_before", now)
        rows = cur.execute(self._candidates, (dep, AsyncStatus.QUEUED.value, due, limit)).fetchall()
        parsed, when = self._parsed, self._when
        if len(parsed) > PARSED_KEPT:
            parsed.clear()
        out = []
        for r in rows:
            created, after = r[2], r[3]
            if (c := parsed.get(created)) is None:
                c = parsed[created] = when(created)
            if (a := parsed.get(after)) is None:
                a = parsed[after] = when(after)
            out.append(Candidate(r[0], r[1], c, a, r[4], r[5]))
        return out

    def _rows(self, cur: Any, ids: Sequence[str]) -> dict[str, AsyncRequestView]:
        """The queued requests among ``ids``, whole (read by id alone: see ``_CLAIM``)."""
        if not ids:
            return {}
        marks = ", ".join("?" * len(ids))
        rows = cur.execute(f"{self._rows_by_id}({marks})", ids).fetchall()
        out, queued, names = {}, AsyncStatus.QUEUED.value, self._names
        for row in rows:
            if row[self._status_i] != queued:
                continue
            values = list(row)
            for i, process in self._processed:
                if values[i] is not None:
                    values[i] = process(values[i])
            r = SimpleNamespace(**dict(zip(names, values, strict=True)))
            out[r.id] = _view(r)
        return out
