"""The gateway process as the control plane sees it: start, adopt, replace, stop.

The gateway outlives a control plane that dies (SIGKILL, a crash, OOM): it is started in
a session of its own with no parent-death signal, so it keeps serving the last routing
table it was pushed. ``{home}/run/gateway.json`` (0600, in the 0700 home that isolated
replicas do not see) names it: pid, the process's start time and the machine's boot id
(so a recycled pid is never taken for it), the Kingpost version and the settings it was
started with, its control sockets and its control token, and the control plane that runs
it. The next ``kingpost server`` refuses to start while that control plane still runs;
otherwise it reads the record and decides (:func:`decide`, a pure function of what it
found):

- ADOPT: the process is still ours (same boot, same start time, a gateway command line
  naming our control socket), every worker answers on its control socket with this
  Kingpost's version, and it runs as the settings say (address, workers, orphan timeout,
  the log store of its access lines, the OTLP endpoint it sends spans to, the database and
  limits its async routes use): the new control
  plane keeps its token, holds the requests for replicas its engines are about to restart
  (:func:`hold_restarting`) and pushes it newer tables.
- REPLACE: it is ours but runs another Kingpost version or other settings, or its control
  sockets do not answer: it is stopped (SIGTERM to its process group, SIGKILL after a
  grace), then a new one starts.
- START: there is no record, or the recorded process is gone or is not ours.

A gateway whose control plane never comes back does not serve forever: with
``orphan_timeout`` it exits once no control plane has pushed it a table for that long
(pushes come every 5 s). A clean stop of the server stops the gateway.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import hashlib
import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypedDict

import httpx

from kingpost import __version__
from kingpost.errors import KingpostError
from kingpost.gateway.control import TOKEN_HEADER, control_socket_paths, fetch_stats, push_table
from kingpost.gateway.table import RoutingTable
from kingpost.gateway.tracing import traces_endpoint
from kingpost.logstore.collect import LogSettings
from kingpost.settings import Settings

__all__ = [
    "Action",
    "AsyncStore",
    "GatewayProcess",
    "GatewayRecord",
    "Observed",
    "access_log_store",
    "async_store",
    "decide",
    "ensure_gateway",
    "hold_restarting",
    "process_alive",
    "recorded_plane_alive",
]

log = logging.getLogger("kingpost.server")

STOP_GRACE_S = 10.0
"""Seconds a gateway being stopped has to close before its process group is SIGKILLed."""


@dataclass(frozen=True)
class GatewayRecord:
    """What ``{home}/run/gateway.json`` says about the running gateway."""

    pid: int
    start_ticks: int
    """The process's start time (``/proc/PID/stat`` field 22): with ``boot_id``, tells the
    gateway apart from a later process that got its pid."""
    boot_id: str
    version: str
    host: str
    port: int
    workers: int
    orphan_timeout: float
    control_socket: str
    token: str
    plane_pid: int = 0
    """The control plane that runs it now, and that process's start time: a second
    ``kingpost server`` on the same home must not take the gateway from a live one."""
    plane_start_ticks: int = 0
    log_dir: str = ""
    """The log store its access lines go to (``--log-dir``); empty: it keeps none
    (``KINGPOST_LOG_ACCESS=false``)."""
    log_segment_bytes: int = 0
    """Its segments' size (``--log-segment-bytes``, from ``KINGPOST_LOG_MAX_BYTES``)."""
    metrics_listen: str = ""
    """Where it serves its own ``/metrics`` (``--metrics-listen``, from
    ``KINGPOST_GATEWAY_METRICS_LISTEN``); empty: nowhere."""
    traces_endpoint: str = ""
    """Where it sends spans (``gateway/tracing.py``'s ``traces_endpoint`` of the environment
    it inherited); empty: tracing off."""
    database: str = ""
    """A fingerprint of the database URL its async routes write to (``_async_env`` in
    ``serve.py``), not the URL, which may hold a password; empty in older records."""
    async_payload_limit: int = 0
    async_webhook_allow_http: bool = False

    def sockets(self) -> list[Path]:
        return control_socket_paths(Path(self.control_socket), self.workers)


