"""What the process engine writes down about each replica it runs, for the next control
plane to adopt it after a crash.

A replica's first process leads a session of its own and gets no parent-death signal,
so it outlives a control plane that is killed (SIGKILL, OOM). ``{home}/run/replicas/
{replica_id}.json`` (0600, in the home that isolated replicas do not see) names it: its
pid with the process's start time and the machine's boot id (a recycled pid is never
taken for it), its port and network namespace, and what the engine needs to watch it
again (deployment, generation, probes, its reload token). The record is written once the
process runs and removed when the engine forgets the replica, so a clean stop leaves
none; a crash leaves them for :meth:`ProcessEngine.__init__` to adopt.

An orphaned replica does not serve forever: the gateway, which outlives its control
plane the same way, stops the recorded replicas as it exits on its orphan timeout
(:func:`stop_recorded`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from kingpost.engines.base import Probes, ServerKind
from kingpost.gateway_process import boot_id, process_alive, start_ticks

__all__ = ["ReplicaRecord", "alive", "read_records", "records_dir", "stop_recorded"]

log = logging.getLogger(__name__)


def records_dir(run_dir: Path) -> Path:
    return run_dir / "replicas"


@dataclass(frozen=True)
class ReplicaRecord:
    replica_id: str
    deployment_id: str
    model_id: str
    generation: int
    kind: str
    """:class:`ServerKind` of the replica."""
    pid: int
    """Its first process, which leads its process group."""
    start_ticks: int
    """``/proc/PID/stat`` field 22 of ``pid``: with ``boot_id``, tells it from a later
    process that got its pid."""
    boot_id: str
    port: int
    netns: bool
    predict_path: str
    probes: dict[str, float | int | str]
    started_at: float
    reload_token: str = ""
    reloadable: bool = False
    run_as_user_id: int | None = None

    @property
    def server_kind(self) -> ServerKind:
        return ServerKind(self.kind)

    def probe_settings(self) -> Probes:
        return Probes(**self.probes)  # type: ignore[arg-type]


def probes_dict(probes: Probes) -> dict[str, float | int | str]:
    return dict(asdict(probes))


def write_record(directory: Path, record: ReplicaRecord) -> None:
    """Write ``record`` 0600 (its reload token is a secret), replacing any whole."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / f"{record.replica_id}.json"
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(asdict(record), fh)
    os.replace(tmp, path)


def remove_record(directory: Path, replica_id: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        (directory / f"{replica_id}.json").unlink()


def read_records(directory: Path) -> list[ReplicaRecord]:
    """Every record in ``directory``; one that cannot be read is removed (logged)."""
    if not directory.is_dir():
        return []
    out: list[ReplicaRecord] = []
    fields = {f.name for f in dataclasses.fields(ReplicaRecord)}
    for path in sorted(directory.glob("*.json")):
        try:
            raw = json.loads(path.read_text())
            out.append(ReplicaRecord(**{k: v for k, v in raw.items() if k in fields}))
        except (OSError, ValueError, TypeError) as exc:
            log.warning("ignoring the replica record %s: %s", path, exc)
            path.unlink(missing_ok=True)
    return out


def alive(record: ReplicaRecord) -> bool:
    """Whether the recorded process still runs and is that replica (same boot, same start
    time, not a zombie)."""
    return (
        record.boot_id == boot_id()
        and start_ticks(record.pid) == record.start_ticks
        and process_alive(record.pid)
    )


def stop_recorded(directory: Path, grace_s: float = 5.0) -> list[str]:
    """Stop every recorded replica that still runs (SIGTERM to its process group, SIGKILL
    after ``grace_s``) and forget the records: what an orphaned gateway does as it exits,
    since no control plane came back to adopt them. Returns the replicas stopped."""
    live = []
    for record in read_records(directory):
        if alive(record):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(record.pid, signal.SIGTERM)
                live.append(record)
        remove_record(directory, record.replica_id)
    deadline = time.monotonic() + grace_s
    while any(alive(r) for r in live) and time.monotonic() < deadline:
        time.sleep(0.05)
    for record in live:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(record.pid, signal.SIGKILL)
    return [r.replica_id for r in live]
