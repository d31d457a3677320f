"""Wake-ups from the gateway: a thread per gateway worker long-polls its ``GET /demand``
and hands each deployment that requests wait for (with no ready replica) to the
controller, which starts one at once instead of at its next stats pull.

This is the control plane's only per-request signal, and it is sent only for requests
that wait with no ready replica (a deployment at zero, or still starting): a serving
deployment's requests never cause one.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["DemandWatcher"]

log = logging.getLogger(__name__)
POLL_S = 20.0
RETRY_S = 0.5


class DemandWatcher:
    def __init__(
        self,
        sockets: Sequence[Path],
        on_demand: Callable[[str, int], None],
        *,
        token: str | None = None,
    ) -> None:
        self._sockets = list(sockets)
        self._on_demand = on_demand
        self._token = token
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for sock in self._sockets:
            t = threading.Thread(
                target=self._watch, args=(sock,), name=f"kingpost-demand-{sock.name}", daemon=True
            )
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()  # the threads are daemons: a long poll in flight is left to end

    def _watch(self, sock: Path) -> None:
        from kingpost.gateway import fetch_demand

        while not self._stop.is_set():
            try:
                demand = fetch_demand(sock, POLL_S, token=self._token)
            except Exception as exc:  # a restarting gateway: try again shortly
                log.debug("demand poll of %s failed: %s", sock, exc)
                self._stop.wait(RETRY_S)
                continue
            for dep_id, waiting in demand.items():
                try:
                    self._on_demand(dep_id, waiting)
                except Exception:
                    log.exception("waking deployment %s failed", dep_id)
