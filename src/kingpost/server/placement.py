"""Where a sync model method runs: a worker thread, or the event loop once it has proven tiny.

Truss runs sync ``predict`` (and the other sync methods) in a thread so that a slow
model never blocks the server. For a model that answers in microseconds that hand-off is
the most expensive part of a request: on one core, waking the worker, passing the GIL to
it and waking the loop again costs more than the call, halves throughput and stretches
the tail (measured in bench/README.md). So every sync method starts in the thread pool,
its calls are timed there, and after :data:`PROVEN_CALLS` calls in a row under
:data:`FAST_S` it runs directly on the loop. The first call on the loop that takes longer
than :data:`SLOW_S` sends it back to the thread pool for the life of the process, so a
slow model can block the loop at most once, for one call. ``KINGPOST_SERVER_INLINE=0``
keeps every sync method in threads; ``KINGPOST_SERVER_INLINE_FAST_US`` sets the bar for
a fast call in microseconds.
"""

from __future__ import annotations

import logging
import os

from kingpost.server.logs import log_event

__all__ = ["FAST_S", "PROVEN_CALLS", "SLOW_S", "Placement", "fast_call_seconds", "inline_enabled"]

log = logging.getLogger("kingpost.server")

FAST_S = 100e-6
"""A call this short costs less than handing it to a thread and back."""
PROVEN_CALLS = 200
"""Consecutive fast calls (timed in a thread) before a method runs on the loop."""
SLOW_S = 1e-3
"""One call on the loop longer than this returns the method to threads for good."""


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


class Placement:
    """The running decision for one sync method; updated after each call.

    Updates come from the worker threads and the loop without a lock: they are plain
    attribute writes under the GIL, and a lost update only delays a promotion.
    """

    __slots__ = ("_fast_s", "_streak", "demoted", "inline", "name")

    def __init__(self, name: str, enabled: bool = True, fast_s: float = FAST_S) -> None:
        self.name = name
        self.inline = False
        self.demoted = not enabled
        self._fast_s = fast_s
        self._streak = 0

    def ran_in_thread(self, seconds: float) -> None:
        if self.demoted or self.inline:
            return
        if seconds >= self._fast_s:
            self._streak = 0
            return
        self._streak += 1
        if self._streak >= PROVEN_CALLS:
            self.inline = True
            log_event(
                log, logging.INFO, "method runs on the event loop", method=self.name,
                reason=f"{PROVEN_CALLS} calls in a row took under {self._fast_s * 1e6:.0f} us",
            )  # fmt: skip

    def ran_inline(self, seconds: float) -> None:
        if seconds <= SLOW_S:
            return
        self.inline = False
        self.demoted = True
        log_event(
            log, logging.INFO, "method moves back to the thread pool", method=self.name,
            reason=f"one call took {seconds * 1e3:.1f} ms on the event loop",
        )  # fmt: skip
