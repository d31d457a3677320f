"""Run a request's handler at once, and give it a Task only when it has to wait.

Most requests to a fast model never wait: the body is in, predict runs on the loop
(see placement.py) and the response is written. For those a Task is pure cost, since
creating it, scheduling its first step for the next loop iteration and finishing it
is a fair share of the request. :func:`start` runs the coroutine right away instead, in
a context of its own (as a Task would have), and only if it suspends does a Task take
over from the point where it stopped. Python 3.12's ``eager_task_factory`` does the
same; the server runs on 3.11.

Code that needs to know its Task (``asyncio.current_task()``, which ``asyncio.timeout``
and anyio use) must ``await on_task()`` first: user ``async`` methods, async generators
and response objects. Their calls then run inside the Task, exactly as before.
"""

from __future__ import annotations

import asyncio
import contextvars
import types
from collections.abc import Coroutine, Generator
from typing import Any

__all__ = ["on_task", "start"]


class _OnTask:
    """Yielded by :func:`on_task` outside a Task: continue at once, but inside one."""

    __slots__ = ()


_ON_TASK = _OnTask()


@types.coroutine
def _hop() -> Generator[Any, None, None]:
    yield _ON_TASK


async def on_task() -> None:
    """Make sure the rest of the calling coroutine runs inside an asyncio Task."""
    if asyncio.current_task() is None:
        await _hop()


def start(coro: Coroutine[Any, Any, None], loop: asyncio.AbstractEventLoop) -> None:
    """Run ``coro`` now; if it suspends, a Task carries on from there."""
    context = contextvars.copy_context()
    try:
        waiting = context.run(coro.send, None)
    except StopIteration:
        return
    loop.create_task(_resume(coro, waiting), context=context)


@types.coroutine
def _resume(coro: Coroutine[Any, Any, None], waiting: Any) -> Generator[Any, Any, None]:
    """Carry on a coroutine that was started outside a Task and stopped at ``waiting``.

    The Task drives this generator as it would drive ``coro``: what ``coro`` yields (a
    future to wait for, or ``None`` to let the loop turn once) goes up to the Task, and
    what the Task sends or throws in (the wake-up, a cancellation) goes down to ``coro``.
    """
    while True:
        if waiting is _ON_TASK:
            step, arg = coro.send, None
        else:
            try:
                yield waiting
            except BaseException as exc:  # cancellation: deliver it where coro waits
                step, arg = coro.throw, exc
            else:
                step, arg = coro.send, None
        try:
            waiting = step(arg)
        except StopIteration:
            return
