"""The last hour of request figures per deployment, for the console's charts and the
models list.

The platform keeps counters (``/metrics``), not history. :class:`History` samples them
once a step (a minute by default) on a thread of the control plane, whether or not a
page is open, and keeps what fits in the window: per sample, each deployment's running
totals (:class:`~kingpost.console.figures.Totals`, keyed by model and deployment name).
A page turns two samples into a rate, as it does with its own polls. In memory only: a
restarted control plane starts a new hour, and its counters start again from zero too.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from kingpost.console.figures import Totals, totals_by_deployment
from kingpost.metrics.summary import Samples

__all__ = ["History", "Point", "last_hour"]

log = logging.getLogger(__name__)

STEP_S = 60.0
KEEP_S = 3600.0


@dataclass(frozen=True)
class Point:
    t: float
    """Wall-clock seconds (``time.time()``) of the sample."""
    by_deployment: dict[tuple[str, str], Totals]
    """(model name, deployment name) -> that deployment's running totals then."""


class History:
    """Samples of ``source()`` (one parse of the platform's metrics; None when that
    failed) every ``step_s``, kept for ``keep_s``."""

    def __init__(
        self,
        source: Callable[[], Samples | None],
        step_s: float = STEP_S,
        keep_s: float = KEEP_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._source = source
        self.step_s = step_s
        self.keep_s = keep_s
        self._clock = clock
        self._points: deque[Point] = deque()
        self._lock = threading.Lock()

    def sample(self) -> None:
        """Take one sample now and forget those older than the window."""
        samples = self._source()
        if samples is None:
            return
        now = self._clock()
        point = Point(now, totals_by_deployment(samples))
        with self._lock:
            self._points.append(point)
            while self._points and self._points[0].t < now - self.keep_s:
                self._points.popleft()

    def series(self, model: str, deployment: str | None = None) -> list[tuple[float, Totals]]:
        """A model's totals (or one deployment's) at each sample, oldest first."""
        with self._lock:
            points = list(self._points)
        out = []
        for p in points:
            total = Totals()
            for (m, d), t in p.by_deployment.items():
                if m == model and (deployment is None or d == deployment):
                    total.merge(t)
            out.append((p.t, total))
        return out

    def oldest(self) -> Point | None:
        with self._lock:
            return self._points[0] if self._points else None

    @contextlib.contextmanager
    def running(self) -> Iterator[History]:
        """Sample on a thread of its own until the block ends."""
        stop = threading.Event()

        def run() -> None:
            while not stop.wait(self.step_s):
                try:
                    self.sample()
                except Exception as exc:  # a failed sample is a gap, never a dead thread
                    log.debug("sampling the console's history failed: %s", exc)

        with contextlib.suppress(Exception):
            self.sample()  # the first point at once: a page soon has a baseline
        thread = threading.Thread(target=run, name="kingpost-console-history", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join(timeout=5)


def last_hour(history: History | None, current: dict[str, Totals]) -> float | None:
    """Turn ``current`` (running totals by model name) into what changed since the oldest
    sample kept (at most an hour old), in place, and return that sample's time. None, and
    ``current`` left as it is (counted since the gateway started), without one. A counter
    lower now than then (the gateway started again) counts from zero."""
    oldest = history.oldest() if history is not None else None
    if oldest is None:
        return None
    then: dict[str, Totals] = {}
    for (model, _), totals in oldest.by_deployment.items():
        then.setdefault(model, Totals()).merge(totals)
    for model, now in current.items():
        before = then.get(model)
        if before is None:
            continue
        if now.requests >= before.requests:
            now.requests -= before.requests
        if now.errors >= before.errors:
            now.errors -= before.errors
    return oldest.t
