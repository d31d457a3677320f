"""Async inference decisions as values: what runs next, what expires, how long to back off.

Pure functions over plain data (time injected), table-tested in
``tests/unit/test_async_policy.py``; ``store/asyncq.py`` reads and records, the workers in
``asyncq/worker.py`` apply.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

__all__ = [
    "DEFAULT_MAX_TIME_IN_QUEUE_S",
    "Candidate",
    "Choice",
    "RetryConfig",
    "async_slots",
    "choose",
    "model_error_retryable",
    "past_wait",
    "pick_size",
    "retry_delay_ms",
    "webhook_delay_s",
    "webhook_retryable",
]

DEFAULT_MAX_TIME_IN_QUEUE_S = 600


@dataclass(frozen=True)
class RetryConfig:
    """Baseten's ``inference_retry_config``: exponential backoff between model attempts."""

    max_attempts: int = 1
    initial_delay_ms: int = 1000
    max_delay_ms: int = 5000


@dataclass(frozen=True)
class Candidate:
    """A queued request as the scheduler sees it."""

    id: str
    priority: int
    """0 runs before 1 before 2 (Baseten's: lower first)."""
    created_at: datetime
    not_before: datetime
    """Not taken before this (a retry's backoff)."""
    max_time_in_queue_s: int
    attempts: int = 0
    """Runs begun: a request that has run once (a retry) no longer expires."""


@dataclass(frozen=True)
class Choice:
    run: tuple[str, ...]
    """Ids to take now, in order: highest priority first, then oldest."""
    expire: tuple[str, ...]
    """Ids that waited longer than their ``max_time_in_queue_seconds`` before any run."""


def expired(c: Candidate, now: datetime) -> bool:
    """A request that never ran expires once it waited its ``max_time_in_queue_seconds``.
    A retry does not: ``max_attempts`` bounds it, and its error must be recorded."""
    return past_wait(c.attempts, c.created_at, c.max_time_in_queue_s, now)


def past_wait(attempts: int, created_at: datetime, max_time_s: int, now: datetime) -> bool:
    """:func:`expired`, of a request's fields."""
    return attempts == 0 and now - created_at >= timedelta(seconds=max_time_s)


def choose(candidates: Iterable[Candidate], now: datetime, free: int) -> Choice:
    """Which queued requests to run with ``free`` slots, and which to expire."""
    gone = [c for c in candidates if expired(c, now)]
    ids = {c.id for c in gone}
    ready = sorted(
        (c for c in candidates if c.id not in ids and c.not_before <= now),
        key=lambda c: (c.priority, c.created_at, c.id),
    )
    return Choice(
        run=tuple(c.id for c in ready[: max(free, 0)]),
        expire=tuple(c.id for c in sorted(gone, key=lambda c: c.created_at)),
    )


def retry_delay_ms(cfg: RetryConfig, attempt: int) -> int:
    """Delay before the attempt after ``attempt`` (1-based): the initial delay doubled per
    attempt, capped at ``max_delay_ms``."""
    return int(min(cfg.initial_delay_ms * 2 ** max(attempt - 1, 0), cfg.max_delay_ms))


def model_error_retryable(status: int | None) -> bool:
    """A model error worth retrying: no answer at all (``None``: the connection failed or
    timed out), a 5xx, or a 429. A 4xx says the input is bad and would fail again."""
    return status is None or status >= 500 or status == 429


def webhook_retryable(status: int | None) -> bool:
    """A webhook delivery is retried on a network error (``None``) or a 5xx (and 429); any
    other answer is final."""
    return status is None or status >= 500 or status == 429


def webhook_delay_s(initial_s: float, attempt: int, cap_s: float = 60.0) -> float:
    """Delay before the delivery after ``attempt`` (1-based): doubled per attempt, capped."""
    return float(min(initial_s * 2 ** max(attempt - 1, 0), cap_s))


def async_slots(replicas: int, predict_concurrency: int, share: float, busy: int) -> int:
    """Async requests a deployment may start now: ``share`` of its replicas' predict slots
    (at least 1 while a replica is ready, so a share below one slot still drains the queue),
    less the ``busy`` ones already running. With no ready replica: 1, the request that
    waits in the gateway for the wake (the queue's depth is what wakes it)."""
    if replicas <= 0:
        return max(1 - busy, 0)
    cap = max(int(replicas * predict_concurrency * share), 1)
    return max(cap - busy, 0)


PICK_PER_SLOT = 2
"""The least a pick covers per async slot, busy ones too: a run that ends starts the
next at once, before any settle (``asyncq/worker.py``)."""
PICK_MAX_PER_SLOT = 8
"""The most. A pick's requests are held whole (their inputs) until they run."""


def pick_size(slots: int, ended: int) -> int:
    """How many queued requests a deployment's pick names, for ``slots`` async slots whose
    runs ended ``ended`` times since its last pick: a run per slot and twice what ended,
    so that what ends before the next pick lands has a next request to start, between
    ``PICK_PER_SLOT`` and ``PICK_MAX_PER_SLOT`` per slot. A slow model's pick stays small;
    with an echo server two per slot ran dry between ticks (2,700 requests/s drained,
    against 3,200 with eight; bench/README.md, "Async")."""
    least, most = PICK_PER_SLOT * slots, PICK_MAX_PER_SLOT * slots
    return min(most, max(least, 2 * ended + slots))


def order(candidates: Sequence[Candidate]) -> list[str]:
    """The scheduling order alone (for tests and listings)."""
    return [c.id for c in sorted(candidates, key=lambda c: (c.priority, c.created_at, c.id))]
