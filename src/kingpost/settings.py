"""Settings: loaded once into one immutable object, ``KINGPOST_`` prefix."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings"]


def _default_home() -> Path:
    return Path.home() / ".kingpost"


class Settings(BaseSettings):
    """Everything configurable about a Kingpost control plane and gateway."""

    model_config = SettingsConfigDict(env_prefix="KINGPOST_", frozen=True, extra="ignore")

    home: Path = Field(default_factory=_default_home)
    """Root of all state: database, uploads, replica work dirs, logs, keys."""
    database_url: str | None = None
    """SQLAlchemy URL; defaults to SQLite at ``{home}/kingpost.db``."""
    api_host: str = "127.0.0.1"
    api_port: int = 8090
    console_session_ttl: float = Field(default=43200.0, gt=0)
    """Seconds a web console sign-in lasts (default 12 hours); then the console asks for
    the API key again. Signing out ends it at once."""
    metrics_listen: str | None = None
    """``HOST:PORT`` where ``kingpost server`` also serves ``/metrics`` with no API key (for
    a Prometheus on a private network); ``/metrics`` on the API port always needs an admin
    key."""
    gateway_metrics_listen: str | None = None
    """``HOST:PORT`` where the gateway serves its own ``/metrics`` (every worker's figures
    merged), with no API key; it keeps answering while no control plane runs."""
    gateway_host: str = "127.0.0.1"
    gateway_port: int = 8080
    gateway_workers: int = 1
    gateway_response_timeout: float = Field(default=600.0, gt=0)
    """Seconds a replica may take to begin its answer before the gateway answers 504 (set
    per deployment in the routing table; every deployment gets this one today)."""
    gateway_hold_timeout: float = Field(default=60.0, gt=0)
    """Seconds a request waits for a deployment with no ready replica (scaled to zero,
    waking) before a 503 ``unavailable`` with ``Retry-After``."""
    gateway_orphan_timeout: float = Field(default=3600.0, ge=0)
    """Seconds the gateway keeps serving its last routing table after its control plane
    died (no table pushed for that long) before it exits; 0: until stopped, else at least
    10 (a live control plane pushes every 5 s). The next ``kingpost server`` adopts a
    gateway still running (``gateway_process.py``)."""

    @field_validator("gateway_orphan_timeout")
    @classmethod
    def _orphan_timeout_above_pushes(cls, value: float) -> float:
        if 0 < value < 10:
            raise ValueError(
                f"KINGPOST_GATEWAY_ORPHAN_TIMEOUT must be 0 (never) or at least 10 seconds, "
                f"since the control plane pushes the gateway a table every 5 s; got {value}"
            )
        return value

    gateway_queue_limit: int = Field(default=1000, ge=1)
    """Requests that may wait per deployment (for a slot, or for a replica to wake) before
    a 429 ``overloaded`` with ``Retry-After``."""
    domain: str = "localhost"
    """Gateway host names are ``model-{id}.{domain}``."""
    engine: str = "process"
    """Default engine for new deployments: ``process``, ``docker`` or ``ray``."""
    ray_address: str = "auto"
    """Ray engine: the cluster to join: ``auto`` (a Ray node on this machine), the head's
    ``host:port`` (with a Ray node on this machine for the driver), or ``ray://host:port``
    (Ray Client, which needs ``ray[client]``)."""
    ray_node_dir: Path = Path("/var/tmp/kingpost-ray")
    """Ray engine: where each node keeps its cached projects, environments and replicas
    (``{ray_node_dir}/{scope}/{node}/``), on the node's own disk."""
    ray_node_cache_keep: float = Field(default=3600.0, ge=0)
    """Ray engine: seconds a node keeps a project, Python environment or weights that no
    replica on it uses any more (a deployment woken from zero meanwhile prepares nothing);
    collected when a replica on the node starts or stops."""
    secret_key: str | None = None
    """Fernet key for secrets at rest; else read from ``{home}/secret.key`` (0600)."""
    reconcile_interval: float = 0.5
    build_timeout: float = Field(default=1800.0, gt=0)
    """Seconds a deployment's build (its Python environment or image) may take; one
    still running then is stopped (its installer killed) and ends BUILD_FAILED."""
    weights_mirror_attempts: int = Field(default=3, ge=1)
    """Times a deployment's weights mirror is tried (5 s, then 20 s apart) before the
    deployment is FAILED with the source's error; re-activating it tries again."""
    weights_allow_private_urls: bool = False
    """Let the weights mirror fetch URLs a config or secret names (``https://`` weights,
    ``external_data``, a service-account key's ``token_uri``) from loopback, link-local,
    private and reserved addresses. Off: the control plane, on the host network, would
    fetch for a replica what the replica itself cannot reach (a metadata service, this
    machine's own ports). Endpoints set in the control plane's environment (``HF_ENDPOINT``,
    ``KINGPOST_S3_ENDPOINT_URL``, ``STORAGE_EMULATOR_HOST``) are trusted either way."""
    process_pids_limit: int = Field(default=4096, ge=0)
    """Process engine, isolated replicas: the most processes and threads one deployment's
    uid may run (``RLIMIT_NPROC``), so a fork loop cannot exhaust the host's PIDs; servers
    such as vLLM start hundreds of threads, hence the headroom. 0: no limit."""
    disk_gc_interval: float = Field(default=3600.0, ge=0)
    """Seconds between automatic removals of uploaded projects and replica directories no
    deployment needs (``kingpost gc`` runs one at once); 0 turns the automatic ones off."""
    api_key: str | None = None
    """Client side: the key the CLI sends; else read from ``{home}/credentials``."""
    api_url: str | None = None
    """Client side: control plane URL; else ``http://{api_host}:{api_port}``."""
    stop_replicas_on_exit: bool = False
    """Stop every replica when the server stops, also those an engine could leave running
    for the next server to adopt (docker containers); ``kingpost server
    --stop-replicas-on-exit``."""
    stop_grace_period: float = Field(default=5.0, ge=0)
    """Process engine: seconds a stopping replica's process group has to drain after
    SIGTERM before the whole group is SIGKILLed."""
    isolation: str = "auto"
    """Process engine, as root on Linux: replicas run as an unprivileged uid per deployment
    in a mount namespace that hides the home (``engines/_view.py``): ``auto`` (when
    permitted), ``on`` (refuse to start without), ``off``."""
    netns: str = "auto"
    """Process engine network isolation: ``auto`` (when permitted), ``on``, ``off``."""
    docker_network: str = ""
    """Docker engine: the bridge network replicas join; empty (the default) names it per
    installation, ``kingpost-{scope}`` (a hash of ``home``). It is created when missing,
    with traffic between its containers dropped; a named network that allows it is refused."""
    docker_pids_limit: int = Field(default=4096, gt=0)
    """Docker engine: most processes and threads one replica's container may hold."""
    docker_tmp_size_mb: int = Field(default=1024, gt=0)
    """Docker engine: size of each replica's tmpfs paths (``/tmp``, and for ``no_build``
    images ``$HOME``, ``/workspace`` and ``/packages``); counts toward its memory limit."""
    docker_volume_size_mb: int = Field(default=10240, gt=0)
    """Docker engine: size of each writable volume (``/app``, ``/workspace``, ``$HOME``,
    ``/packages`` of built images), where the Docker Engine supports volume quotas
    (``local`` volumes on XFS with ``pquota``); elsewhere they are unbounded, and the
    engine says so when it starts."""
    accelerators: Literal["enforce", "ignore"] = "enforce"
    """``enforce``: a config's ``resources.accelerator`` is placed on devices of that kind,
    and a push asking for a kind (or count) this host lacks is refused. ``ignore`` (laptops):
    such a config runs on CPU instead, with a warning on every push."""
    accelerator_names: dict[str, str | list[str]] = Field(default_factory=dict)
    """Your own accelerator kinds, as JSON: kind -> the NVML device name(s) it means, e.g.
    ``{"MYCARD": "NVIDIA GeForce RTX 4090"}`` (``kingpost gpus`` shows the names)."""
    gpu_sharing: bool = False
    """Opt-in: let replicas share devices (placement picks the least-held ones); by
    default no two live replicas get the same device."""
    fake_gpus: Path | None = None
    """FOR TESTS ONLY: a JSON file read as the host's GPU inventory instead of NVML
    (``gpus/inventory.py``'s ``read_fake``), so tests can place replicas without a GPU."""

    log_max_bytes: int = Field(default=256 * 1024 * 1024, ge=1024 * 1024)
    """The log store's bound in bytes (replica and build output, access lines): the oldest
    segments go past it."""
    log_max_age: float = Field(default=7 * 86400.0, gt=0)
    """Seconds a log line is kept at most."""
    log_access: bool = True
    """The gateway keeps one access line per request in the log store (a few microseconds
    of CPU per request); false: replica and build output only."""

    @cached_property
    def logs_dir(self) -> Path:
        """The log store's segments (``logstore/``)."""
        return self.home / "logs"

    @field_validator("metrics_listen", "gateway_metrics_listen")
    @classmethod
    def _check_metrics_listen(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None:
            from kingpost.metrics.listen import parse_listen

            # its ValueError names the setting, the rule and the value
            parse_listen(value, f"KINGPOST_{str(info.field_name).upper()}")
        return value

    model_env: Literal["truss-base", "server-python", "minimal"] = "truss-base"
    """Process engine: what a model class runs in. ``truss-base``: a venv of its
    requirements layered on a shared, pre-built environment of Truss's server packages
    (``kingpost envs base`` builds it ahead). ``server-python``: this server's interpreter
    and its packages, installing nothing (hosts without a package index; the build fails
    naming each requirement it does not satisfy). ``minimal``: a venv of its requirements
    and the model server's four packages, none at all without requirements (what Kingpost did
    before the base environment)."""
    base_envs_dir: Path | None = None
    """Where base environments are built (content-addressed, safe to share between homes
    and users of one machine); default ``{home}/envs/_base``, which `venvs gc` collects."""
    truss_version: str | None = None
    """The Truss version whose server packages a project without `truss_version` in its
    config.yaml gets (``0.9`` ... ``0.18``); default: the newest Kingpost knows."""

    async_payload_limit: int = Field(default=256 * 1024, ge=1024)
    """Largest ``/async_predict`` body in bytes (Baseten's 256 KiB); past it: 413."""
    async_webhook_allow_http: bool = False
    """Allow ``http://`` webhook endpoints (loopback receivers, private networks); by
    default only ``https://``."""
    async_share: float = Field(default=0.5, gt=0, le=1)
    """Share of a deployment's predict slots (replicas x ``predict_concurrency``) async
    work may take at once, at least one; the rest stays free for sync predicts."""
    async_result_retention: float = Field(default=7 * 24 * 3600.0, gt=0)
    """Seconds a finished async request (its result or error) stays readable."""
    async_webhook_attempts: int = Field(default=5, ge=1)
    """Delivery attempts per webhook before the request is WEBHOOK_FAILED."""
    async_webhook_initial_delay: float = Field(default=1.0, ge=0)
    """Seconds before the second delivery attempt, doubled per attempt (at most 60)."""
    async_counts_refresh: float = Field(default=1.0, ge=0)
    """Seconds a queue status may show old counts of *finished* requests once the
    deployment keeps 10,000 or more (counting them reads every one: 15 ms at 100,000);
    each gateway process counts them again after that. 0: counted on every read. Queued
    and in-progress counts are always read."""
    async_journal_sync: bool = False
    """``fdatasync`` the gateway's accept journal once per group of accepts, so an
    accepted request outlives a power cut while it waits there (worth it with PostgreSQL,
    whose commits are synced; SQLite runs ``synchronous=NORMAL``). Off: an accept outlives
    a kill -9 of any Kingpost process (the kernel holds the write), not a power cut."""

    @cached_property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'kingpost.db'}"

    @cached_property
    def client_url(self) -> str:
        return self.api_url or f"http://{self.api_host}:{self.api_port}"

    @cached_property
    def gateway_url(self) -> str:
        return f"http://{self.gateway_host}:{self.gateway_port}"

    @cached_property
    def gateway_local_url(self) -> str:
        """The gateway as this machine reaches it: a wildcard listen address is not one to
        connect to, so its loopback (``::1`` for ``::``, which a socket bound there takes
        whether or not it also takes IPv4)."""
        host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(
            self.gateway_host, self.gateway_host
        )
        return f"http://{f'[{host}]' if ':' in host else host}:{self.gateway_port}"

    @cached_property
    def run_dir(self) -> Path:
        """Sockets and pid files."""
        return self.home / "run"

    @cached_property
    def projects_dir(self) -> Path:
        """Uploaded projects, unpacked, one directory per content hash."""
        return self.home / "projects"

    @cached_property
    def replicas_dir(self) -> Path:
        """Per-replica working copies and logs."""
        return self.home / "replicas"

    @cached_property
    def weights_dir(self) -> Path:
        """Blob store, manifests and mount trees of the weights cache."""
        return self.home / "weights"

    @cached_property
    def dynamic_dir(self) -> Path:
        """Per-deployment files replicas read while they run (the environment they serve)."""
        return self.home / "dynamic"

    @cached_property
    def builds_dir(self) -> Path:
        """Build logs, one file per deployment, kept until the deployment is deleted."""
        return self.home / "builds"

    @cached_property
    def envs_dir(self) -> Path:
        """Python environments of deployments (model classes, custom servers), by input hash."""
        return self.home / "envs"
