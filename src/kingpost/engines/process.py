"""The process engine: replicas as local subprocesses (the embedded default).

Each replica gets a private copy of the project as its working directory, the
replica contract's environment, secrets as read-only files on a memory-backed
filesystem, and, where the OS permits (root / CAP_SYS_ADMIN), its own network
namespace, so any number of replicas can bind the same fixed ``server_port``;
the gateway and the probes connect from inside that namespace. Without
namespaces a second live replica on the same fixed port is refused.

All process work (spawn, probe, restart, kill) happens on one monitor thread.

Restart semantics: a clean stop (:meth:`ProcessEngine.close`) stops every replica. A
crash does not: each replica leads a session of its own with no parent-death signal and
writes its output to a file, so it outlives a control plane killed with SIGKILL, and
``{home}/run/replicas/{id}.json`` records it (``engines/_records.py``). The next engine
adopts every recorded replica still running (same pid, start time and boot) and watches
it again; the controller then stops those it no longer wants. An adopted replica that
exits or fails its liveness probe is dropped (the controller starts a fresh one in its
place): the engine no longer holds the secrets and environment to start it again.
Processes of this home that no record names are killed as the engine starts.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import posixpath
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISDIR
from typing import TYPE_CHECKING, ClassVar, Literal

from kingpost._cancel import kill_orphans
from kingpost._logtail import tail_lines
from kingpost.engines._core import ReplicaEngine, Tracked
from kingpost.engines._isolation import Isolation, can_unshare_mounts
from kingpost.engines._launcher import LaunchedProcess, Launcher
from kingpost.engines._records import (
    RecordedProcess,
    ReplicaRecord,
    alive,
    kill_leftovers,
    read_records,
    records_dir,
    remove_record,
    write_record,
)
from kingpost.engines._reload import Patch, ask_reload, open_parent
from kingpost.engines._secrets import private_dir, remove_secrets, tmpfs, write_secrets
from kingpost.engines._view import View, plan_view, replica_uid
from kingpost.engines.base import (
    BuildLog,
    Endpoint,
    LogLine,
    Prepared,
    Reload,
    ReplicaPhase,
    ReplicaSpec,
    ServerKind,
    gpu_environment,
    scope_of,
)
from kingpost.engines.probes import STARTING_PROBE_S, http_probe
from kingpost.errors import EngineError
from kingpost.netns import can_unshare_net, forget_netns
from kingpost.server.contract import DYNAMIC_CONFIG_ENV, RELOAD_TOKEN_ENV, SERVER_ARGS
from kingpost.settings import Settings

if TYPE_CHECKING:
    from kingpost.config import TrussConfig
    from kingpost.envs import ModelEnvPolicy

__all__ = ["ProcessEngine", "model_env_policy", "prepare_python", "python_environment_hash"]

log = logging.getLogger(__name__)

TICK_S = 0.1


def starting_probe_period(rep: _Replica, now: float) -> float:
    """How soon to probe ``rep`` again (:meth:`ReplicaHealth.probe_period`)."""
    return rep.probe_period(rep.spec.probes.period_s, now)


SECRETS_MOUNT = "/secrets"


@dataclass
class _Replica(Tracked):
    spec: ReplicaSpec
    root: Path
    port: int
    netns: bool
    proc: subprocess.Popen[bytes] | LaunchedProcess | RecordedProcess | None = None
    next_probe: float = 0.0
    kill_at: float = 0.0
    probing: bool = False
    """A probe round of it runs on the probe pool; the monitor leaves it alone meanwhile."""
    reload_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    relaunch: bool = False
    """Set by :meth:`ProcessEngine.reload`: the monitor kills the server and starts it
    again on the (patched) files, without a backoff."""
    adopted: bool = False
    """Started by an earlier control plane: its ``spec`` holds only what its record
    says, so it is dropped, not started again, once its server is gone."""

    @property
    def app(self) -> Path:
        return self.root / "app"

    @property
    def log_path(self) -> Path:
        return self.root / "output.log"


PORT_RETRY_S = 1.0
"""How often a custom server whose fixed port another process holds looks again."""


def _port_taken(port: int) -> bool:
    """Whether a process listens on ``port`` on any local address (a bind to the wildcard
    address fails then; one merely in TIME_WAIT does not, with SO_REUSEADDR)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def _listening_socket() -> socket.socket:
    """A socket listening on a free loopback port, for a model server to inherit."""
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _environment_kind(config: TrussConfig) -> Literal["model", "custom_server"] | None:
    """Which Python environment :meth:`ProcessEngine.prepare` builds for a project, so
    that ``environment_hash`` names the same one: a model class's, a custom server's, or
    none (a ``no_build`` custom server runs as it is)."""
    if config.docker_server is None:
        return "model"
    return None if config.docker_server.no_build else "custom_server"


