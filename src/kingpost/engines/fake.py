"""An in-memory engine for unit tests of the controller: no processes, no I/O.

``start`` records the spec; the replica becomes READY on the next ``poll``
unless a test says otherwise with :meth:`FakeEngine.set_phase`.
"""

from __future__ import annotations

import threading
import time
from typing import ClassVar

from kingpost.engines.base import (
    Endpoint,
    Engine,
    LogLine,
    ReplicaPhase,
    ReplicaSpec,
    ReplicaStatus,
)

__all__ = ["FakeEngine"]


class FakeEngine(Engine):
    name: ClassVar[str] = "fake"

    def __init__(self, *, auto_ready: bool = True) -> None:
        self.auto_ready = auto_ready
        self.specs: dict[str, ReplicaSpec] = {}
        self.started: list[str] = []
        self.stopped: list[str] = []
        self.closed = False
        self._status: dict[str, ReplicaStatus] = {}
        self._lock = threading.Lock()
        self._next_port = 20000

    def start(self, spec: ReplicaSpec) -> None:
        with self._lock:
            if spec.replica_id in self.specs:
                return
            self._next_port += 1
            self.specs[spec.replica_id] = spec
            self.started.append(spec.replica_id)
            self._status[spec.replica_id] = ReplicaStatus(
                spec.replica_id,
                spec.deployment_id,
                ReplicaPhase.STARTING,
                Endpoint("127.0.0.1", self._next_port),
                started_at=time.time(),
                generation=spec.generation,
            )

    def poll(self) -> list[ReplicaStatus]:
        with self._lock:
            out = []
            for rid, st in self._status.items():
                if self.auto_ready and st.phase == ReplicaPhase.STARTING:
                    st = self._status[rid] = self._with(st, ReplicaPhase.READY)
                out.append(st)
            return out

    def stop(self, replica_id: str) -> None:
        with self._lock:
            if self._status.pop(replica_id, None) is not None:
                self.stopped.append(replica_id)

    def logs(self, deployment_id: str, tail: int = 200) -> list[LogLine]:
        with self._lock:
            return [
                LogLine(r, "fake output")
                for r, s in self._status.items()
                if s.deployment_id == deployment_id
            ][-tail:]

    def close(self) -> None:
        self.closed = True

    def set_phase(self, replica_id: str, phase: ReplicaPhase, message: str = "") -> None:
        """Make a replica ready, unready, failed… as a real engine would report it."""
        with self._lock:
            self._status[replica_id] = self._with(self._status[replica_id], phase, message)

    def live(self, deployment_id: str | None = None) -> list[str]:
        with self._lock:
            return [r for r, s in self._status.items() if deployment_id in (None, s.deployment_id)]

    @staticmethod
    def _with(st: ReplicaStatus, phase: ReplicaPhase, message: str = "") -> ReplicaStatus:
        return ReplicaStatus(
            st.replica_id,
            st.deployment_id,
            phase,
            st.endpoint,
            st.restarts,
            message or st.message,
            st.started_at,
            st.generation,
        )
