"""The engine seam: what starts, watches and stops replicas.

The controller talks to engines only through :class:`Engine`; it never imports
subprocess or docker. An engine owns everything engine-specific (processes,
containers, namespaces, probes, restarts with backoff, log capture) and reports
what it sees through a non-blocking :meth:`Engine.poll`.

Contract:
- ``start`` returns quickly; slow work (building, starting, probing) happens in
  the engine's own threads. Errors that are known at once (a port another
  deployment holds, an unknown user) raise :class:`~kingpost.errors.EngineError`.
- ``poll`` never blocks on I/O. It lists every replica the engine knows of,
  including ones that failed, until ``stop`` has removed them.
- Readiness failures take a replica out of traffic (phase ``NOT_READY``), never
  restart it. Liveness failures past the threshold, and exits, restart it with
  exponential backoff; a replica that keeps crashing before it ever became ready
  ends ``FAILED`` with the last lines of its output in ``message``.
- ``stop`` is idempotent.
"""

from __future__ import annotations

import enum
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from kingpost.config import TrussConfig

__all__ = [
    "BuildLog",
    "Endpoint",
    "Engine",
    "LogLine",
    "Prepared",
    "Probes",
    "Reload",
    "ReplicaPhase",
    "ReplicaSpec",
    "ReplicaStatus",
    "ServerKind",
    "WeightMount",
    "gpu_environment",
    "scope_of",
]


def scope_of(home: Path) -> str:
    """A short stable id of one Kingpost installation (its home directory)."""
    return hashlib.sha256(str(home.resolve()).encode()).hexdigest()[:12]


def gpu_environment(gpus: tuple[str, ...] | None) -> dict[str, str]:
    """What tells CUDA (and NVIDIA's container tools) which devices a replica may use:
    the UUIDs placement gave it, nothing at all (``()``: every GPU hidden), or, for
    ``None``, no variable (a host without GPUs, a replica that asked for none)."""
    if gpus is None:
        return {}
    return {
        "CUDA_VISIBLE_DEVICES": ",".join(gpus),
        "NVIDIA_VISIBLE_DEVICES": ",".join(gpus) if gpus else "none",
    }


class ServerKind(enum.StrEnum):
    CUSTOM_SERVER = "custom_server"  # docker_server: the user's own command and port
    MODEL_CLASS = "model_class"  # model/model.py run by kingpost.server


class ReplicaPhase(enum.StrEnum):
    STARTING = "starting"  # launched; readiness has not passed yet
    READY = "ready"  # readiness passes: receives traffic
    NOT_READY = "not_ready"  # was ready, readiness now failing: no traffic, not restarted
    RESTARTING = "restarting"  # exited or failed liveness; waiting out its backoff
    FAILED = "failed"  # gave up (crash loop, cannot start); message says why
    STOPPED = "stopped"  # stopped on request


@dataclass(frozen=True)
class Probes:
    """Health checks the engine runs against a replica."""

    readiness_path: str = "/"
    liveness_path: str = "/"
    initial_delay_s: float = 0.0
    period_s: float = 1.0
    timeout_s: float = 2.0
    readiness_failure_threshold: int = 3
    liveness_failure_threshold: int = 30
    """Consecutive liveness failures (after the replica was once ready) before a restart."""
    startup_timeout_s: float = 1800.0
    """A replica never ready after this long is restarted."""


@dataclass(frozen=True)
class WeightMount:
    """A mirrored weights tree to expose read-only at ``mount_location``."""

    mount_location: str
    source_dir: Path


@dataclass(frozen=True)
class ReplicaSpec:
    """Everything an engine needs to run one replica of a deployment."""

    replica_id: str
    deployment_id: str
    model_id: str
    kind: ServerKind
    app_dir: Path
    """The unpacked project (read-only source); engines copy it, never write to it."""
    server_port: int
    """The port the server binds inside its namespace or container."""
    predict_path: str
    probes: Probes
    command: str | None = None
    """Shell command of a custom server; ``None`` for model-class projects, or an
    image's own entrypoint with ``no_build``."""
    env: Mapping[str, str] = field(default_factory=dict)
    """The config's variables with reserved names already dropped."""
    secrets: Mapping[str, str] = field(default_factory=dict)
    weights: tuple[WeightMount, ...] = ()
    run_as_user_id: int | None = None
    python_executable: str | None = None
    """Interpreter of a model-class deployment's environment (default: this one)."""
    image: str | None = None
    """The image an engine that runs containers built for this deployment."""
    config: TrussConfig | None = None
    """The whole parsed config, for engines that build images from it."""
    model_name: str = ""
    dynamic_config_dir: Path | None = None
    """The deployment's directory of values that change while it runs (its environment);
    the engine shows it to the replica read-only (``kingpost.server.contract``)."""
    reloadable: bool = False
    """A development deployment's replica: the engine may patch its files and reload it in
    place (:meth:`Engine.reload`)."""
    generation: int = 0
    """The deployment's activation this replica was started for: the controller replaces
    failed replicas of an older one (the user re-activated after a failure), and rollouts
    tell old replicas from new ones by it. Engines report it back in
    :attr:`ReplicaStatus.generation`."""
    gpus: tuple[str, ...] | None = None
    """The device UUIDs placement gave this replica (``gpus/placement.py``); ``()``: none,
    so the engine hides every GPU from it; ``None``: the host has no GPU and none was
    asked for, so the engine leaves the environment alone."""


