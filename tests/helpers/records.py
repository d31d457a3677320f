"""A process that stands for a replica the process engine recorded as running (what a
killed Ray actor can leave behind), for tests of what stops such replicas."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from kingpost.engines._records import ReplicaRecord, write_record
from kingpost.gateway_process import boot_id, start_ticks


def recorded_sleeper(records: Path, replica_id: str) -> subprocess.Popen[bytes]:
    """A sleeping process in a session of its own, recorded in ``records`` (a records
    directory) as replica ``replica_id``; the caller kills and reaps it in the end."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True
    )
    ticks = start_ticks(proc.pid)
    assert ticks is not None
    record = ReplicaRecord(
        replica_id, "d", "m", 1, "custom_server", proc.pid, ticks, boot_id(), 8000, False,
        "/predict", {}, time.time(),
    )  # fmt: skip
    write_record(records, record)
    return proc
