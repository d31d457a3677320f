"""HTTP health probes (one GET, 2xx passes; optionally from inside a network namespace)
and the probe and restart rules every engine applies to its replicas."""

from __future__ import annotations

import socket
from dataclasses import dataclass

from kingpost.engines.base import Endpoint, Probes, ReplicaPhase
from kingpost.netns import socket_in_netns

__all__ = ["MAX_EXITS_BEFORE_READY", "PROBE_WORKERS", "ReplicaHealth", "http_probe"]

MAX_EXITS_BEFORE_READY = 3
"""A replica that exits this often without ever being ready is FAILED, not restarted."""
BACKOFF_CAP_S = 30.0
PROBE_WORKERS = 32
"""Probe rounds an engine runs at once. Each runs off the engine's monitor thread, so
a replica whose health endpoint hangs (a model holding the GIL in a C call) costs its
own round up to the probe timeout, and no other replica's probes, launches or stops."""


def http_probe(endpoint: Endpoint, path: str, timeout: float = 2.0) -> bool:
    """``GET path`` on the endpoint; True on a 2xx status line."""
    try:
        sock = (
            socket_in_netns(endpoint.netns)
            if endpoint.netns
            else socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        )
    except OSError:
        return False
    with sock:
        sock.settimeout(timeout)
        try:
            sock.connect((endpoint.host, endpoint.port))
            request = (
                f"GET {path} HTTP/1.1\r\nHost: {endpoint.host}\r\n"
                "User-Agent: kingpost-probe\r\nConnection: close\r\n\r\n"
            )
            sock.sendall(request.encode())
            head = sock.recv(64)
        except OSError:
            return False
    parts = head.split(b" ", 2)
    return len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1][:1] == b"2"


STARTING_PROBE_S = 0.01
"""Probe period of a replica in its first two seconds, before it was ever ready."""


@dataclass(kw_only=True)
class ReplicaHealth:
    """What an engine tracks of one replica's health, whatever runs it."""

    phase: ReplicaPhase = ReplicaPhase.STARTING
    endpoint: Endpoint | None = None
    restarts: int = 0
    exits_before_ready: int = 0
    ever_ready: bool = False
    ready_fails: int = 0
    live_fails: int = 0
    launched: float = 0.0
    next_start: float = 0.0
    started_at: float = 0.0
    message: str = ""
    stopping: bool = False

    def probe_period(self, period_s: float, now: float) -> float:
        """How soon to probe again: every 10 ms for a replica's first 2 s before it was ever
        ready (a trivial server is up in tens of ms, and a refused connection is cheap),
        every 50 ms up to 10 s, then the configured period (a model loading for minutes is
        not asked a hundred times a second)."""
        if self.ever_ready:
            return period_s
        age = now - self.launched
        return min(period_s, STARTING_PROBE_S if age < 2 else 0.05 if age < 10 else period_s)

    def probe(self, probes: Probes, now: float) -> str | None:
        """One probe round against :attr:`endpoint` (the I/O), judged by :meth:`judge`;
        returns why the replica must be restarted, or None."""
        endpoint = self.endpoint
        assert endpoint is not None
        timeout = min(probes.timeout_s, 1.0)
        ready = http_probe(endpoint, probes.readiness_path, timeout)
        alive: bool | None = None
        if (self.ever_ready or ready) and now - self.launched >= probes.initial_delay_s:
            alive = (
                ready
                if probes.liveness_path == probes.readiness_path
                else http_probe(endpoint, probes.liveness_path, timeout)
            )
        return self.judge(probes, now, ready, alive)

    def judge(self, probes: Probes, now: float, ready: bool, alive: bool | None) -> str | None:
        """The rules, without I/O: one round's readiness (and liveness, once the replica
        has been ready and the initial delay has passed; else ``None``) moves the phase
        and the failure counts; returns why the replica must be restarted (never ready
        within the startup timeout, liveness failing its threshold), or None.

        Readiness failing only takes traffic away (NOT_READY after its threshold); it
        never restarts a replica that has been ready."""
        if ready:
            self.ready_fails = 0
            if self.phase != ReplicaPhase.READY:
                self.message = ""
            self.phase, self.ever_ready = ReplicaPhase.READY, True
        elif self.phase == ReplicaPhase.READY:
            self.ready_fails += 1
            if self.ready_fails >= probes.readiness_failure_threshold:
                self.phase, self.message = ReplicaPhase.NOT_READY, "readiness probe failing"
        if not self.ever_ready:
            if now - self.launched > probes.startup_timeout_s:
                return f"not ready after {probes.startup_timeout_s:.0f}s"
            return None
        if now - self.launched < probes.initial_delay_s or alive is None:
            return None
        self.live_fails = 0 if alive else self.live_fails + 1
        if self.live_fails >= probes.liveness_failure_threshold:
            return "liveness probe failed"
        return None

    def give_up(self) -> bool:
        """Count an exit; True when the replica never became ready and exited too often."""
        if self.ever_ready:
            return False
        self.exits_before_ready += 1
        return self.exits_before_ready >= MAX_EXITS_BEFORE_READY

    def back_off(self, now: float, why: str) -> None:
        """RESTARTING, to start again after an exponential backoff (capped)."""
        self.restarts += 1
        self.phase, self.message = ReplicaPhase.RESTARTING, why
        self.next_start = now + min(BACKOFF_CAP_S, 2.0 ** (self.restarts - 1))