@dataclass(frozen=True)
class Endpoint:
    """How to reach a replica's server over TCP.

    ``netns`` names a network namespace file (e.g. ``/proc/PID/ns/net``); when set,
    the connection must be opened from inside that namespace.
    """

    host: str
    port: int
    netns: str | None = None


@dataclass(frozen=True)
class ReplicaStatus:
    replica_id: str
    deployment_id: str
    phase: ReplicaPhase
    endpoint: Endpoint | None = None
    restarts: int = 0
    message: str = ""
    started_at: float = 0.0
    generation: int = 0
    """:attr:`ReplicaSpec.generation` of the spec it was started from."""


BuildLog = Callable[[str], None]
"""Receives build output line by line (shown by ``kingpost logs``)."""


@dataclass(frozen=True)
class Prepared:
    """What :meth:`Engine.prepare` made for a deployment, carried into its replica specs."""

    python_executable: str | None = None
    image: str | None = None


@dataclass(frozen=True)
class LogLine:
    replica_id: str
    text: str


@dataclass(frozen=True)
class Reload:
    """How an in-place reload went."""

    ok: bool
    error: str = ""
    traceback: str = ""
    """The model's traceback, or the last lines of a custom server's output."""


class Engine(ABC):
    """Starts, watches and stops replicas. See the module docstring."""

    name: ClassVar[str]
    keeps_replicas: ClassVar[bool] = False
    """Whether :meth:`close` leaves replicas running for the next control plane to adopt."""

    def kept_replicas_hint(self) -> str:
        """For an engine that keeps replicas: how an operator removes them by hand."""
        return ""

    on_ready: Callable[[], None] | None = None
    """Called (from an engine thread) when a replica becomes ready, so the controller
    routes to it now rather than at its next tick; it must return at once."""

    def prepare(self, config: TrussConfig, app_dir: Path, log: BuildLog) -> Prepared:
        """Build what every replica of a deployment needs (an environment, an image).

        Runs on a preparation thread, may take minutes, must be idempotent and cheap
        the second time; raises :class:`~kingpost.errors.BuildError` on failure."""
        return Prepared()

    def environment_hash(self, config: TrussConfig, app_dir: Path) -> str | None:
        """Which Python environment under ``{home}/envs`` :meth:`prepare` uses for this
        project (its hash), if any, without building it; what `kingpost venvs gc` keeps."""
        return None

    def swap_inputs(self, config: TrussConfig, app_dir: Path) -> str | None:
        """A fingerprint of what a replica is prepared from besides config.yaml's keys: a
        development deployment whose new project changes it gets a new replica (a swap),
        not a reload in place. The Python environment's hash unless the engine says more
        precisely (the docker engine: its requirements file)."""
        return self.environment_hash(config, app_dir)

    @abstractmethod
    def start(self, spec: ReplicaSpec) -> None: ...

    @abstractmethod
    def poll(self) -> list[ReplicaStatus]: ...

    @abstractmethod
    def stop(self, replica_id: str) -> None: ...

    def reload(
        self, replica_id: str, source: Path, changed: Sequence[str], removed: Sequence[str]
    ) -> Reload | None:
        """Patch a running, ready, ``reloadable`` replica's files from ``source`` (the new
        project: ``changed`` files copied, ``removed`` ones deleted) and reload it in place:
        a model class re-imports and ``load()``s, a custom server restarts on the new files.
        A failed reload puts the old files back, and the replica serves the old code.
        ``None``: this engine (or this replica's state) cannot, so the caller starts a new
        replica instead. Blocks until the reload is done."""
        return None

    def cluster(self) -> list[dict[str, Any]] | None:
        """For an engine that runs replicas on many machines: its nodes (``address``,
        ``alive``, ``resources``, the ``replicas`` on each); ``None`` for one machine."""
        return None

    @abstractmethod
    def logs(self, deployment_id: str, tail: int = 200) -> list[LogLine]:
        """Recent output of a deployment's replicas, current and past, oldest first."""

    @abstractmethod
    def close(self) -> None:
        """Release the engine (a clean stop of the control plane): engines that do not
        keep replicas (process) stop them, those that do (docker) leave them running for
        the next control plane to adopt. Either may adopt after a crash."""