class Action(enum.StrEnum):
    ADOPT = "adopt"  # the running gateway is ours and fits: keep it
    REPLACE = "replace"  # ours, but another version or other settings: stop it, start anew
    START = "start"  # none of ours runs: start one


@dataclass(frozen=True)
class Observed:
    """What the control plane found about the recorded gateway."""

    ours: bool
    """The recorded pid is alive and is that gateway (boot id, start time, command line)."""
    versions: tuple[str | None, ...] = ()
    """Each worker's Kingpost version from its control socket (None: no answer)."""


def decide(
    record: GatewayRecord | None, seen: Observed, settings: Settings, traces: str | None = None
) -> tuple[Action, str]:
    """What to do with the gateway a previous control plane left, and why. ``traces``:
    the OTLP endpoint a gateway started now would send spans to (None: tracing off)."""
    if record is None:
        return Action.START, "no gateway was recorded"
    if not seen.ours:
        return Action.START, f"the recorded gateway (pid {record.pid}) is gone"
    if any(v is None for v in seen.versions) or len(seen.versions) != record.workers:
        return Action.REPLACE, "its control sockets do not all answer"
    other = sorted({v for v in seen.versions if v is not None and v != __version__})
    if other:
        return Action.REPLACE, f"it runs Kingpost {', '.join(other)}, not {__version__}"
    wanted = {
        "host": settings.gateway_host,
        "port": settings.gateway_port,
        "workers": settings.gateway_workers,
        "orphan_timeout": settings.gateway_orphan_timeout,
        "control_socket": str(_base_socket(settings)),
    }
    wanted["log_dir"], wanted["log_segment_bytes"] = access_log_store(settings)
    wanted["traces_endpoint"] = traces or ""
    wanted["metrics_listen"] = settings.gateway_metrics_listen or ""
    wanted.update(async_store(settings))
    changed = [
        _change(k, getattr(record, k), v) for k, v in wanted.items() if getattr(record, k) != v
    ]
    if changed:
        return Action.REPLACE, "its settings changed: " + ", ".join(changed)
    return Action.ADOPT, f"it runs Kingpost {__version__} on {record.host}:{record.port}"


def _change(key: str, old: object, new: object) -> str:
    if key == "database":  # fingerprints tell the user nothing
        return "the database URL (KINGPOST_DATABASE_URL)"
    return f"{key} {old!r} -> {new!r}"


# -- the record ---------------------------------------------------------------------------
class AsyncStore(TypedDict):
    database: str
    async_payload_limit: int
    async_webhook_allow_http: bool


def async_store(settings: Settings) -> AsyncStore:
    """What the gateway's async routes run with (the environment ``serve.py`` hands it),
    as the record keeps it: another database would have an adopted gateway queue requests
    in a store no worker of this control plane reads."""
    return AsyncStore(
        database=hashlib.sha256(settings.db_url.encode()).hexdigest()[:16],
        async_payload_limit=settings.async_payload_limit,
        async_webhook_allow_http=settings.async_webhook_allow_http,
    )


def access_log_store(settings: Settings) -> tuple[str, int]:
    """Where the gateway keeps its access lines and its segments' size: ``("", 0)`` with
    ``KINGPOST_LOG_ACCESS=false``. The gateway's ``--log-dir`` and ``--log-segment-bytes``,
    and what adoption compares."""
    if not settings.log_access:
        return "", 0
    store = LogSettings(settings.logs_dir, settings.log_max_bytes, settings.log_max_age)
    return str(store.root), store.segment_bytes


def _base_socket(settings: Settings) -> Path:
    return settings.run_dir / "gateway.sock"


def record_path(settings: Settings) -> Path:
    return settings.run_dir / "gateway.json"


def read_record(path: Path) -> GatewayRecord | None:
    """The record at ``path``; None when there is none or it is not one (logged)."""
    try:
        raw = json.loads(path.read_text())
        return GatewayRecord(**raw)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as exc:
        log.warning("ignoring the gateway record %s: %s", path, exc)
        return None


def write_record(path: Path, record: GatewayRecord) -> None:
    """Write ``record`` 0600 (it holds the control token), replacing any whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(asdict(record), fh)
    os.replace(tmp, path)


# -- processes ----------------------------------------------------------------------------
def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _stat(pid: int) -> list[str] | None:
    """``/proc/PID/stat`` from field 3 (state) on; None when the process is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()


