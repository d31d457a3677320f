"""Streaming a model's generator (sync or async) as a chunked response.

As in Truss, a producer task drains the generator into a queue as fast as the
model yields, so a slow reader does not hold the predict slot; the slot is
released when the generator ends. A reader that goes away cancels the
producer. An ``Accept: application/json`` request (not from the OpenAI SDK)
gets the chunks joined into one JSON string instead.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from kingpost.server.codec import (
    DOWNSTREAM_ERROR,
    MODEL_ERROR_MESSAGE,
    encode_msgpack,
    error_body,
    is_binary,
)
from kingpost.server.http import Connection, HttpRequest
from kingpost.server.model import MODEL_FAILURES

__all__ = ["stream_result"]

log = logging.getLogger("kingpost.server")

_END = object()


class _Failed:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _as_bytes(chunk: Any) -> bytes:
    if isinstance(chunk, bytes):
        return chunk
    if isinstance(chunk, bytearray | memoryview):
        return bytes(chunk)
    return str(chunk).encode()


def _next_chunk(gen: Iterator[Any]) -> Any:
    return next(gen, _END)


async def _iterate(gen: Any, pool: Any) -> AsyncIterator[Any]:
    if inspect.isasyncgen(gen):
        async for chunk in gen:
            yield chunk
        return
    loop = asyncio.get_running_loop()
    ctx = contextvars.copy_context()
    sync_gen: Iterator[Any] = gen
    while True:
        step = loop.run_in_executor(pool, ctx.run, _next_chunk, sync_gen)
        try:
            chunk = await asyncio.shield(step)
        except asyncio.CancelledError:
            # The reader left. A thread is still inside the model's generator and the
            # predict slot is the model's until it comes out; then close the generator so
            # its cleanup runs, and only then let the slot go.
            await asyncio.wait([step])
            await loop.run_in_executor(pool, ctx.run, _close, sync_gen)
            raise
        if chunk is _END:
            return
        yield chunk


def _close(gen: Any) -> None:
    try:
        gen.close()
    except Exception:
        log.exception("closing the streamed generator failed")


async def _produce(gen: Any, pool: Any, queue: asyncio.Queue[Any]) -> None:
    try:
        async for chunk in _iterate(gen, pool):
            queue.put_nowait(chunk)
    except asyncio.CancelledError:
        raise
    except MODEL_FAILURES as exc:
        log.error("Exception while generating streamed response", exc_info=exc)
        queue.put_nowait(_Failed(exc))
    finally:
        queue.put_nowait(_END)


def _gather_requested(req: HttpRequest) -> bool:
    if "openai" in req.headers.get("user-agent", "").lower():
        return False
    return req.headers.get("accept") == "application/json"


async def stream_result(
    gen: Any,
    req: HttpRequest,
    conn: Connection,
    headers: list[tuple[bytes, bytes]],
    pool: Any,
    release: Callable[[], None] | None,
    read_timeout_s: float,
    cut: Callable[[str], None],
) -> int:
    """Send ``gen`` to ``conn``; calls ``release`` once the generator is done, and
    ``cut(reason)`` if the stream ends after its head without its last chunk."""
    queue: asyncio.Queue[Any] = asyncio.Queue()
    producer = asyncio.get_running_loop().create_task(_produce(gen, pool, queue))
    if release is not None:
        producer.add_done_callback(lambda _: release())

    def reader_left(_: Any) -> None:  # noticed at once, not at the next chunk written
        producer.cancel()

    conn.closed.add_done_callback(reader_left)
    try:
        if _gather_requested(req):
            binary = is_binary(req.headers.get("content-type", ""))
            return await _gather(queue, conn, headers, binary)
        return await _stream(queue, conn, headers, read_timeout_s, cut)
    finally:
        conn.closed.remove_done_callback(reader_left)
        if not producer.done():
            producer.cancel()


async def _next(queue: asyncio.Queue[Any], read_timeout_s: float) -> Any:
    return await asyncio.wait_for(queue.get(), read_timeout_s)


async def _gather(
    queue: asyncio.Queue[Any],
    conn: Connection,
    headers: list[tuple[bytes, bytes]],
    binary: bool,
) -> int:
    """The whole stream as one string: JSON, or msgpack for a msgpack request (Truss).

    No read timeout, as in Truss: nothing is sent until the end, so a long gap between
    chunks costs the client nothing (``streaming_read_timeout`` is for streamed chunks)."""
    parts: list[bytes] = []
    while (item := await queue.get()) is not _END:
        if isinstance(item, _Failed):
            return _fail(conn, headers)
        parts.append(_as_bytes(item))
    text = b"".join(parts).decode(errors="replace")
    if binary:
        conn.respond(200, headers, encode_msgpack(text), b"application/octet-stream")
    else:
        conn.respond(200, headers, json.dumps(text).encode())
    return 200


def _fail(conn: Connection, headers: list[tuple[bytes, bytes]]) -> int:
    conn.respond(500, headers + DOWNSTREAM_ERROR, error_body(MODEL_ERROR_MESSAGE))
    return 500


async def _stream(
    queue: asyncio.Queue[Any],
    conn: Connection,
    headers: list[tuple[bytes, bytes]],
    read_timeout_s: float,
    cut: Callable[[str], None],
) -> int:
    try:
        item = await _next(queue, read_timeout_s)
    except TimeoutError:
        # Nothing is out yet, so the client still gets a whole answer; not a model error.
        log.error(
            "stream produced no first chunk within %.0fs (runtime.streaming_read_timeout)",
            read_timeout_s,
        )
        return _fail(conn, headers)
    if isinstance(item, _Failed):
        return _fail(conn, headers)
    conn.stream_start(200, [(b"content-type", b"application/octet-stream"), *headers])
    while item is not _END:
        if isinstance(item, _Failed):
            # Headers are out: end without the last chunk so the client sees a broken body.
            conn.close_after_response()
            cut("model_error")
            return 200
        if not await conn.stream_write(_as_bytes(item)):
            cut("client_left")
            return 200
        try:
            item = await _next(queue, read_timeout_s)
        except TimeoutError:
            log.error("stream produced nothing for %.0fs; closing it", read_timeout_s)
            conn.close_after_response()
            cut("timeout")
            return 200
    if conn.closed.done():  # the reader left, which ended the producer early
        cut("client_left")
        return 200
    conn.stream_end()
    return 200
