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

A job's output is also appended to a file per key (``{home}/builds/``), between a line
that says when it started and one that says how it ended, so a deployment's build log
outlives the control plane: after a restart ``kingpost logs`` shows the builds before it,
followed by the re-check the restarted control plane runs.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from kingpost._cancel import Cancel
from kingpost._logtail import tail_lines
from kingpost.errors import KingpostError

__all__ = ["JobState", "Jobs"]

log = logging.getLogger(__name__)

CLOSE_WAIT_S = 5.0
"""How long a stopping control plane waits for cancelled jobs to clean up."""
TIMEOUT_TAIL_LINES = 20
OUTPUT_LINES = 2000
"""Lines of a job's output kept in memory, and read back from its file."""
LOG_FILE_MAX = 2 << 20
LOG_FILE_KEEP = 512 << 10
"""A build log file over ``LOG_FILE_MAX`` bytes is cut to its last ``LOG_FILE_KEEP``
before the next build of its deployment appends to it."""


class JobState(enum.StrEnum):
    RUNNING = "running"  # submitted, not finished
    DONE = "done"  # finished; result holds the value
    FAILED = "failed"  # finished with an error, timed out or cancelled; error says which


@dataclass
class _Job:
    started: float
    state: JobState = JobState.RUNNING
    ended: float | None = None
    """When it finished (the jobs' clock), for the metrics' build durations."""
    result: object = None
    error: str = ""
    output: deque[str] = field(default_factory=lambda: deque(maxlen=OUTPUT_LINES))
    cancel: Cancel = field(default_factory=Cancel)
    thread: threading.Thread | None = None


class Jobs:
    """Run each keyed job once, on its own thread; report its state, result and output."""

    def __init__(
        self,
        timeout: float,
        clock: Callable[[], float] = time.monotonic,
        log_dir: Path | None = None,
    ) -> None:
        self._timeout = timeout
        self._clock = clock
        self._log_dir = log_dir
        self._kept: frozenset[str] | None = None
        """The keys the last :meth:`cancel_others` kept (None before the first call)."""
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
                target=self._run, args=(job, fn, key), name=f"kingpost-{key}", daemon=True
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

    def _run(self, job: _Job, fn: Callable[[Callable[[str], None]], object], key: str) -> None:
        result: object = None
        error = ""
        record = _Record(self._log_path(key), job.output)
        # Ended in the file when cancelled, not when the thread gets out: a cancelled build
        # may run on (a wait the cancel does not end) while its deployment's next build, or
        # its deletion, already owns the file.
        with job.cancel.on_cancel(lambda: record.close(_stopped(job.cancel))):
            try:
                with job.cancel.active():
                    result = fn(record.line)
            except KingpostError as exc:
                error = exc.message
            except Exception as exc:  # a preparation bug must not kill the controller
                if job.cancel.reason is None:
                    log.exception("preparation job failed")
                error = f"{type(exc).__name__}: {exc}"
        if job.cancel.reason is not None:
            record.close(_stopped(job.cancel))
        else:
            record.close("failed" if error else "finished")
        with self._lock:
            if job.state != JobState.RUNNING:  # cancelled meanwhile: its error stands
                return
            job.ended = self._clock()
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

    def durations(self, prefix: str) -> dict[str, tuple[JobState, float]]:
        """Per job whose key starts with ``prefix`` (the rest of the key): its state and
        how long it ran, or has run so far."""
        now = self._clock()
        with self._lock:
            return {
                key[len(prefix) :]: (job.state, (job.ended or now) - job.started)
                for key, job in self._jobs.items()
                if key.startswith(prefix)
            }

    def state(self, key: str) -> tuple[JobState, str] | None:
        """``key``'s job state and error, if there is one."""
        with self._lock:
            job = self._jobs.get(key)
            return None if job is None else (job.state, job.error)

    def forget(self, key: str) -> None:
        """Drop a finished job so the next ``ensure`` runs it again (a retry)."""
        with self._lock:
            job = self._jobs.get(key)
            if job is not None and job.state != JobState.RUNNING:
                del self._jobs[key]

    def cancel_others(self, keep: Collection[str], reason: str) -> None:
        """Stop and drop every job whose key is not in ``keep``, finished ones too (the
        deployments they built for are gone, and their build logs with them, files
        included: those of deployments deleted while the control plane was down too)."""
        keep = frozenset(keep)
        with self._lock:
            for key in [k for k in self._jobs if k not in keep]:
                self._stop(self._jobs.pop(key), reason)
            kept, self._kept = self._kept, keep
        if self._log_dir is None:
            return
        if kept is not None:  # every pass calls this: only the keys gone since the last
            for key in kept - keep:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._log_dir / _log_name(key))
            return
        names = {_log_name(k) for k in keep}  # the first call: what a stopped plane left
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self._log_dir):
                if entry.name.endswith(".log") and entry.name not in names:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)

    def output(self, key: str) -> list[str]:
        """The last lines ``key``'s jobs wrote: from its file (every run of it, across
        restarts) when there is one, else from memory."""
        path = self._log_path(key)
        if path is not None:
            try:
                return tail_lines(path, OUTPUT_LINES, LOG_FILE_KEEP)
            except FileNotFoundError:
                pass
        with self._lock:
            job = self._jobs.get(key)
        return list(job.output) if job is not None else []

    def _log_path(self, key: str) -> Path | None:
        if self._log_dir is None:
            return None
        return self._log_dir / _log_name(key)

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


