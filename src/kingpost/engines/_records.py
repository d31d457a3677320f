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

A replica adopted is no child of the new control plane: :class:`RecordedProcess` watches
it through ``/proc``. Processes of this home no record names are killed
(:func:`kill_leftovers`).

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
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from kingpost.engines.base import Probes, ReplicaSpec, ServerKind
from kingpost.gateway_process import boot_id, process_alive, start_ticks

__all__ = [
    "RecordedProcess",
    "ReplicaRecord",
    "alive",
    "read_records",
    "records_dir",
    "stop_recorded",
]

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

    @classmethod
    def of(
        cls,
        spec: ReplicaSpec,
        pid: int,
        port: int,
        netns: bool,
        started_at: float,
        reload_token: str,
    ) -> ReplicaRecord:
        """The record of ``spec``'s replica, whose first process ``pid`` runs now."""
        return cls(
            replica_id=spec.replica_id,
            deployment_id=spec.deployment_id,
            model_id=spec.model_id,
            generation=spec.generation,
            kind=str(spec.kind),
            pid=pid,
            start_ticks=start_ticks(pid) or 0,
            boot_id=boot_id(),
            port=port,
            netns=netns,
            predict_path=spec.predict_path,
            probes=dict(asdict(spec.probes)),
            started_at=started_at,
            reload_token=reload_token if spec.reloadable else "",
            reloadable=spec.reloadable,
            run_as_user_id=spec.run_as_user_id,
        )

    def probe_settings(self) -> Probes:
        return Probes(**self.probes)  # type: ignore[arg-type]

    def spec(self, app_dir: Path) -> ReplicaSpec:
        """What the engine knows of an adopted replica: enough to watch, stop and reload
        it, not to start it again (no environment, secrets or interpreter)."""
        return ReplicaSpec(
            replica_id=self.replica_id,
            deployment_id=self.deployment_id,
            model_id=self.model_id,
            kind=ServerKind(self.kind),
            app_dir=app_dir,
            server_port=self.port,
            predict_path=self.predict_path,
            probes=self.probe_settings(),
            reloadable=self.reloadable,
            run_as_user_id=self.run_as_user_id,
            generation=self.generation,
        )


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


class RecordedProcess:
    """The first process of a replica an earlier control plane started: not a child of
    this one, so it is watched through ``/proc`` (its start time guards against a pid
    that was recycled). The part of ``Popen``'s interface the engine uses."""

    def __init__(self, pid: int, ticks: int) -> None:
        self.pid, self._ticks = pid, ticks
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and not (
            start_ticks(self.pid) == self._ticks and process_alive(self.pid)
        ):
            self.returncode = -1  # its exit status went to whoever reaped it
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0.0)
            time.sleep(0.05)
        return code


def _process_group(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    return int(fields[2]) if len(fields) > 2 else None


def kill_leftovers(replicas_dir: Path, adopted: set[int]) -> None:
    """Kill the replica processes an earlier run of this home left running that no
    record names (a crash between a launch and its record, a record lost): every
    process whose ``APP_HOME`` lies under this home's replicas and which is not in the
    process group of a replica the engine adopted (``adopted``: their leaders' pids)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return
    prefix = b"APP_HOME=" + bytes(replicas_dir) + b"/"
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        if _process_group(int(entry.name)) in adopted:
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone, or not ours to read
            continue
        if any(var.startswith(prefix) for var in environ.split(b"\0")):
            log.warning("process engine: killing pid %s left by an earlier run", entry.name)
            with contextlib.suppress(OSError):
                os.kill(int(entry.name), signal.SIGKILL)
