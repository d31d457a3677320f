"""The model server's eager start: run a handler now, hand it to a Task only when it waits."""

from __future__ import annotations

import asyncio
import contextvars
from typing import Any

import pytest

from kingpost.server import eager

VAR: contextvars.ContextVar[str] = contextvars.ContextVar("eager_test", default="unset")


LOOP_KIND = "asyncio"


@pytest.fixture(autouse=True, params=["asyncio", "uvloop"])
def _loop_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(__import__(__name__), "LOOP_KIND", request.param)


def _run(body: Any) -> Any:
    if LOOP_KIND == "uvloop":
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(body(loop))
    finally:
        loop.close()


async def _start(loop: asyncio.AbstractEventLoop, coro: Any, seen: list[Any]) -> list[Any]:
    """Start ``coro`` from a plain callback, as ``data_received`` does (no Task is current).

    Returns what ``seen`` held when ``start`` returned.
    """
    done: asyncio.Future[list[Any]] = loop.create_future()

    def callback() -> None:
        try:
            eager.start(coro, loop)
        except BaseException as exc:
            done.set_exception(exc)
        else:
            done.set_result(list(seen))

    loop.call_soon(callback)
    return await done


def test_a_handler_that_never_waits_finishes_before_start_returns_and_without_a_task() -> None:
    seen: list[Any] = []

    async def handler() -> None:
        VAR.set("inside")
        seen.append(asyncio.current_task())

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        tasks_before = asyncio.all_tasks(loop)
        assert await _start(loop, handler(), seen) == [None]
        assert asyncio.all_tasks(loop) == tasks_before
        assert VAR.get() == "unset"  # it ran in a context of its own

    _run(body)


def test_a_handler_that_waits_carries_on_in_a_task_with_its_context() -> None:
    seen: list[Any] = []

    async def handler(fut: asyncio.Future[int]) -> None:
        VAR.set("mine")
        seen.append(asyncio.current_task())
        seen.append(await fut)
        seen.append(VAR.get())
        await asyncio.sleep(0)  # a bare yield goes through as well
        seen.append(asyncio.current_task() is not None)

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        fut: asyncio.Future[int] = loop.create_future()
        assert await _start(loop, handler(fut), seen) == [None]
        loop.call_soon(fut.set_result, 7)
        for _ in range(5):
            await asyncio.sleep(0)
        assert seen == [None, 7, "mine", True]
        assert VAR.get() == "unset"

    _run(body)


def test_on_task_moves_the_rest_of_the_handler_into_a_task() -> None:
    seen: list[Any] = []

    async def handler() -> None:
        seen.append(asyncio.current_task() is None)
        await eager.on_task()
        seen.append(asyncio.current_task() is not None)
        async with asyncio.timeout(5):  # raises outside a Task
            await asyncio.sleep(0)
        seen.append("timed")
        await eager.on_task()  # already in one: nothing to do
        seen.append("again")

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        assert await _start(loop, handler(), seen) == [True]
        for _ in range(5):
            await asyncio.sleep(0)
        assert seen == [True, True, "timed", "again"]

    _run(body)


def test_cancelling_the_task_reaches_the_handler_where_it_waits() -> None:
    seen: list[str] = []

    async def handler() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise
        finally:
            seen.append("finally")

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        before = asyncio.all_tasks(loop)
        await _start(loop, handler(), seen)
        (task,) = asyncio.all_tasks(loop) - before
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert seen == ["cancelled", "finally"]

    _run(body)


def test_an_error_after_waiting_ends_the_task_with_that_error() -> None:
    async def handler(fut: asyncio.Future[None]) -> None:
        await fut
        raise ValueError("boom")

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        fut: asyncio.Future[None] = loop.create_future()
        before = asyncio.all_tasks(loop)
        await _start(loop, handler(fut), [])
        (task,) = asyncio.all_tasks(loop) - before
        fut.set_result(None)
        with pytest.raises(ValueError, match="boom"):
            await task

    _run(body)


def test_an_error_thrown_in_is_caught_by_the_handler_and_it_goes_on() -> None:
    seen: list[Any] = []

    async def handler(first: asyncio.Future[None], second: asyncio.Future[str]) -> None:
        try:
            await first
        except KeyError:
            seen.append("caught")
        seen.append(await second)

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        first: asyncio.Future[None] = loop.create_future()
        second: asyncio.Future[str] = loop.create_future()
        await _start(loop, handler(first, second), seen)
        first.set_exception(KeyError("k"))
        await asyncio.sleep(0)
        second.set_result("done")
        for _ in range(3):
            await asyncio.sleep(0)
        assert seen == ["caught", "done"]

    _run(body)