def _tail(path: Path, lines: int) -> list[str]:
    """The last lines of a replica's output, none if it has none yet."""
    try:
        return tail_lines(path, lines, 64 * 1024)
    except FileNotFoundError:
        return []


def _chown_tree(path: Path, uid: int | None) -> None:
    """Give a replica's own files to its uid (and gid); nothing without one."""
    if uid is None:
        return
    os.chown(path, uid, uid, follow_symlinks=False)
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            os.chown(os.path.join(dirpath, name), uid, uid, follow_symlinks=False)


def _tmp_is_free(view: View, binds: tuple[tuple[str, str], ...]) -> bool:
    """Whether a private ``/tmp`` would hide nothing the replica is shown (a home under
    ``/tmp``, as in tests, keeps the host's: its own tree is bound back there)."""
    paths = [*view.masks, *(p for p, _ in view.keep), *(t for _, t in binds)]
    return not any(p == "/tmp" or p.startswith("/tmp/") for p in paths)


def _group_alive(pgid: int) -> bool:
    """Whether any process of group ``pgid`` still runs (zombies do not count: a server
    orphaned under init is reaped by it, not by us)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _secrets_root(scope: str) -> Path:
    """Where one installation's replicas get their secret files: per user and home."""
    user = tmpfs() / f"kingpost-{os.getuid()}"
    private_dir(user)
    return user / scope


def model_env_policy(settings: Settings) -> ModelEnvPolicy:
    """How model classes get their environments under ``settings`` (``KINGPOST_MODEL_ENV``)."""
    from kingpost.envs import ModelEnvMode, ModelEnvPolicy

    return ModelEnvPolicy(
        ModelEnvMode(settings.model_env), settings.base_envs_dir, settings.truss_version
    )


def prepare_python(
    settings: Settings, config: TrussConfig, app_dir: Path, log: BuildLog
) -> Prepared:
    """What a replica of this project runs in, under ``settings.envs_dir``: a model class
    gets its Python environment (cached by input hash); a custom server one for its
    requirements alone, when it lists any (with ``no_build``, which ignores them, it runs
    as it is). The process engine's ``prepare``, and the Ray engine's on each node."""
    from kingpost.envs import ensure_custom_server_environment, ensure_environment

    kind = _environment_kind(config)
    envs_dir = settings.envs_dir
    if kind == "model":
        env = ensure_environment(config, app_dir, envs_dir, log, model_env_policy(settings))
        return Prepared(python_executable=env.python_executable)
    if kind is None:
        return Prepared()
    custom = ensure_custom_server_environment(config, app_dir, envs_dir, log)
    return Prepared(python_executable=custom.python_executable if custom else None)


def python_environment_hash(settings: Settings, config: TrussConfig, app_dir: Path) -> str | None:
    """The hash of the environment :func:`prepare_python` makes for this project under
    ``settings.envs_dir`` (``None``: it runs without one), without building it."""
    from kingpost.envs import environment_hash

    kind = _environment_kind(config)
    if kind is None:
        return None
    return environment_hash(
        config, app_dir, custom_server=kind == "custom_server", policy=model_env_policy(settings)
    )


