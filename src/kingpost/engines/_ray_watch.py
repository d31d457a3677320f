"""Stops a Ray node's replica when the actor that ran it dies.

A replica's first process leads a session of its own (so that a process engine can adopt
it after a crash), and so it outlives a Ray worker that is killed. Ray then restarts the
actor, maybe on another node, and the replica left behind would hold its node's memory
and accelerators for good. Each :class:`~kingpost.engines._ray_node.ReplicaHost` starts
this watcher in a session of its own, holding the read end of a pipe whose write end only
the actor holds: when the actor's process ends, however it ends, the read sees the end of
the pipe and the watcher stops what the process engine recorded as running (SIGTERM to
each replica's process group, SIGKILL after the grace), then exits. After a clean stop
nothing is recorded any more and it just exits.

    python -m kingpost.engines._ray_watch FD RECORDS_DIR GRACE_S
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    fd, records, grace = int(argv[0]), Path(argv[1]), float(argv[2])
    try:
        while os.read(fd, 4096):  # nothing is ever written: this waits for the end
            pass
    except OSError:
        pass
    from kingpost.engines._records import stop_recorded

    stop_recorded(records, grace)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
