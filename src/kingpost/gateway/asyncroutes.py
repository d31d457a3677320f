"""Async inference routes, answered by the gateway from the store.

The one place the gateway touches the database: ``async_requests`` only, through
:class:`~kingpost.store.asyncq.AsyncQueue` on an engine of its own. An accepted request is
committed (SQLite WAL, or PostgreSQL) before ``{"request_id": ...}`` is answered, so it
survives a kill -9 of the control plane, and accepting needs no control plane at all. The
control plane's workers (``asyncq/worker.py``) take it from there. Store calls run on a
small thread pool, never on the event loop.

Routes (Baseten's, under a model, with the same keys as predict):
``POST .../async_predict`` (201 ``{"request_id"}``), ``GET .../async_queue_status``,
``GET|DELETE /async_request/{id}``, and Kingpost's ``GET /async_request/{id}/result``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from kingpost.asyncq.body import DEFAULT_PAYLOAD_LIMIT, AsyncInput, parse_async_body
from kingpost.errors import InsufficientStorageError, KingpostError
from kingpost.gateway.framing import CONTINUE
from kingpost.gateway.routing import AsyncOp, Miss
from kingpost.store.asyncq import AsyncQueue
from kingpost.store.db import Database
from kingpost.store.models import AsyncStatus

if TYPE_CHECKING:
    from kingpost.gateway.proxy import ClientConn, Request

__all__ = ["AsyncFront"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_Item = tuple[AsyncInput, str, str, str | None]
_METHODS = {"predict": b"POST", "queue_status": b"GET", "result": b"GET"}


class AsyncFront:
    """What the gateway needs to answer async routes: the queue and the body's limits."""

    def __init__(
        self,
        db_url: str,
        *,
        payload_limit: int = DEFAULT_PAYLOAD_LIMIT,
        allow_http: bool = False,
        threads: int = 4,
    ) -> None:
        self.db = Database(db_url)
        self.queue = AsyncQueue(self.db)
        self.payload_limit = payload_limit
        self.allow_http = allow_http
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="kingpost-async")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="kingpost-async-commit")
        self._pending: list[tuple[_Item, asyncio.Future[str]]] = []
        self._committing = False
        self._committer: asyncio.Task[None] | None = None

    async def _run(self, fn: Callable[[], _T]) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    async def _enqueue(self, item: _Item) -> str:
        """Group commit: accepts that arrive while a commit runs wait for the next one,
        which writes them all in one transaction (one write lock, one WAL append)."""
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if not self._committing:
            self._committing = True
            self._committer = asyncio.ensure_future(self._commit_all())
        return await future

    async def _commit_all(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                items = [item for item, _ in batch]
                try:
                    ids = await loop.run_in_executor(self._writer, self.queue.enqueue_many, items)
                except Exception as exc:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), rid in zip(batch, ids, strict=True):
                    if not future.done():
                        future.set_result(rid)
        finally:
            self._committing = False

    def close(self) -> None:
        self._writer.shutdown(wait=False)
        self._pool.shutdown(wait=False)
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
            counts = await self._run(lambda: q.counts(dep))
            return 200, {
                "model_id": model_id,
                "deployment_id": dep,
                "num_queued_requests": counts[AsyncStatus.QUEUED],
                "num_in_progress_requests": counts[AsyncStatus.IN_PROGRESS],
                "counts": {k.value: v for k, v in counts.items()},
            }
        rid = op.request_id or ""
        if req.method == b"DELETE":
            view = await self._run(lambda: q.cancel(rid, model_id))
            return 200, {"request_id": rid, "canceled": True, "message": "canceled",
                         "status": view.status.value}  # fmt: skip
        view = await self._run(lambda: q.get(rid, model_id))
        return 200, view.result_dict() if op.kind == "result" else view.status_dict()


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