class ProcessEngine(ReplicaEngine[_Replica]):
    name: ClassVar[str] = "process"
    tick_s = TICK_S

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.netns = settings.netns != "off" and sys.platform == "linux" and can_unshare_net()
        if settings.netns == "on" and not self.netns:
            raise EngineError("netns=on, but this process may not create network namespaces")
        self.mounts = sys.platform == "linux" and can_unshare_mounts()
        self.isolate = settings.isolation != "off" and self.mounts and os.geteuid() == 0
        if settings.isolation == "on" and not self.isolate:
            raise EngineError(
                "isolation=on, but replicas cannot be isolated here: that needs Linux, root "
                "and mount namespaces. Run Kingpost as root, or set KINGPOST_ISOLATION=auto"
            )
        if not self.isolate:
            log.warning(
                "process engine: REPLICAS ARE NOT ISOLATED: they run as uid %d and see this "
                "machine's files as Kingpost does, its home %s included (database, secret.key, "
                "credentials, other models' files). Isolation needs Linux, root and mount "
                "namespaces%s; use the docker engine for models you do not trust",
                os.getuid(),
                settings.home,
                " (KINGPOST_ISOLATION=off)" if settings.isolation == "off" else "",
            )
        self._records = records_dir(settings.run_dir)
        self._secrets_root = _secrets_root(scope_of(settings.home))
        self._track()
        self._past: dict[str, list[Path]] = {}
        self._adopt()
        kill_leftovers(
            settings.replicas_dir,
            {r.proc.pid for r in self._replicas.values() if r.proc is not None},
        )
        for pid in kill_orphans():  # builds' processes a killed control plane left
            log.warning("process engine: killed pid %s left by an earlier build", pid)
        # Secret files an earlier run could not remove (it was killed), but those of the
        # replicas adopted: nothing else runs yet.
        if self._secrets_root.is_dir():
            for path in self._secrets_root.iterdir():
                if path.name not in self._replicas:
                    remove_secrets(path)
        self._kick = threading.Event()
        """Set by ``start``: the monitor's wait ends at once."""
        self._launcher: Launcher | None = None
        """Forks replicas that need setting up between fork and exec (namespaces, mounts, a
        uid) from a small process of its own: ``Popen`` with a ``preexec_fn`` would fork
        this whole process for each (``engines/_launcher.py``)."""
        if self.netns or self.isolate:
            self._launcher = Launcher()
            self._launcher.start()
        self._watch()

    def _adopt(self) -> None:
        """Watch again the replicas an earlier control plane left running (their records
        name a live process); forget the records of those that are gone."""
        for record in read_records(self._records):
            if not alive(record):
                log.info("process engine: replica %s is gone: forgotten", record.replica_id)
                remove_record(self._records, record.replica_id)
                continue
            rep = self._adopted_replica(record)
            self._replicas[rep.replica_id] = rep
            self._past.setdefault(rep.deployment_id, []).append(rep.root)
            log.info(
                "process engine: adopted replica %s (pid %d, %s)",
                rep.replica_id,
                record.pid,
                rep.phase,
            )

    def _adopted_replica(self, record: ReplicaRecord) -> _Replica:
        root = self.settings.replicas_dir / record.replica_id
        probes = record.probe_settings()
        now = time.monotonic()
        rep = _Replica(
            record.spec(root / "app"),
            root,
            record.port,
            record.netns,
            proc=RecordedProcess(record.pid, record.start_ticks),
            reload_token=record.reload_token,
            adopted=True,
            replica_id=record.replica_id,
            deployment_id=record.deployment_id,
            generation=record.generation,
            started_at=record.started_at,
            launched=now,
            next_probe=now + probes.period_s,
        )
        netns = f"/proc/{record.pid}/ns/net" if record.netns else None
        rep.endpoint = Endpoint("127.0.0.1", record.port, netns)
        # Ready now, so the controller's first pass (which publishes the routing table
        # after a restart) routes to it; one still loading goes on starting.
        if http_probe(rep.endpoint, probes.readiness_path, min(probes.timeout_s, 1.0)):
            rep.phase, rep.ever_ready = ReplicaPhase.READY, True
        rep.message = "adopted from an earlier control plane"
        return rep

    # -- the Engine interface ------------------------------------------------------------
    def prepare(self, config: TrussConfig, app_dir: Path, log: BuildLog) -> Prepared:
        return prepare_python(self.settings, config, app_dir, log)

    def environment_hash(self, config: TrussConfig, app_dir: Path) -> str | None:
        return python_environment_hash(self.settings, config, app_dir)

    def _model_env_policy(self) -> ModelEnvPolicy:
        return model_env_policy(self.settings)

    def start(self, spec: ReplicaSpec) -> None:
        with self._lock:
            if spec.replica_id in self._replicas:
                return
            port = self._port_for(spec)
            root = self.settings.replicas_dir / spec.replica_id
            rep = _Replica(
                spec,
                root,
                port,
                self.netns,
                replica_id=spec.replica_id,
                deployment_id=spec.deployment_id,
                generation=spec.generation,
                started_at=time.time(),
            )
            self._replicas[spec.replica_id] = rep
            self._past.setdefault(spec.deployment_id, []).append(root)
        self._kick.set()  # launched by the monitor now, not at its next tick

    def _port_for(self, spec: ReplicaSpec) -> int:
        if self.netns:
            return spec.server_port
        if spec.kind == ServerKind.MODEL_CLASS:
            return _free_port()
        for other in self._replicas.values():
            if other.port == spec.server_port and not other.stopping:
                raise EngineError(
                    f"server_port {spec.server_port} is already bound by deployment "
                    f"{other.spec.deployment_id} (replica {other.spec.replica_id}); this machine "
                    "does not allow network namespaces to isolate them. Run Kingpost as root "
                    "(or with CAP_SYS_ADMIN), stop the other deployment, or change "
                    "docker_server.server_port",
                    port=spec.server_port,
                )
        return spec.server_port

    def _stopping(self, rep: _Replica) -> None:
        rep.kill_at = time.monotonic() + self.settings.stop_grace_period

    def logs(self, deployment_id: str, tail: int = 200) -> list[LogLine]:
        with self._lock:
            roots = list(self._past.get(deployment_id, []))
        if not roots:
            roots = sorted(
                self.settings.replicas_dir.glob(f"{deployment_id}-*"),
                key=lambda p: p.stat().st_mtime,
            )
        out: list[LogLine] = []
        for root in roots:
            out.extend(LogLine(root.name, t) for t in _tail(root / "output.log", tail))
        return out[-tail:]

    def close(self) -> None:
        with self._lock:
            for rep in self._replicas.values():
                rep.stopping = True
                rep.kill_at = time.monotonic() + self.settings.stop_grace_period
        deadline = time.monotonic() + self.settings.stop_grace_period + 5
        while time.monotonic() < deadline:
            with self._lock:
                if not self._replicas:
                    break
            time.sleep(0.05)
        self._closing.set()
        self._thread.join(timeout=5)
        self._probes.shutdown(wait=False, cancel_futures=True)
        if self._launcher is not None:
            self._launcher.close()
        with contextlib.suppress(OSError):  # empty once every replica's files are gone
            self._secrets_root.rmdir()

    def reload(
        self, replica_id: str, source: Path, changed: Sequence[str], removed: Sequence[str]
    ) -> Reload | None:
        with self._lock:
            rep = self._replicas.get(replica_id)
        if (
            rep is None
            or rep.stopping
            or rep.phase != ReplicaPhase.READY
            or not rep.spec.reloadable
            or (rep.adopted and rep.spec.kind != ServerKind.MODEL_CLASS)  # cannot relaunch
        ):
            return None
        uid = replica_uid(rep.spec.deployment_id) if self.isolate else None
        patch = Patch(rep.app, uid)
        try:
            patch.apply(source, changed, removed)
        except OSError as exc:  # e.g. a link the server planted where a file goes
            patch.undo()
            return Reload(False, f"cannot patch the replica's files: {exc}")
        if rep.spec.kind == ServerKind.MODEL_CLASS:
            endpoint = rep.endpoint
            if endpoint is None:
                patch.undo()
                return None
            result = ask_reload(endpoint, rep.reload_token, self.settings.build_timeout)
        else:
            result = self._restart_on_new_files(rep)
        if not result.ok:
            patch.undo()
            if rep.spec.kind != ServerKind.MODEL_CLASS:
                self._restart_on_new_files(rep)  # back on the old files
        return result

    def _restart_on_new_files(self, rep: _Replica) -> Reload:
        """A custom server: stopped and started again by the monitor, then waited for."""
        mark = rep.log_path.stat().st_size if rep.log_path.exists() else 0
        rep.relaunch = True
        deadline = time.monotonic() + self.settings.build_timeout
        while time.monotonic() < deadline:
            time.sleep(TICK_S)
            if rep.relaunch:
                continue
            if rep.phase == ReplicaPhase.READY:
                return Reload(True)
            if rep.phase == ReplicaPhase.FAILED or rep.stopping or rep.restarts > 0:
                break
        with rep.log_path.open("rb") as f:
            f.seek(mark)
            output = f.read()[-8192:].decode(errors="replace")
        return Reload(False, "the server did not become ready on the new files", output)

    def _relaunch(self, rep: _Replica, now: float) -> None:
        if rep.proc is not None:
            self._signal(rep.proc, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                rep.proc.wait(timeout=10)
            self._forget(rep)
        rep.proc, rep.endpoint, rep.relaunch = None, None, False
        rep.restarts, rep.exits_before_ready, rep.live_fails = 0, 0, 0
        rep.phase, rep.next_start = ReplicaPhase.STARTING, now

    # -- the monitor thread -------------------------------------------------------------------
    def _pause(self, replicas: Sequence[_Replica]) -> None:
        """Until the next tick, sooner while a replica starts (see
        :func:`starting_probe_period`) or when ``start`` kicks."""
        now = time.monotonic()
        soon = [starting_probe_period(r, now) for r in replicas if r.proc and not r.ever_ready]
        self._kick.wait(min([TICK_S, *soon]))
        self._kick.clear()

    def _step(self, rep: _Replica, now: float) -> None:
        if rep.probing:  # its probe round decides, then it is stepped again
            return
        now = time.monotonic()  # a launch before it in this tick may have taken a while
        if rep.stopping:
            self._step_stopping(rep, now)
            return
        if rep.relaunch:  # even a FAILED one: back on the files that served
            self._relaunch(rep, now)
        if rep.phase == ReplicaPhase.FAILED:
            return
        if rep.proc is None:
            if now >= rep.next_start:
                self._launch(rep, now)
            return
        code = rep.proc.poll()
        if code is not None:
            self._exited(rep, code, now)
            return
        if now >= rep.next_probe:
            # Until first ready, probe often: a cold start is served the moment it can be.
            rep.next_probe = now + starting_probe_period(rep, now)
            self._probe(rep, now)

    def _step_stopping(self, rep: _Replica, now: float) -> None:
        """SIGTERM to the replica's whole process group, the grace period to drain, then
        SIGKILL to the group; it is gone only when no process of the group is left (a
        ``start_command`` shell exits at once, the server it started may not)."""
        proc = rep.proc
        if proc is not None:
            proc.poll()  # reap the group leader once it exits
            if _group_alive(proc.pid):
                if rep.phase != ReplicaPhase.STOPPED:
                    self._signal(proc, signal.SIGTERM)
                    rep.phase = ReplicaPhase.STOPPED
                elif now >= rep.kill_at:
                    self._signal(proc, signal.SIGKILL)
                return
        self._cleanup(rep)
        self._forget_replica(rep)

    @staticmethod
    def _signal(
        proc: subprocess.Popen[bytes] | LaunchedProcess | RecordedProcess, sig: int
    ) -> None:
        """Signal the replica's process group (its first process leads a session)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)

    def _exited(self, rep: _Replica, code: int, now: float) -> None:
        # What the first process started may outlive it (a server under an exited
        # shell): nothing of the old group may hold the port when the next one starts.
        if rep.proc is not None:
            self._signal(rep.proc, signal.SIGKILL)
        self._forget(rep)
        rep.proc = None
        if rep.adopted:
            self._drop(rep, f"its server exited (code {code})")
            return
        self._after_exit(rep, now, f"exited with code {code}", lambda: _tail(rep.log_path, 20))

    def _probe(self, rep: _Replica, now: float) -> None:
        """Start a probe round on the probe pool (see :data:`PROBE_WORKERS`)."""
        rep.probing = True

        def run() -> None:
            try:
                self._probe_round(rep, rep.spec.probes, self._restart)
            except Exception:
                log.exception("process engine: probing replica %s", rep.spec.replica_id)
            finally:
                rep.probing = False

        try:
            self._probes.submit(run)
        except RuntimeError:  # the engine is closing
            rep.probing = False

    def _restart(self, rep: _Replica, now: float, why: str) -> None:
        if rep.proc is not None:
            self._signal(rep.proc, signal.SIGKILL)
            rep.proc.wait(timeout=10)
            self._forget(rep)
        rep.proc, rep.endpoint, rep.live_fails = None, None, 0
        if rep.adopted:
            self._drop(rep, why)
            return
        rep.back_off(now, why)

    def _drop(self, rep: _Replica, why: str) -> None:
        """Forget an adopted replica whose server is gone: the controller starts a fresh
        one in its place (this engine lacks its secrets and environment to)."""
        log.warning("process engine: adopted replica %s dropped: %s", rep.replica_id, why)
        rep.phase, rep.message = ReplicaPhase.STOPPED, why
        self._cleanup(rep)
        self._forget_replica(rep)

    def _forget(self, rep: _Replica) -> None:
        """Its server is gone (or going): no record, no namespace handle."""
        remove_record(self._records, rep.replica_id)
        if rep.endpoint is not None and rep.endpoint.netns:
            forget_netns(rep.endpoint.netns)

    def _record(self, rep: _Replica, proc: subprocess.Popen[bytes] | LaunchedProcess) -> None:
        """Write down what the next control plane needs to adopt ``rep`` after a crash."""
        record = ReplicaRecord.of(
            rep.spec, proc.pid, rep.port, rep.netns, rep.started_at, rep.reload_token
        )
        try:
            write_record(self._records, record)
        except OSError as exc:  # it serves; a crash would only not leave it adopted
            log.warning("process engine: cannot record replica %s: %s", rep.replica_id, exc)

    # -- launching -----------------------------------------------------------------------------
    def _launch(self, rep: _Replica, now: float) -> None:
        if rep.adopted:  # nothing to start it again from
            self._drop(rep, "its server is gone")
            return
        spec = rep.spec
        uid = replica_uid(spec.deployment_id) if self.isolate else None
        if spec.kind != ServerKind.MODEL_CLASS and not rep.netns and _port_taken(rep.port):
            # Another process listens there: launched, the server could not bind, and the
            # probes would take that process's answers for its own (and route to it).
            rep.message = (
                f"waiting for port {rep.port} (docker_server.server_port): another process "
                "on this machine listens on it. Stop that process, or give this server "
                "another port; with network namespaces (root, KINGPOST_NETNS) each replica "
                "has its own"
            )
            rep.next_start = now + PORT_RETRY_S
            return
        if not rep.app.exists():
            rep.root.mkdir(parents=True, exist_ok=True)
            shutil.copytree(spec.app_dir, rep.app, symlinks=True)
            _chown_tree(rep.app, uid)
            try:
                _link_app_weights(rep.app, spec)  # after the chown, which must not reach them
            except EngineError as exc:
                rep.phase, rep.message = ReplicaPhase.FAILED, exc.message
                return
        for own in ("home", "tmp") if uid is not None else ("home",):
            if not (rep.root / own).exists():
                (rep.root / own).mkdir()
                _chown_tree(rep.root / own, uid)
        secrets_dir = self._write_secrets(rep, uid)
        binds = self._binds(rep, secrets_dir)
        env = self._environment(rep, secrets_dir, binds)
        launcher = self._launcher if (rep.netns or binds or uid is not None) else None
        try:
            command = self._command(rep, secrets_dir, binds)
        except EngineError as exc:  # never launchable: FAILED, not retried every tick
            rep.phase, rep.message = ReplicaPhase.FAILED, exc.message
            return
        isolation = Isolation(rep.netns, binds)
        if uid is not None:
            view = self._view(rep, env)
            isolation = Isolation(
                rep.netns,
                binds,
                masks=(*view.masks, "/dev/shm"),
                keep=view.keep,
                private_tmp=str(rep.root / "tmp") if _tmp_is_free(view, binds) else None,
                cwd=str(rep.app),
                uid=uid,
                nproc=self.settings.process_pids_limit or None,
            )
        # A model server outside a namespace of its own serves on a socket bound here, so
        # no other process (another home's replica, anything) can take its port between
        # the choice and the bind: its probes would then reach that process instead.
        listen = None
        if spec.kind == ServerKind.MODEL_CLASS and not rep.netns:
            listen = _listening_socket()
            rep.port = int(listen.getsockname()[1])
            # In the child it is descriptor 3 (launcher) or keeps its number (Popen).
            fd = 3 if launcher is not None else listen.fileno()
            command = self._command(rep, secrets_dir, binds, fd)
        with rep.log_path.open("ab") as out:
            out.write(f"--- kingpost: starting replica {spec.replica_id} ---\n".encode())
            out.flush()
            try:
                if launcher is not None:
                    argv = ["/bin/sh", "-c", command] if isinstance(command, str) else command
                    rep.proc = launcher.spawn(
                        argv,
                        cwd=str(rep.app),
                        env=env,
                        output=out.fileno(),
                        isolation=isolation,
                        listen=None if listen is None else listen.fileno(),
                    )
                else:  # nothing between fork and exec but a session: Popen can vfork
                    rep.proc = subprocess.Popen(
                        command,
                        shell=isinstance(command, str),
                        cwd=rep.app,
                        env=env,
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                        pass_fds=() if listen is None else (listen.fileno(),),
                    )
            except (OSError, subprocess.SubprocessError) as exc:
                rep.phase, rep.message = ReplicaPhase.FAILED, f"cannot start the server: {exc}"
                return
            finally:
                if listen is not None:
                    listen.close()  # the server holds its own copy now
        self._record(rep, rep.proc)
        netns = f"/proc/{rep.proc.pid}/ns/net" if rep.netns else None
        rep.endpoint = Endpoint("127.0.0.1", rep.port, netns)
        rep.launched, rep.next_probe = now, now + min(STARTING_PROBE_S, spec.probes.period_s)
        rep.phase, rep.ready_fails = ReplicaPhase.STARTING, 0

    def _command(
        self,
        rep: _Replica,
        secrets_dir: Path,
        binds: tuple[tuple[str, str], ...],
        listen_fd: int | None = None,
    ) -> str | list[str]:
        spec = rep.spec
        if spec.kind == ServerKind.MODEL_CLASS:
            secrets_path = (
                SECRETS_MOUNT if binds and binds[0][1] == SECRETS_MOUNT else str(secrets_dir)
            )
            return [
                spec.python_executable or sys.executable,
                *SERVER_ARGS,
                "--app-dir",
                str(rep.app),
                "--host",
                "127.0.0.1",
                "--port",
                str(rep.port),
                "--secrets-dir",
                secrets_path,
                *(["--listen-fd", str(listen_fd)] if listen_fd is not None else []),
            ]
        if not spec.command:
            raise EngineError("the process engine needs docker_server.start_command")
        return spec.command

    def _environment(
        self, rep: _Replica, secrets_dir: Path, binds: tuple[tuple[str, str], ...]
    ) -> dict[str, str]:
        spec = rep.spec
        inherited = {
            k: v
            for k, v in os.environ.items()
            if k in ("PATH", "LANG", "LC_ALL", "TZ", "SSL_CERT_FILE", "SSL_CERT_DIR", "TMPDIR")
        }
        venv: dict[str, str] = {}
        if spec.kind == ServerKind.MODEL_CLASS or spec.python_executable:
            # The environment's console scripts come first, as in Truss's image; a custom
            # server without one (no requirements) keeps this machine's PATH.
            env_bin = os.path.dirname(spec.python_executable or sys.executable)
            inherited["PATH"] = os.pathsep.join([env_bin, inherited.get("PATH", os.defpath)])
            if spec.kind == ServerKind.CUSTOM_SERVER:
                venv["VIRTUAL_ENV"] = os.path.dirname(env_bin)
        mounted = {target for _, target in binds}
        return {
            **inherited,
            **venv,
            **spec.env,
            "APP_HOME": str(rep.app),
            "HOME": str(rep.root / "home"),
            "PYTHON_EXECUTABLE": spec.python_executable or sys.executable,
            "BT_MODEL_ID": spec.model_id,
            "BT_MODEL_DEPLOYMENT_ID": spec.deployment_id,
            "KINGPOST_SECRETS_DIR": SECRETS_MOUNT if SECRETS_MOUNT in mounted else str(secrets_dir),
            "PYTHONUNBUFFERED": "1",
            **({RELOAD_TOKEN_ENV: rep.reload_token} if spec.reloadable else {}),
            **gpu_environment(spec.gpus),
            **(
                {DYNAMIC_CONFIG_ENV: str(spec.dynamic_config_dir)}
                if spec.dynamic_config_dir is not None
                else {}
            ),
        }

    def _view(self, rep: _Replica, env: dict[str, str]) -> View:
        """What an isolated replica sees (``engines/_view.py``): its own tree, and
        read-only what it runs from and its weights."""
        import kingpost

        spec = rep.spec
        python = Path(spec.python_executable or sys.executable)
        read_only = [
            python.parent.parent,  # its environment (a venv: bin/python)
            Path(kingpost.__file__).resolve().parent.parent,  # the model server's package
            self.settings.envs_dir / "_kingpost",  # environments' links to that package
            self._model_env_policy().base_dir_for(self.settings.envs_dir),  # layered envs' base
            python.parent.parent.parent / "_kingpost",  # those of an env built elsewhere
            *(Path(d) for d in env.get("PATH", "").split(os.pathsep) if d),
        ]
        if spec.dynamic_config_dir is not None:
            read_only.append(spec.dynamic_config_dir)
        # Its own weight trees at their own paths too: the links `_link_app_weights` puts in
        # its app directory (model_cache, external_data under /app/) lead there.
        # A single file (external_data) comes with its manifest's tree, its directory.
        read_only += [w.source_dir if w.source_dir.is_dir() else w.source_dir.parent
                      for w in spec.weights]  # fmt: skip
        installs = {Path(sys.prefix), Path(sys.base_prefix), python.resolve().parent.parent}
        return plan_view(self.settings.home, rep.root, read_only, sorted(installs))

    def _write_secrets(self, rep: _Replica, uid: int | None = None) -> Path:
        """Secret files on tmpfs (/dev/shm): dir 0500, files 0400 (owned by the replica's
        uid when it has its own), removed at stop."""
        path = self._secrets_root / rep.spec.replica_id
        if path.exists():
            return path
        return write_secrets(path, rep.spec.secrets, uid)

    def _binds(self, rep: _Replica, secrets_dir: Path) -> tuple[tuple[str, str], ...]:
        """Read-only bind mounts: secrets at /secrets, weights at their mount_location."""
        if not self.mounts:
            return ()
        binds: list[tuple[str, str]] = []
        for source, target in [(str(secrets_dir), SECRETS_MOUNT)] + [
            # One file (external_data) is read from the app directory's data/ (linked at
            # launch), which is where the process engine has the data directory.
            (str(w.source_dir), w.mount_location)
            for w in rep.spec.weights
            if not w.source_dir.is_file()
        ]:
            try:
                Path(target).mkdir(parents=True, exist_ok=True)
            except OSError:
                continue  # cannot create the mount point: the env var / path fallback is used
            binds.append((source, target))
        return tuple(binds)

    def _cleanup(self, rep: _Replica) -> None:
        self._forget(rep)
        remove_secrets(self._secrets_root / rep.spec.replica_id)


def _link_app_weights(app: Path, spec: ReplicaSpec) -> None:
    """Link weights mounted under ``/app/`` into the replica's own app directory.

    In a container the project is ``/app`` (its data directory ``/app/data``), so a model
    reads ``model_cache`` and ``external_data`` files there; here the project is ``app``,
    the working directory and ``APP_HOME``, so the same relative paths (``data_dir``,
    ``model_cache/NAME``) lead to the mirrored, read-only files. A file the project has
    at such a path is replaced in this copy, as Truss's download and the docker engine's
    mount replace it; a directory is kept.

    This runs as root on the host, over a tree the project's files (links included)
    made: a path that leaves ``app`` (a ``data_dir`` of ``..``, from a config stored
    before the rule) or a link on the way to it is refused with an :class:`EngineError`
    naming it, never followed.
    """
    data_dir = (spec.config.data_dir if spec.config is not None else "data").strip("/")
    for w in spec.weights:
        rel = app_link_path(w.mount_location, data_dir)
        if rel is None:
            continue
        if rel == "" or rel == ".." or rel.startswith("../"):
            raise EngineError(
                f"weights mounted at {w.mount_location} would be linked at {rel or '.'} "
                f"(data_dir {data_dir!r}), outside the replica's copy of the project; "
                "set data_dir to a folder inside the project"
            )
        try:
            found = open_parent(app, rel, create=True, uid=None)
            assert found is not None  # created where missing
            fd, name = found
            try:
                try:
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    st = None
                if st is not None and S_ISDIR(st.st_mode):
                    continue
                if st is not None:
                    os.unlink(name, dir_fd=fd)  # the link itself, never what it names
                os.symlink(w.source_dir, name, dir_fd=fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise EngineError(
                f"cannot link the weights mounted at {w.mount_location} into the replica's "
                f"project at {rel}: {exc}; a link in the project on the way is not followed"
            ) from exc


def app_link_path(mount_location: str, data_dir: str) -> str | None:
    """Where, relative to a replica's app directory, the process engine links weights
    mounted at ``mount_location`` (``None``: not under ``/app/``): ``/app/data/...``
    lands in the config's ``data_dir``, as a container's data directory is ``/app/data``.
    Normalised, so a path that leaves the app directory starts with ``..``."""
    location = posixpath.normpath(mount_location)
    if not location.startswith("/app/"):
        return None
    rel = location.removeprefix("/app/")
    if rel == "data" or rel.startswith("data/"):
        rel = posixpath.join(data_dir or "data", rel.removeprefix("data").lstrip("/"))
    rel = posixpath.normpath(rel)
    return "" if rel == "." else rel
