"""Preparation jobs that run before a deployment's replicas can start.

Building a deployment's Python environment or image takes minutes; each build
runs on a thread of its own, keyed by deployment, so one that hangs (a
``setup.py`` that never returns) holds up no other deployment's. Builds are
idempotent, so a restarted control plane simply asks again (the environment
cache and the image store make the second ask cheap).

Each job runs inside a :class:`~kingpost._cancel.Cancel`: a job past its timeout,
one whose deployment was deactivated or deleted (:meth:`Jobs.cancel`) and every
job of a stopping control plane (:meth:`Jobs.close`) are cancelled, which kills
the installers they run, and fail with the reason.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from kingpost._cancel import Cancel
from kingpost.errors import KingpostError

__all__ = ["JobState", "Jobs"]

log = logging.getLogger(__name__)

CLOSE_WAIT_S = 5.0
"""How long a stopping control plane waits for cancelled jobs to clean up."""
TIMEOUT_TAIL_LINES = 20


class JobState(enum.StrEnum):
    RUNNING = "running"  # submitted, not finished
    DONE = "done"  # finished; result holds the value
    FAILED = "failed"  # finished with an error, timed out or cancelled; error says which


@dataclass
class _Job:
    started: float
    state: JobState = JobState.RUNNING
    result: object = None
    error: str = ""
    output: deque[str] = field(default_factory=lambda: deque(maxlen=2000))
    cancel: Cancel = field(default_factory=Cancel)
    thread: threading.Thread | None = None


class Jobs:
    """Run each keyed job once, on its own thread; report its state, result and output."""

    def __init__(self, timeout: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._timeout = timeout
        self._clock = clock
        self._jobs: dict[str, _Job] = {}
        self._lock = threading.Lock()

    def ensure(self, key: str, fn: Callable[[Callable[[str], None]], object]) -> _Job:
        """Start ``fn(log_line)`` under ``key`` unless it already ran or runs.

        A job running longer than the timeout is cancelled here and fails."""
        with self._lock:
            job = self._jobs.get(key)
            if job is not None:
                if job.state == JobState.RUNNING and self._clock() - job.started >= self._timeout:
                    self._stop(job, self._timed_out(job))
                return job
            job = self._jobs[key] = _Job(started=self._clock())
            job.thread = threading.Thread(
                target=self._run, args=(job, fn), name=f"kingpost-{key}", daemon=True
            )
        job.thread.start()
        return job

    def _timed_out(self, job: _Job) -> str:
        tail = "\n".join(list(job.output)[-TIMEOUT_TAIL_LINES:])
        return (
            f"the build did not finish within {self._timeout:g} s (KINGPOST_BUILD_TIMEOUT) "
            f"and was stopped; raise KINGPOST_BUILD_TIMEOUT if it needs longer, then "
            f"activate the deployment again. Its last output lines:\n{tail}"
        )

    def _run(self, job: _Job, fn: Callable[[Callable[[str], None]], object]) -> None:
        result: object = None
        error = ""
        try:
            with job.cancel.active():
                result = fn(job.output.append)
        except KingpostError as exc:
            error = exc.message
        except Exception as exc:  # a preparation bug must not kill the controller
            if job.cancel.reason is None:
                log.exception("preparation job failed")
            error = f"{type(exc).__name__}: {exc}"
        with self._lock:
            if job.state != JobState.RUNNING:  # cancelled meanwhile: its error stands
                return
            if error:
                job.error, job.state = error, JobState.FAILED
            else:
                job.result, job.state = result, JobState.DONE

    def _stop(self, job: _Job, reason: str) -> None:
        """Fail a running job with ``reason`` and kill what it runs (under the lock)."""
        if job.state == JobState.RUNNING:
            job.error, job.state = reason, JobState.FAILED
            job.cancel.cancel(reason)

    def cancel(self, key: str, reason: str) -> None:
        """Stop and drop ``key``'s job if it is running, so that a later ``ensure`` starts it
        afresh. A finished job stays: its output is the deployment's build log."""
        with self._lock:
            job = self._jobs.get(key)
            if job is not None and job.state == JobState.RUNNING:
                self._stop(job, reason)
                del self._jobs[key]

    def forget(self, key: str) -> None:
        """Drop a finished job so the next ``ensure`` runs it again (a retry)."""
        with self._lock:
            job = self._jobs.get(key)
            if job is not None and job.state != JobState.RUNNING:
                del self._jobs[key]

    def cancel_others(self, keep: Collection[str], reason: str) -> None:
        """Stop and drop every job whose key is not in ``keep``, finished ones too (the
        deployments they built for are gone, and their build logs with them)."""
        with self._lock:
            for key in [k for k in self._jobs if k not in keep]:
                self._stop(self._jobs.pop(key), reason)

    def output(self, key: str) -> list[str]:
        with self._lock:
            job = self._jobs.get(key)
        return list(job.output) if job is not None else []

    def close(self) -> None:
        """Cancel every running job, then give them a moment to clean up."""
        with self._lock:
            jobs = list(self._jobs.values())
            for job in jobs:
                self._stop(job, "the control plane is stopping")
        deadline = time.monotonic() + CLOSE_WAIT_S
        for job in jobs:
            if job.thread is not None:
                job.thread.join(max(0.0, deadline - time.monotonic()))
