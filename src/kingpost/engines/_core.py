"""What every engine that runs and watches replicas itself shares.

An engine of this kind keeps a table of the replicas it was asked to run, and one
monitor thread steps each of them every tick: launch when due, notice an exit, run a
probe round, stop. The table, :meth:`poll` and :meth:`stop`, the monitor loop, what a
probe round's outcome does and what an exit does are the same whatever runs the
replica (a process, a container, later a Ray actor); an engine writes only how to
launch, inspect and remove its own kind of replica (:meth:`ReplicaEngine._step`).
"""

from __future__ import annotations

import logging
import threading
import time
from abc import abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

from kingpost.engines.base import Engine, Probes, ReplicaPhase, ReplicaStatus
from kingpost.engines.probes import PROBE_WORKERS, ReplicaHealth

__all__ = ["ReplicaEngine", "Tracked"]

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class Tracked(ReplicaHealth):
    """One replica an engine runs: who it is, and its health."""

    replica_id: str
    deployment_id: str
    generation: int = 0

    def status(self) -> ReplicaStatus:
        return ReplicaStatus(
            self.replica_id,
            self.deployment_id,
            self.phase,
            self.endpoint,
            self.restarts,
            self.message,
            self.started_at,
            self.generation,
        )


R = TypeVar("R", bound=Tracked)


class ReplicaEngine(Engine, Generic[R]):
    """The table of replicas and the monitor thread over it (see the module's text).

    A subclass calls :meth:`_track` in its ``__init__`` (then fills the table, e.g. with
    replicas it adopts) and :meth:`_watch` to start the monitor."""

    tick_s: float = 0.1

    def _track(self) -> None:
        self._replicas: dict[str, R] = {}
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._probes = ThreadPoolExecutor(PROBE_WORKERS, thread_name_prefix="kingpost-probe")

    def _watch(self) -> None:
        self._thread = threading.Thread(
            target=self._monitor, name=f"kingpost-{self.name}-engine", daemon=True
        )
        self._thread.start()

    # -- the Engine interface ------------------------------------------------------------
    def poll(self) -> list[ReplicaStatus]:
        with self._lock:
            return [r.status() for r in self._replicas.values() if not r.stopping]

    def stop(self, replica_id: str) -> None:
        with self._lock:
            rep = self._replicas.get(replica_id)
            if rep is not None and not rep.stopping:
                rep.stopping = True
                self._stopping(rep)

    # -- what a subclass writes ------------------------------------------------------------
    def _stopping(self, rep: R) -> None:
        """Called (under the lock) when ``rep`` is asked to stop; the monitor stops it."""

    @abstractmethod
    def _step(self, rep: R, now: float) -> None:
        """One tick of one replica: launch, check, probe or stop it, as it is due."""

    def _due(self, rep: R) -> bool:
        """Whether the monitor steps ``rep`` this tick (not while an action of its runs)."""
        return True

    def _pause(self, replicas: Sequence[R]) -> None:
        """Wait for the next tick (returns at once when the engine closes)."""
        self._closing.wait(self.tick_s)

    # -- the monitor thread -------------------------------------------------------------------
    def _monitor(self) -> None:
        while not self._closing.is_set():
            with self._lock:
                replicas = [r for r in self._replicas.values() if self._due(r)]
            now = time.monotonic()
            for rep in replicas:
                try:
                    self._step(rep, now)
                except Exception:
                    log.exception("%s engine: replica %s", self.name, rep.replica_id)
            self._pause(replicas)

    def _finish_stops(self, grace_s: float) -> None:
        """Wait, up to ``grace_s`` and ten seconds more, until no replica asked to stop is
        still stopping; then end the monitor thread (for ``close``)."""
        deadline = time.monotonic() + grace_s + 10
        while time.monotonic() < deadline:
            with self._lock:
                if not any(r.stopping for r in self._replicas.values()):
                    break
            time.sleep(0.05)
        self._closing.set()
        self._thread.join(timeout=5)

    def _forget_replica(self, rep: R) -> None:
        with self._lock:
            self._replicas.pop(rep.replica_id, None)

    # -- rules every engine applies ---------------------------------------------------------
    def _probe_round(
        self, rep: R, probes: Probes, restart: Callable[[R, float, str], None]
    ) -> None:
        """One probe round (I/O on the calling thread), then what it calls for: a restart
        (why), or the controller told at once that a replica became ready."""
        was = rep.phase
        now = time.monotonic()
        why = rep.probe(probes, now)
        if why is not None:
            restart(rep, now, why)
        elif rep.phase == ReplicaPhase.READY != was and self.on_ready is not None:
            self.on_ready()  # the controller routes to it now

    @staticmethod
    def _after_exit(rep: R, now: float, why: str, last_output: Callable[[], list[str]]) -> None:
        """The server exited (``why``): FAILED with its last output when it never became
        ready and exited too often, else RESTARTING after a backoff."""
        rep.endpoint, rep.live_fails, rep.ready_fails = None, 0, 0
        if rep.give_up():
            tail = "\n".join(last_output())
            rep.phase = ReplicaPhase.FAILED
            rep.message = f"server {why} before becoming ready; last output:\n{tail}"
            return
        rep.back_off(now, f"{why}; restarting")
