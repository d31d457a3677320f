"""Async inference routes, answered by the gateway from the store.

The one place the gateway touches the database: ``async_requests`` only, through
:class:`~kingpost.store.asyncq.AsyncQueue` on an engine of its own. An accepted request is
written to this worker's accept journal (``asyncq/journal.py``) before
``{"request_id": ...}`` is answered, so it survives a kill -9 of the gateway or the control
plane, and accepting needs no control plane and never waits for the store's write lock;
it is inserted into the store right after. The control plane's workers
(``asyncq/worker.py``) take it from there. Store and journal calls run on small thread
pools, never on the event loop.

Routes (Baseten's, under a model, with the same keys as predict):
``POST .../async_predict`` (201 ``{"request_id"}``), ``GET .../async_queue_status``,
``GET|DELETE /async_request/{id}``, and Kingpost's ``GET /async_request/{id}/result``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from kingpost.asyncq.body import DEFAULT_PAYLOAD_LIMIT, AsyncInput, parse_async_body
from kingpost.asyncq.journal import AcceptJournal, orphans, read_records
from kingpost.errors import InsufficientStorageError, KingpostError
from kingpost.gateway.framing import CONTINUE
from kingpost.gateway.routing import AsyncOp, Miss
from kingpost.store.asyncq import (
    FINISHED_COUNTS_KEPT_S,
    AsyncQueue,
    accepted_record,
    accepted_view,
)
from kingpost.store.db import Database
from kingpost.store.models import AsyncStatus, utcnow

if TYPE_CHECKING:
    from kingpost.gateway.proxy import ClientConn, Request

__all__ = ["AsyncFront"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_Item = tuple[AsyncInput, str, str, str | None]
FLUSH_GATHER_S = 0.02
"""How long journaled accepts gather before their insert into the store."""
_METHODS = {"predict": b"POST", "queue_status": b"GET", "result": b"GET"}


class AsyncFront:
    """What the gateway needs to answer async routes: the queue, the accept journal and
    the body's limits.

    With a ``journal`` (what ``kingpost server`` starts), an accept is durable once
    journaled and is inserted into the store after its answer; without one it is
    committed to the store before its answer. Requests journaled and not yet inserted
    (``_pending``) are answered from memory by status reads, counted by queue status, and
    waited for by a cancel.
    """

    def __init__(
        self,
        db_url: str,
        *,
        payload_limit: int = DEFAULT_PAYLOAD_LIMIT,
        allow_http: bool = False,
        threads: int = 4,
        journal: Path | None = None,
        journal_sync: bool = False,
        counts_refresh: float = FINISHED_COUNTS_KEPT_S,
    ) -> None:
        self.db = Database(db_url)
        self.queue = AsyncQueue(self.db, counts_refresh=counts_refresh)
        self.payload_limit = payload_limit
        self.allow_http = allow_http
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="kingpost-async")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="kingpost-async-commit")
        self._inserter = ThreadPoolExecutor(1, thread_name_prefix="kingpost-async-insert")
        self._to_write: list[tuple[dict[str, Any], asyncio.Future[str]]] = []
        self._committing = False
        self._committer: asyncio.Task[None] | None = None
        self._pending: dict[str, dict[str, Any]] = {}
        """Accepted, not yet in the store (journaled, or being journaled)."""
        self._unflushed: list[dict[str, Any]] = []
        """Journaled, not yet in the store, in order."""
        self._flusher: asyncio.Task[None] | None = None
        self._flushed = asyncio.Condition()
        self._store_down = False
        self._journal: AcceptJournal | None = None
        if journal is not None:
            self._journal = AcceptJournal(journal, sync=journal_sync)
            self._recover(journal)

    def _recover(self, own: Path) -> None:
        """Insert what this worker's last life, and any worker no longer running, left
        in their journals; what cannot be inserted now stays for the flusher."""
        assert self._journal is not None
        left = self._journal.leftovers()
        try:
            self.queue.insert_accepted_apart(left)
            self._journal.truncate()
        except Exception:
            log.exception("async: %d journaled accept(s) wait for the store", len(left))
            for record in left:
                self._pending[record["id"]] = record
            self._unflushed.extend(left)
            self._start_flusher()
        with orphans(own.parent, own) as held:
            for path, fd in held:
                try:
                    self.queue.insert_accepted_apart(read_records(path))
                    os.ftruncate(fd, 0)
                except Exception:
                    log.exception("async: the journal %s waits for the store", path)

    def _start_flusher(self) -> None:
        """Insert what waits without waiting for the next accept, where a loop runs
        (``kingpost server`` builds this on its loop); else the next accept starts it."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._flusher is None:
            self._flusher = loop.create_task(self._flush())

    async def _run(self, fn: Callable[[], _T]) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    async def _enqueue(self, item: _Item) -> str:
        """An unsynced journal is written here, on the loop (a write to the page cache,
        microseconds). Else group commit: accepts that arrive while a write runs wait for
        the next one, which writes them all at once (one journal append and fdatasync, or
        one store transaction without a journal)."""
        if self._unflushed and not self._flusher:
            self._flusher = asyncio.ensure_future(self._flush())  # leftovers of a restart
        if self._store_down and self._pending:
            raise StoreDown
        req, model_id, dep, env = item
        record = accepted_record(req, model_id, dep, env, utcnow())
        self._pending[record["id"]] = record
        if self._journal is not None and not self._journal.sync:
            try:
                self._journal.append([record])
            except Exception:
                del self._pending[record["id"]]
                raise
            self._journaled([record])
            return str(record["id"])
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._to_write.append((record, future))
        if not self._committing:
            self._committing = True
            self._committer = asyncio.ensure_future(self._commit_all())
        return await future

    async def _commit_all(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._to_write:
                batch, self._to_write = self._to_write, []
                records = [record for record, _ in batch]
                write = self._journal.append if self._journal else self.queue.insert_accepted
                try:
                    await loop.run_in_executor(self._writer, write, records)
                except Exception as exc:
                    for record, future in batch:
                        self._pending.pop(record["id"], None)
                        if not future.done():
                            future.set_exception(exc)
                    continue
                if self._journal is None:
                    for record in records:
                        self._pending.pop(record["id"], None)
                else:
                    self._journaled(records)
                for record, future in batch:
                    if not future.done():
                        future.set_result(record["id"])
        finally:
            self._committing = False

    def _journaled(self, records: list[dict[str, Any]]) -> None:
        self._unflushed.extend(records)
        if self._flusher is None:
            self._flusher = asyncio.ensure_future(self._flush())

    async def _flush(self) -> None:
        """Insert journaled accepts into the store (all there are, one transaction), then
        truncate the journal once nothing accepted is missing from the store. Only a
        failure of the store itself makes the batch wait (and later accepts 503); a
        record the store refuses is recorded FAILED apart from the rest
        (``AsyncQueue.insert_accepted_apart``), so it never holds up another."""
        loop = asyncio.get_running_loop()
        delay = 0.05
        try:
            while self._unflushed:
                # Off the accept path: wait a little so one transaction takes many (the
                # store's per-transaction cost, not per row, dominates at high rates).
                await asyncio.sleep(FLUSH_GATHER_S)
                batch = list(self._unflushed)
                async with self._flushed:  # a queue status read sees before or after
                    try:  # a record the store refuses is set aside, not retried
                        insert = self.queue.insert_accepted_apart
                        await loop.run_in_executor(self._inserter, insert, batch)
                    except Exception as exc:  # the store's own failure: all wait
                        failed: Exception | None = exc
                        if not self._store_down:
                            log.warning("async: %d accept(s) wait in the journal for the "
                                        "store: %s", len(batch), exc)  # fmt: skip
                        self._store_down = True
                    else:
                        failed = None
                        del self._unflushed[: len(batch)]
                        for record in batch:
                            self._pending.pop(record["id"], None)
                    self._flushed.notify_all()
                if failed is not None:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
                    continue
                self._store_down, delay = False, 0.05
                if not self._unflushed:
                    if self._journal is not None and self._journal.sync:
                        await loop.run_in_executor(self._writer, self._truncate_if_idle)
                    else:
                        self._truncate_if_idle()
        finally:
            self._flusher = None

    def _truncate_if_idle(self) -> None:
        """On the thread that appends (the writer's, or the loop's for an unsynced
        journal), so no append runs between the check and the truncate: an accept enters
        ``_pending`` before its append."""
        if self._journal is not None and not self._pending:
            self._journal.truncate()

    async def _in_store(self, rid: str) -> None:
        """Wait until an accepted request is in the store (a cancel acts on the store)."""
        async with self._flushed:
            while rid in self._pending:
                if self._store_down:
                    raise StoreDown
                await asyncio.wait_for(self._flushed.wait(), 10)

    def close(self) -> None:
        if self._unflushed and self._journal is not None:
            try:  # else the next start inserts them from the journal
                self.queue.insert_accepted_apart(self._unflushed)
                self._journal.truncate()
            except Exception:
                log.exception("async: journaled accepts are left for the next start")
        self._writer.shutdown(wait=False)
        self._inserter.shutdown(wait=False)
        self._pool.shutdown(wait=False)
        if self._journal is not None:
            self._journal.close()
        self.queue.close()
        self.db.close()

    async def answer(self, client: ClientConn, req: Request, miss: Miss) -> bool:
        """Answer one async route; whether the connection stays."""
        op = miss.async_op
        assert op is not None and req.rid is not None
        allowed = _METHODS.get(op.kind, b"GET|DELETE")
        if req.method not in allowed.split(b"|"):
            return client.reject(
                req, 405, f"{op.kind.replace('_', ' ')}: use {allowed.decode()}",
                "method_not_allowed", req.rid,
            )  # fmt: skip
        try:
            status, payload = await self._answer(client, req, op, miss.model_id or "")
        except KingpostError as exc:
            if isinstance(exc, InsufficientStorageError) or exc.http_status >= 500:
                log.warning("async %s: %s", op.kind, exc.message)
            return client.reject(req, exc.http_status, exc.message, exc.code, req.rid,
                                 payload=exc.to_dict())  # fmt: skip
        except _TooLarge:
            limit = self.payload_limit
            message = (f"async_predict body is larger than the limit of {limit} bytes "
                       f"({limit // 1024} KiB; KINGPOST_ASYNC_PAYLOAD_LIMIT)")  # fmt: skip
            return client.reject(req, 413, message, "payload_too_large", req.rid,
                                 payload={"error": message, "code": "payload_too_large",
                                          "limit_bytes": limit})  # fmt: skip
        except Exception:  # the store failed: the client gets an answer, not a hang
            # (StoreDown included: accepts are refused while journaled ones wait)
            log.exception("async %s: the store failed", op.kind)
            message = "the async request store failed; retry shortly"
            return client.reject(req, 503, message, "async_store_unavailable", req.rid)
        return client.reject(req, status, "", "ok", req.rid, payload=payload)

    async def _answer(
        self, client: ClientConn, req: Request, op: AsyncOp, model_id: str
    ) -> tuple[int, Any]:
        q = self.queue
        if op.kind == "predict":
            raw = await _read_body(client, req, self.payload_limit)
            parsed = parse_async_body(raw, allow_http=self.allow_http)
            dep, env = op.deployment_id or "", op.environment
            rid = await self._enqueue((parsed, model_id, dep, env))
            return 201, {"request_id": rid}
        if op.kind == "queue_status":
            dep = op.deployment_id or ""
            counts = await self._counts(dep)
            return 200, {
                "model_id": model_id,
                "deployment_id": dep,
                "num_queued_requests": counts[AsyncStatus.QUEUED],
                "num_in_progress_requests": counts[AsyncStatus.IN_PROGRESS],
                "counts": {k.value: v for k, v in counts.items()},
            }
        rid = op.request_id or ""
        if req.method == b"DELETE":
            if rid in self._pending:
                await self._in_store(rid)
            view = await self._run(lambda: q.cancel(rid, model_id))
            return 200, {"request_id": rid, "canceled": True, "message": "canceled",
                         "status": view.status.value}  # fmt: skip
        record = self._pending.get(rid)
        if record is not None and record["model_id"] == model_id:
            view = accepted_view(record)  # accepted, not yet in the store
        else:
            view = await self._run(lambda: q.get(rid, model_id))
        return 200, view.result_dict() if op.kind == "result" else view.status_dict()

    async def _counts(self, dep: str) -> dict[AsyncStatus, int]:
        """The store's counts plus what is accepted and not yet there; while no insert
        completes (the lock), so none is counted twice or missed."""
        async with self._flushed:
            counts = await self._run(lambda: self.queue.counts(dep))
            waiting = sum(1 for r in self._pending.values() if r["deployment_id"] == dep)
        counts[AsyncStatus.QUEUED] += waiting
        return counts


class StoreDown(Exception):
    """The store refuses inserts and accepts already wait in the journal: refuse more."""


class _TooLarge(Exception):
    pass


async def _read_body(client: ClientConn, req: Request, limit: int) -> bytes:
    length = req.content_length
    if length is not None and length.isdigit() and int(length) > limit:
        raise _TooLarge
    if req.expect_continue and client.transport is not None:
        client.transport.write(CONTINUE)
    parts: list[bytes] = []
    size = 0
    while (chunk := await client.next_chunk(req)) is not None:
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        parts.append(chunk)
    return b"".join(parts)
