"""Preparation jobs that run before a deployment's replicas can start.

Building a model-class deployment's Python environment and mirroring weights
take minutes; they run on a small thread pool, keyed by deployment, and are
idempotent, so a restarted control plane simply asks again (the environment
cache and the weights store make the second ask cheap).
"""

from __future__ import annotations

import enum
import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from kingpost.errors import KingpostError

__all__ = ["JobState", "Jobs"]

log = logging.getLogger(__name__)


class JobState(enum.StrEnum):
    RUNNING = "running"  # submitted, not finished
    DONE = "done"  # finished; result holds the value
    FAILED = "failed"  # finished with an error; error holds the message


@dataclass
class _Job:
    state: JobState = JobState.RUNNING
    result: object = None
    error: str = ""
    output: deque[str] = field(default_factory=lambda: deque(maxlen=2000))


class Jobs:
    """Run each keyed job once; report its state, result and output lines."""

    def __init__(self, workers: int = 2) -> None:
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="kingpost-prep")
        self._jobs: dict[str, _Job] = {}
        self._lock = threading.Lock()

    def ensure(self, key: str, fn: Callable[[Callable[[str], None]], object]) -> _Job:
        """Start ``fn(log_line)`` under ``key`` unless it already ran or runs."""
        with self._lock:
            job = self._jobs.get(key)
            if job is not None:
                return job
            job = self._jobs[key] = _Job()
        self._pool.submit(self._run, job, fn)
        return job

    def _run(self, job: _Job, fn: Callable[[Callable[[str], None]], object]) -> None:
        try:
            job.result = fn(job.output.append)
            job.state = JobState.DONE
        except KingpostError as exc:
            job.error, job.state = exc.message, JobState.FAILED
        except Exception as exc:  # a preparation bug must not kill the controller
            log.exception("preparation job failed")
            job.error, job.state = f"{type(exc).__name__}: {exc}", JobState.FAILED

    def forget(self, key: str) -> None:
        """Drop a finished job so the next ``ensure`` runs it again (a retry)."""
        with self._lock:
            job = self._jobs.get(key)
            if job is not None and job.state != JobState.RUNNING:
                del self._jobs[key]

    def output(self, key: str) -> list[str]:
        with self._lock:
            job = self._jobs.get(key)
        return list(job.output) if job is not None else []

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