def start_ticks(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[19]) if fields is not None and len(fields) > 19 else None


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, exited but not yet reaped, does not)."""
    fields = _stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def observe(record: GatewayRecord) -> Observed:
    """Whether the recorded gateway still runs, and what each worker says it runs."""
    if record.boot_id != boot_id() or start_ticks(record.pid) != record.start_ticks:
        return Observed(ours=False)
    try:
        argv = Path(f"/proc/{record.pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return Observed(ours=False)
    if b"kingpost.gateway" not in argv or record.control_socket.encode() not in argv:
        return Observed(ours=False)
    if not process_alive(record.pid):
        return Observed(ours=False)
    return Observed(ours=True, versions=tuple(_version(s) for s in record.sockets()))


def _version(sock: Path) -> str | None:
    """The Kingpost version a gateway worker reports on its control socket."""
    try:
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock))) as c:
            r = c.get("http://gateway/healthz", timeout=2.0)
        return str(r.json().get("version", "unknown")) if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


@dataclass
class GatewayProcess:
    """The gateway this control plane runs: one it started, or one it adopted."""

    record: GatewayRecord
    adopted: bool
    child: subprocess.Popen[bytes] | None = None
    """Set when this control plane started it (and so must reap it)."""
    table_version: int = 0
    """The newest table version its workers held when adopted: pushes count on from it,
    since a gateway keeps a table newer than the one pushed."""

    @property
    def pid(self) -> int:
        return self.record.pid

    @property
    def token(self) -> str:
        return self.record.token

    def stop(self, path: Path | None = None) -> None:
        """SIGTERM its process group, SIGKILL it after :data:`STOP_GRACE_S`; then forget
        the record at ``path``."""
        _stop_group(self.pid, self.child)
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                if read_record(path) == self.record:
                    path.unlink()


def _stop_group(pid: int, child: subprocess.Popen[bytes] | None) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    if _wait_gone(pid, child, STOP_GRACE_S):
        return
    log.warning("the gateway (pid %d) did not stop in %.0f s: killing it", pid, STOP_GRACE_S)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    _wait_gone(pid, child, 5.0)


def _wait_gone(pid: int, child: subprocess.Popen[bytes] | None, timeout: float) -> bool:
    if child is not None:
        try:
            child.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    deadline = time.monotonic() + timeout
    while process_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _wait_for_sockets(paths: list[Path], gateway: subprocess.Popen[bytes], port: int) -> None:
    """Wait until every gateway worker listens on its control socket (or exited)."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and gateway.poll() is None:
        if all(p.exists() for p in paths):
            return
        time.sleep(0.05)
    if gateway.poll() is not None:
        raise KingpostError(
            f"the gateway exited with code {gateway.returncode}; is port {port} free? "
            "set KINGPOST_GATEWAY_PORT to another port (its own error, e.g. about "
            "KINGPOST_GATEWAY_METRICS_LISTEN, is in the server's output above)"
        )


def _plane_alive(record: GatewayRecord) -> bool:
    """Whether the control plane that recorded the gateway still runs (not this one)."""
    return (
        record.plane_pid not in (0, os.getpid())
        and record.boot_id == boot_id()
        and process_alive(record.plane_pid)
        and start_ticks(record.plane_pid) == record.plane_start_ticks
    )


def recorded_plane_alive(path: Path) -> bool:
    """Whether the control plane the gateway record at ``path`` names runs (a gateway about
    to leave as an orphan asks: one that started meanwhile keeps its replicas)."""
    record = read_record(path)
    return record is not None and _plane_alive(record)


def _table_version(sock: Path) -> int:
    try:
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock))) as c:
            return int(c.get("http://gateway/table/version", timeout=2.0).json()["version"])
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return 0


