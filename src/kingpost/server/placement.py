"""Where a sync model method runs: a worker thread, or the event loop once it has proven tiny.

Truss runs sync ``predict`` (and the other sync methods) in a thread so that a slow
model never blocks the server. For a model that answers in microseconds that hand-off is
the most expensive part of a request: on one core, waking the worker, passing the GIL to
it and waking the loop again costs more than the call, halves throughput and stretches
the tail (measured in bench/README.md). So every sync method starts in the thread pool,
its calls are timed there, and after :data:`PROVEN_CALLS` calls in a row under
:data:`FAST_S` it runs directly on the loop.

It goes back to the thread pool for the life of the process after one call on the loop
longer than :data:`BLOCK_S`, or :data:`SLOW_CALLS` calls longer than :data:`SLOW_S`
within :data:`WINDOW` calls (one such call may be the OS preempting the server, not the
model). A method that schedules work on the server's own loop (``run_coroutine_threadsafe``
to the loop an ``async def load`` ran on) would wait forever for a loop it blocks, so it
is never promoted; if it first does so after promotion, that call fails with a clear
error instead of hanging, and the method is back on threads. ``is_healthy`` always stays
on threads: it is called seldom and often touches locks or subprocesses.
A live reload binds new code, which starts over on threads with a placement of its own:
what the old method proved says nothing about the new one.

``KINGPOST_SERVER_INLINE=0`` keeps every sync method in threads;
``KINGPOST_SERVER_INLINE_FAST_US`` sets the bar for a fast call in microseconds.
"""

from __future__ import annotations

import logging
import os
import threading

from kingpost.server.logs import log_event

__all__ = [
    "BLOCK_S",
    "FAST_S",
    "PROVEN_CALLS",
    "SLOW_CALLS",
    "SLOW_S",
    "WINDOW",
    "LoopReentryError",
    "Placement",
    "calling",
    "fast_call_seconds",
    "inline_enabled",
    "loop_scheduled",
]

log = logging.getLogger("kingpost.server")

FAST_S = 100e-6
"""A call this short costs less than handing it to a thread and back."""
PROVEN_CALLS = 200
"""Consecutive fast calls (timed in a thread) before a method runs on the loop."""
SLOW_S = 1e-3
"""A call on the loop longer than this counts as slow."""
SLOW_CALLS = 3
"""Slow calls within :data:`WINDOW` calls on the loop that send a method back to threads."""
WINDOW = 1000
BLOCK_S = 0.05
"""One call on the loop longer than this sends the method back to threads at once."""
NEVER_INLINE = frozenset({"is_healthy"})


class LoopReentryError(RuntimeError):
    """A method running on the event loop scheduled work on that same loop and waited."""


_calls = threading.local()


def inline_enabled() -> bool:
    return os.environ.get("KINGPOST_SERVER_INLINE", "1") not in ("0", "false", "no")


def fast_call_seconds() -> float:
    """:data:`FAST_S`, or ``KINGPOST_SERVER_INLINE_FAST_US`` when it is a positive number."""
    text = os.environ.get("KINGPOST_SERVER_INLINE_FAST_US")
    if not text:
        return FAST_S
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if value > 0:
        return value / 1e6
    log.warning(
        "KINGPOST_SERVER_INLINE_FAST_US must be a positive number of microseconds, got %r; "
        "using %.0f",
        text,
        FAST_S * 1e6,
    )
    return FAST_S


class calling:
    """Marks the user method this thread is running, for :func:`loop_scheduled`."""

    __slots__ = ("_place", "_previous")

    def __init__(self, place: Placement) -> None:
        self._place = place

    def __enter__(self) -> None:
        self._previous = getattr(_calls, "place", None)
        _calls.place = self._place

    def __exit__(self, *exc: object) -> None:
        _calls.place = self._previous


def loop_scheduled(on_loop_thread: bool) -> None:
    """The server loop's ``call_soon_threadsafe`` calls this before scheduling anything.

    Inside a user method the method is kept on threads; on the loop's own thread (the
    method was running inline) waiting for that work would never end, so raise instead.
    """
    place: Placement | None = getattr(_calls, "place", None)
    if place is None:
        return
    place.keep_on_threads("it schedules work on the server's event loop")
    if on_loop_thread:
        raise LoopReentryError(
            f"`{place.name}` scheduled work on the model server's event loop while running "
            "on that loop, and would wait for it forever; it runs on a worker thread from "
            "the next call on (KINGPOST_SERVER_INLINE=0 keeps every method there)"
        )


class Placement:
    """The running decision for one sync method; updated after each call.

    Updates come from the worker threads and the loop without a lock: they are plain
    attribute writes under the GIL, and a lost update only delays a promotion.
    """

    __slots__ = ("_calls", "_fast_s", "_slow", "_streak", "demoted", "inline", "name")

    def __init__(self, name: str, enabled: bool = True, fast_s: float = FAST_S) -> None:
        self.name = name
        self.inline = False
        self.demoted = not enabled or name in NEVER_INLINE
        self._fast_s = fast_s
        self._streak = 0
        self._calls = 0
        self._slow = 0

    def ran_in_thread(self, seconds: float) -> None:
        if self.demoted or self.inline:
            return
        if seconds >= self._fast_s:
            self._streak = 0
            return
        self._streak += 1
        if self._streak >= PROVEN_CALLS and not self.demoted:
            self._streak = 0
            self.inline = True
            log_event(
                log, logging.INFO, "method runs on the event loop", method=self.name,
                reason=f"{PROVEN_CALLS} calls in a row took under {self._fast_s * 1e6:.0f} us",
            )  # fmt: skip

    def ran_inline(self, seconds: float) -> None:
        self._calls += 1
        if self._calls >= WINDOW:
            self._calls = self._slow = 0
        if seconds <= SLOW_S:
            return
        self._slow += 1
        if seconds > BLOCK_S:
            self.keep_on_threads(f"one call took {seconds * 1e3:.1f} ms on the event loop")
        elif self._slow >= SLOW_CALLS:
            self.keep_on_threads(
                f"{self._slow} of its last {self._calls} calls on the event loop took over "
                f"{SLOW_S * 1e3:.0f} ms"
            )

    def keep_on_threads(self, reason: str) -> None:
        """Run this method on threads from now on, for the life of the process."""
        if self.demoted:
            return
        self.demoted = True
        was_inline, self.inline = self.inline, False
        log_event(
            log, logging.INFO,
            "method moves back to the thread pool" if was_inline else "method stays on threads",
            method=self.name, reason=reason,
        )  # fmt: skip