def _log_name(key: str) -> str:
    return key.replace(":", "-").replace("/", "-") + ".log"


def _stopped(cancel: Cancel) -> str:
    """How a cancelled job ended, in its log file: the first line of the reason."""
    first = (cancel.reason or "").partition("\n")[0]
    return f"stopped: {first}"


class _Record:
    """A job's output: into memory, and appended to its log file when it has one.

    The file gets a line saying when the job started before its first output line, and
    one saying how it ended; a job that printed nothing leaves the file as it was.
    Once ended (:meth:`close`, also from the thread that cancels the job) nothing more
    goes to the file, so that a job that runs on after its cancel neither writes into
    the next build's lines nor brings back a file removed with its deployment.
    Writing is best effort: a full disk costs the file, not the build.
    """

    def __init__(self, path: Path | None, memory: deque[str]) -> None:
        self._path = path
        self._memory = memory
        self._file: IO[str] | None = None
        self._started = time.monotonic()
        self._lock = threading.Lock()
        """Held while writing: the job's thread writes lines, a cancelling one ends."""

    def line(self, text: str) -> None:
        self._memory.append(text)
        with self._lock:
            self._write(text)

    def _write(self, text: str) -> None:
        if self._path is None:
            return
        try:
            if self._file is None:
                self._file = _open_log(self._path)
                stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
                self._file.write(f"--- build started {stamp} ---\n")
            self._file.write(text + "\n")
            self._file.flush()
        except OSError as exc:
            log.warning("cannot write build log %s: %s", self._path, exc)
            self._path = None

    def close(self, outcome: str) -> None:
        """Say how the job ended and let go of the file; only the first call counts."""
        with self._lock:
            self._path = None  # later lines go to memory only
            if self._file is None:
                return
            took = time.monotonic() - self._started
            with contextlib.suppress(OSError):
                self._file.write(f"--- build {outcome} after {took:.1f} s ---\n")
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None


def _open_log(path: Path) -> IO[str]:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        if path.stat().st_size > LOG_FILE_MAX:
            with path.open("rb") as f:
                f.seek(-LOG_FILE_KEEP, os.SEEK_END)
                kept = f.read()
            kept = kept[kept.find(b"\n") + 1 :]
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(kept)
            tmp.replace(path)
    return path.open("a", encoding="utf-8", errors="replace")