def ensure_gateway(
    settings: Settings, token: str, start: Callable[[Settings, str], subprocess.Popen[bytes]]
) -> GatewayProcess:
    """Adopt the gateway a previous control plane left running, or start one with
    ``start(settings, token)`` (replacing one that does not fit); record it. ``token`` is
    used for a new one only."""
    path = record_path(settings)
    old = read_record(path)
    if old is not None and _plane_alive(old):
        raise KingpostError(
            f"another kingpost server (pid {old.plane_pid}) runs with home {settings.home} "
            f"and its gateway (pid {old.pid}); stop it first, or set KINGPOST_HOME to "
            "another directory"
        )
    me, my_ticks = os.getpid(), start_ticks(os.getpid()) or 0
    traces = traces_endpoint(os.environ) or ""  # what a gateway started now inherits
    seen = observe(old) if old is not None else Observed(False)
    action, why = decide(old, seen, settings, traces)
    if old is not None and action == Action.ADOPT:
        version = max((_table_version(s) for s in old.sockets()), default=0)
        log.warning(
            "adopted the running gateway (pid %d): %s; it kept serving table version %d",
            old.pid,
            why,
            version,
        )
        adopted = dataclasses.replace(old, plane_pid=me, plane_start_ticks=my_ticks)
        write_record(path, adopted)
        return GatewayProcess(adopted, adopted=True, table_version=version)
    if old is not None and action == Action.REPLACE:
        log.warning("replacing the running gateway (pid %d): %s", old.pid, why)
        _stop_group(old.pid, None)
    elif old is not None:
        log.info("starting a gateway: %s", why)
    sockets = control_socket_paths(_base_socket(settings), settings.gateway_workers)
    for stale in sockets:  # left by a gateway that is gone: not a sign the new one listens
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
    log_dir, segment_bytes = access_log_store(settings)
    child = start(settings, token)
    try:
        _wait_for_sockets(sockets, child, settings.gateway_port)
        record = GatewayRecord(
            pid=child.pid,
            start_ticks=start_ticks(child.pid) or 0,
            boot_id=boot_id(),
            version=__version__,
            host=settings.gateway_host,
            port=settings.gateway_port,
            workers=settings.gateway_workers,
            orphan_timeout=settings.gateway_orphan_timeout,
            control_socket=str(_base_socket(settings)),
            token=token,
            plane_pid=me,
            plane_start_ticks=my_ticks,
            log_dir=log_dir,
            log_segment_bytes=segment_bytes,
            traces_endpoint=traces,
            metrics_listen=settings.gateway_metrics_listen or "",
            **async_store(settings),
        )
        write_record(path, record)
    except BaseException:
        _stop_group(child.pid, child)
        raise
    return GatewayProcess(record, adopted=False, child=child)


def hold_restarting(gateway: GatewayProcess, restarting: Collection[str], drain_s: float) -> None:
    """Hand an adopted gateway over before this control plane starts its engines: the
    deployments in ``restarting`` (on engines that do not keep replicas, whose leftovers
    the engine kills as it starts) lose their upstreams in its table, so their requests
    wait for the replicas started anew (up to the hold timeout) instead of failing on a
    killed one; requests already on those replicas get up to ``drain_s`` to finish."""
    if not restarting:
        return
    for sock in gateway.record.sockets():
        table = _fetch_table(sock, gateway.token)
        if table is None or table.version == 0:
            continue
        held = {
            d: dataclasses.replace(route, upstreams=()) if d in restarting else route
            for d, route in table.deployments.items()
        }
        version = table.version + 1
        try:
            push_table(
                sock,
                dataclasses.replace(table, version=version, deployments=held),
                token=gateway.token,
            )
        except KingpostError as exc:  # the first pass pushes a whole table anyway
            log.warning("holding the restarting deployments' requests failed: %s", exc)
            continue
        gateway.table_version = max(gateway.table_version, version)
    deadline = time.monotonic() + drain_s
    while time.monotonic() < deadline:
        try:
            busy = sum(
                stats.deployments[d].inflight_total
                for stats in (fetch_stats(sock) for sock in gateway.record.sockets())
                for d in restarting
                if d in stats.deployments
            )
        except KingpostError:
            return
        if busy == 0:
            return
        time.sleep(0.05)
    log.warning("requests still on replicas of the last run after %.0f s: cut off", drain_s)


def _fetch_table(sock: Path, token: str) -> RoutingTable | None:
    try:
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock))) as c:
            r = c.get("http://gateway/table", headers={TOKEN_HEADER: token}, timeout=5.0)
        return RoutingTable.from_json(r.json()) if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        log.warning("reading the adopted gateway's table from %s failed: %s", sock, exc)
        return None
