"""The docker engine: every replica is a container on a real Docker Engine.

``prepare`` builds the deployment's image (:mod:`kingpost.images`, tagged by a
hash of its inputs, so an unchanged project never rebuilds). ``start`` creates
one container per replica on this installation's bridge network; the gateway and
the probes reach it at its address on that network, so any number of replicas
bind the same ``server_port`` with no host port involved. The network drops
traffic between its containers (``enable_icc=false``): a replica is reachable
from the host (the gateway) only, never from another model's replica, which
would skip the gateway's API keys. It is removed when its last replica goes.

Every container runs as an unprivileged user (``run_as_user_id``, else a UID of
its deployment's own, ``no_build`` images too) with no capabilities,
``no-new-privileges``, a pids limit and a read-only root filesystem; only the
writable paths of the image layout (:func:`writable_mounts`) and ``/tmp`` can be
written, each bounded in size where the Docker Engine can bound it.

Containers carry labels naming the replica, the deployment and the Kingpost
home they belong to (``kingpost.scope``). A control plane that starts again
lists its running containers and adopts them instead of starting duplicates;
``close`` therefore leaves containers running. Containers that stopped while no
control plane watched are removed (their logs saved), and the controller starts
fresh replicas in their place.

Health, restarts and backoff follow the process engine: readiness takes a
replica out of traffic, liveness failures and exits restart it (``docker
start`` of the same container, or a new container when it was removed), and a
replica that keeps exiting before it was ever ready ends FAILED with its last
lines of output. Blocking Docker calls (create, start, stop, remove) run on a
small pool so one slow container never stalls the monitor.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import posixpath
import secrets
import threading
import time
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from kingpost.engines._core import ReplicaEngine, Tracked
from kingpost.engines._reload import Patch, ask_reload
from kingpost.engines._secrets import private_dir, remove_secrets, tmpfs, write_secrets
from kingpost.engines.base import (
    BuildLog,
    Endpoint,
    LogLine,
    Prepared,
    Probes,
    Reload,
    ReplicaPhase,
    ReplicaSpec,
    ServerKind,
    scope_of,
)
from kingpost.engines.probes import STARTING_PROBE_S, http_probe
from kingpost.errors import EngineError
from kingpost.server.contract import (
    DYNAMIC_CONFIG_ENV,
    DYNAMIC_CONFIG_MOUNT,
    RELOAD_TOKEN_ENV,
    SERVER_ARGS,
)

if TYPE_CHECKING:
    from docker import DockerClient

    from kingpost.config import TrussConfig
    from kingpost.settings import Settings

__all__ = [
    "ContainerLimits",
    "DockerEngine",
    "container_options",
    "deployment_uid",
    "device_requests",
    "docker_mounts",
    "network_name",
    "requirements_fingerprint",
    "scope_of",
    "writable_mounts",
]

log = logging.getLogger(__name__)

TICK_S = 0.2
STOP_GRACE_S = 5
SECRETS_MOUNT = "/secrets"
APP_DIR = "/app"

LABEL_SCOPE = "kingpost.scope"
LABEL_REPLICA = "kingpost.replica"
LABEL_DEPLOYMENT = "kingpost.deployment"
LABEL_GENERATION = "kingpost.generation"
CLAIM_PREFIX = "kingpost-claim-"
"""Repository prefix of the tags by which installations claim the images they use."""
LABEL_MODEL = "kingpost.model"
LABEL_RUNTIME = "kingpost.runtime"
"""JSON of what the monitor needs to watch an adopted container: port and probes."""
LABEL_ISOLATION = "kingpost.isolation"
LABEL_GPUS = "kingpost.gpus"
"""The device UUIDs the container was given, for operators (`docker inspect`)."""
ISOLATION = "1"
"""The isolation a container was created with (network, user, capabilities, limits); one
from an older Kingpost, without it, is replaced rather than adopted."""
ICC_OPTION = "com.docker.network.bridge.enable_icc"
TMP_DIR = "/tmp"
MIB = 1024 * 1024


@dataclass(frozen=True)
class ContainerLimits:
    """Bounds every replica's container gets (from settings; see ``Settings.docker_*``)."""

    pids: int = 4096
    """Processes and threads: a threaded server holds one per open connection and ML
    libraries size thread pools by cores, so leave room; a fork bomb is stopped."""
    tmpfs_bytes: int = 1024 * MIB
    """Size of each tmpfs path; its pages count toward the container's memory limit."""
    volume_bytes: int | None = None
    """Size of each writable volume; None where the Docker Engine has no volume quotas."""


UID_BASE = 1_000_000_000
UID_SPAN = 1 << 30
"""Deployments without ``run_as_user_id`` run as a UID of their own in
``[UID_BASE, UID_BASE + UID_SPAN)``: below 2**31, far above login users and the usual
subordinate ranges."""


def deployment_uid(deployment_id: str) -> int:
    """The host UID a deployment's replicas run as, so per-user kernel limits (inotify
    instances, for one) are not shared between models. A hash of the id: two deployments
    share one with odds of about n**2 / 2**31 among n deployments."""
    digest = hashlib.sha256(deployment_id.encode()).digest()
    return UID_BASE + int.from_bytes(digest[:8], "big") % UID_SPAN


def runtime_uid(spec: ReplicaSpec) -> int:
    """``run_as_user_id`` when the config sets it, else the deployment's own UID."""
    if spec.run_as_user_id is not None:
        return spec.run_as_user_id
    return deployment_uid(spec.deployment_id)


def image_uid(spec: ReplicaSpec) -> int:
    """The UID that owns the writable directories in the image (60000 or
    ``run_as_user_id``), handed to :func:`runtime_uid` in each container's copy."""
    from kingpost.images.dockerfile import DEFAULT_UID, image_user_id

    return image_user_id(spec.config) if spec.config is not None else DEFAULT_UID


def network_name(scope: str) -> str:
    """The bridge network of one installation (``scope_of`` its home)."""
    return f"kingpost-{scope}"


def _packages_linked(spec: ReplicaSpec) -> bool:
    """Whether the built image made ``/packages`` a link into ``/app`` (bundled packages)."""
    config = spec.config
    name = (config.bundled_packages_dir.strip("/") if config is not None else "") or "packages"
    name = posixpath.normpath(name)
    if name == ".." or name.startswith("../"):  # the image copies only the project
        return False
    folder = spec.app_dir / name
    return folder.is_dir() and any(folder.iterdir())


def writable_mounts(spec: ReplicaSpec, uid: int) -> tuple[list[str], dict[str, str]]:
    """The paths a replica may write under its read-only root: (volumes, tmpfs options).

    Volumes start as a copy of the image's directory (handed to ``uid`` before the
    container starts: ``DockerEngine._hand_over_volumes``), for paths
    with content: ``/app`` always, and in built images ``/workspace``, ``$HOME`` and
    ``/packages`` (unless it links into ``/app``), which build commands may fill. In a
    ``no_build`` image those three may not exist, or belong to root: they are empty
    tmpfs owned by ``uid``. ``/tmp`` is tmpfs for everyone."""
    from kingpost.images.dockerfile import HOME_DIR, PACKAGES_DIR, WORKSPACE_DIR

    def tmpfs(mode: str, owner: bool) -> str:
        # exec: servers load compiled code from these (pip --target, JIT caches in /tmp)
        who = f",uid={uid},gid={uid}" if owner else ""
        return f"mode={mode}{who},exec"

    volumes, tmp = [APP_DIR], {TMP_DIR: tmpfs("1777", owner=False)}
    if spec.config is not None and spec.config.no_build:
        tmp |= {path: tmpfs("0755", owner=True) for path in (WORKSPACE_DIR, PACKAGES_DIR)}
        tmp[HOME_DIR] = tmpfs("0700", owner=True)
    else:
        volumes += [WORKSPACE_DIR, HOME_DIR]
        if not _packages_linked(spec):
            volumes.append(PACKAGES_DIR)
    return volumes, tmp


def requirements_fingerprint(config: TrussConfig, app_dir: Path) -> str | None:
    """What of a project, besides config.yaml's keys, its image is built from: the
    requirements file (hashed), which the image installs in a layer of its own. The rest
    of the project only sits in ``/app``, which :meth:`DockerEngine.reload` patches."""
    name = (config.requirements_file or "").strip().removeprefix("./")
    path = app_dir / name
    if not name or not path.is_file():
        return name or None
    return hashlib.sha256(path.read_bytes()).hexdigest()


def device_requests(gpus: tuple[str, ...] | None) -> list[dict[str, Any]]:
    """The NVIDIA runtime's request for the devices placement gave the replica (their
    UUIDs, ``gpus/placement.py``); none when it was given none."""
    if not gpus:
        return []
    return [{"Driver": "nvidia", "DeviceIDs": list(gpus), "Capabilities": [["gpu"]]}]


def _command(spec: ReplicaSpec) -> list[str] | None:
    if spec.kind == ServerKind.MODEL_CLASS:
        from kingpost.images import image_python

        python = image_python(spec.config) if spec.config is not None else "python3"
        return [
            python,
            *SERVER_ARGS,
            "--app-dir",
            APP_DIR,
            "--host",
            "0.0.0.0",
            "--port",
            str(spec.server_port),
            "--secrets-dir",
            SECRETS_MOUNT,
        ]
    if spec.command:
        return ["/bin/sh", "-c", spec.command]
    return None  # no_build without start_command: the image's own entrypoint


def _runtime_label(spec: ReplicaSpec) -> str:
    p = spec.probes
    return json.dumps(
        {
            "port": spec.server_port,
            "readiness": p.readiness_path,
            "liveness": p.liveness_path,
            "period": p.period_s,
            "timeout": p.timeout_s,
            "ready_threshold": p.readiness_failure_threshold,
            "live_threshold": p.liveness_failure_threshold,
            "initial_delay": p.initial_delay_s,
        },
        sort_keys=True,
    )


def _runtime_from_label(text: str) -> tuple[int, Probes]:
    data = json.loads(text)
    return int(data["port"]), Probes(
        readiness_path=data["readiness"],
        liveness_path=data["liveness"],
        period_s=float(data["period"]),
        timeout_s=float(data["timeout"]),
        readiness_failure_threshold=int(data["ready_threshold"]),
        liveness_failure_threshold=int(data["live_threshold"]),
        initial_delay_s=float(data["initial_delay"]),
    )


def container_options(
    spec: ReplicaSpec,
    *,
    name: str,
    network: str,
    scope: str,
    secrets_dir: Path,
    limits: ContainerLimits | None = None,
    reload_token: str = "",
) -> dict[str, Any]:
    """Keyword arguments of ``containers.create`` for one replica (pure but for a look at
    the project's bundled packages directory; unit-tested). ``reload_token``: a development
    replica's secret for :meth:`DockerEngine.reload` (a model class's server reads it).

    Mounts and device requests are plain dicts in the Engine API's shape."""
    from kingpost.images.dockerfile import HOME_DIR

    if not spec.image:
        raise EngineError(f"replica {spec.replica_id} has no image; the build did not run")
    limits = limits or ContainerLimits()
    config = spec.config
    uid = runtime_uid(spec)
    env = {
        # The UID has no passwd entry: name a home and a user (getpass.getuser reads it)
        "HOME": HOME_DIR,
        "USER": "app",
        "LOGNAME": "app",
        **spec.env,
        "BT_MODEL_ID": spec.model_id,
        "BT_MODEL_DEPLOYMENT_ID": spec.deployment_id,
        "KINGPOST_SECRETS_DIR": SECRETS_MOUNT,
        "PYTHONUNBUFFERED": "1",
        **({RELOAD_TOKEN_ENV: reload_token} if reload_token else {}),
    }
    mounts = [
        {"Type": "bind", "Source": str(secrets_dir), "Target": SECRETS_MOUNT, "ReadOnly": True}
    ] + [
        {"Type": "bind", "Source": str(w.source_dir), "Target": w.mount_location, "ReadOnly": True}
        for w in spec.weights
    ]
    if spec.dynamic_config_dir is not None:
        # The whole directory, not the file: the control plane replaces the file by rename,
        # which a bind of the file itself would never show.
        env[DYNAMIC_CONFIG_ENV] = DYNAMIC_CONFIG_MOUNT
        mounts.append(
            {
                "Type": "bind",
                "Source": str(spec.dynamic_config_dir),
                "Target": DYNAMIC_CONFIG_MOUNT,
                "ReadOnly": True,
            }
        )
    volumes, tmpfs_paths = writable_mounts(spec, uid)
    mounts += [
        {"Type": "volume", "Target": path, "ReadOnly": False, "Size": limits.volume_bytes}
        for path in volumes
    ]
    labels = {
        LABEL_SCOPE: scope,
        LABEL_REPLICA: spec.replica_id,
        LABEL_DEPLOYMENT: spec.deployment_id,
        LABEL_MODEL: spec.model_id,
        LABEL_RUNTIME: _runtime_label(spec),
        LABEL_ISOLATION: ISOLATION,
        LABEL_GENERATION: str(spec.generation),
    }
    options: dict[str, Any] = {
        "image": spec.image,
        "command": _command(spec),
        "name": name,
        "hostname": name[:63],
        "environment": env,
        "labels": labels,
        "mounts": mounts,
        "network": network,
        "init": True,
        "detach": True,
        "log_config": {"Type": "json-file", "Config": {"max-size": "20m", "max-file": "2"}},
        "user": f"{uid}:{uid}",
        "cap_drop": ["ALL"],  # a non-root server needs none; ports < 1024 are unprivileged
        "security_opt": ["no-new-privileges"],
        "read_only": True,
        "tmpfs": {path: f"size={limits.tmpfs_bytes},{opts}" for path, opts in tmpfs_paths.items()},
        "pids_limit": limits.pids,
    }
    if config is not None:
        millicores = config.resources.cpu_millicores
        if millicores:
            options["nano_cpus"] = millicores * 1_000_000
        memory = config.resources.memory_bytes
        if memory:
            options["mem_limit"] = memory
            options["memswap_limit"] = memory  # Docker's default adds as much swap again
    requests = device_requests(spec.gpus)
    if requests:
        options["device_requests"] = requests
        labels[LABEL_GPUS] = ",".join(spec.gpus or ())
    return options


@dataclass
class _Replica(Tracked):
    port: int
    probes: Probes
    spec: ReplicaSpec | None = None
    """None for a container adopted from an earlier control plane."""
    container_id: str | None = None
    next_check: float = 0.0
    busy: bool = False
    """A blocking Docker call for this replica is in flight on the pool."""
    reload_token: str = ""
    reloading: bool = False
    """:meth:`DockerEngine.reload` patches and reloads it: the monitor leaves it alone."""
    reloaded: bool = False
    """Its ``/app`` volume holds files newer than its image's: a new container of it
    would run the image's old files, so the controller starts a fresh replica instead."""


def _int(text: str) -> int:
    """A label's number; 0 for a container started before the label existed."""
    return int(text) if text.isdigit() else 0


class DockerEngine(ReplicaEngine[_Replica]):
    name: ClassVar[str] = "docker"
    tick_s = TICK_S

    def __init__(self, settings: Settings, client: DockerClient | None = None) -> None:
        from kingpost.images.client import docker_client

        self.settings = settings
        self.client = client or docker_client()
        self.scope = scope_of(settings.home)
        self.network = settings.docker_network or network_name(self.scope)
        self._secrets_root = _secrets_root(self.scope)
        private_dir(self._secrets_root)
        self._track()
        self._pool = ThreadPoolExecutor(4, thread_name_prefix="kingpost-docker")
        self._ensure_network()
        self.limits = ContainerLimits(
            pids=settings.docker_pids_limit,
            tmpfs_bytes=settings.docker_tmp_size_mb * MIB,
            volume_bytes=self._volume_quota(settings.docker_volume_size_mb * MIB),
        )
        self._adopt()
        self._kick = threading.Event()
        """Set by ``start``: the monitor's wait ends at once."""
        self._watch()

    def claim_image(self, tag: str) -> None:
        """Tag ``tag`` for this installation too (``kingpost-claim-{scope}/...``): image
        tags are content hashes, so installations sharing a Docker Engine share images,
        and :meth:`collect_images` removes one only when no other installation claims it."""
        from docker.errors import DockerException

        try:
            self.client.images.get(tag).tag(self._claim(tag))
        except DockerException as exc:
            log.info("docker engine: cannot claim image %s: %s", tag, exc)

    def _claim(self, tag: str) -> str:
        repo, _, version = tag.rpartition(":")
        return f"{CLAIM_PREFIX}{self.scope}/{repo.rpartition('/')[2]}:{version}"

    def collect_images(self, candidates: Collection[str]) -> tuple[list[str], int]:
        """Remove the images tagged one of ``candidates`` (Kingpost-built, label
        ``kingpost.image``) that no container, running or not, uses: this installation's
        claim goes, and the image itself once no other installation claims it and it has
        no other tag: (tags removed, bytes freed)."""
        from docker.errors import DockerException

        from kingpost.images.build import IMAGE_LABEL

        try:
            used = {c.attrs.get("Image") for c in self.client.containers.list(all=True)}
            images = self.client.images.list(filters={"label": f"{IMAGE_LABEL}=1"})
        except DockerException as exc:
            raise EngineError(f"docker engine: cannot list images: {exc}") from exc
        removed: list[str] = []
        freed = 0
        wanted = set(candidates)
        for image in images:
            tags, image_id = list(image.tags), str(image.id)
            mine = {t for t in tags if t in wanted}
            if image_id in used or not mine:
                continue
            mine |= {self._claim(t) for t in mine} & set(tags)
            if any(t not in mine for t in tags):  # claimed by another installation too
                for claim in sorted(mine - wanted):  # only this one's claim goes
                    with contextlib.suppress(DockerException):
                        self.client.images.remove(claim, force=False)
                continue
            gone = []
            for name in tags:  # by tag: one id with two tags refuses removal by id
                try:
                    self.client.images.remove(name, force=False)
                    gone.append(name)
                except DockerException as exc:  # in use meanwhile, or a parent image
                    log.info("docker engine: image %s not removed: %s", name, exc)
            removed.extend(gone)
            if len(gone) == len(tags):
                freed += int(image.attrs.get("Size", 0))
        return removed, freed

    # -- the Engine interface ------------------------------------------------------------
    def prepare(self, config: TrussConfig, app_dir: Path, log: BuildLog) -> Prepared:
        from kingpost.images import build_image

        image = build_image(
            config, app_dir, log, self.client, truss_version=self.settings.truss_version
        )
        return Prepared(image=image)

    def start(self, spec: ReplicaSpec) -> None:
        with self._lock:
            if spec.replica_id in self._replicas:
                return
            self._replicas[spec.replica_id] = _Replica(
                spec.server_port,
                spec.probes,
                replica_id=spec.replica_id,
                deployment_id=spec.deployment_id,
                generation=spec.generation,
                spec=spec,
                started_at=time.time(),
                reload_token=secrets.token_urlsafe(24) if spec.reloadable else "",
            )
        self._kick.set()  # created by the monitor now, not at its next tick

    def _pause(self, replicas: Sequence[_Replica]) -> None:
        """Until the next tick, sooner while a container starts (probed as often as the
        process engine probes a starting process) or when ``start`` kicks."""
        now = time.monotonic()
        soon = [
            max(0.0, r.next_check - now)
            for r in replicas
            if r.container_id is not None and not r.ever_ready and not r.busy
        ]
        self._kick.wait(min([TICK_S, *soon]))
        self._kick.clear()

    def swap_inputs(self, config: TrussConfig, app_dir: Path) -> str | None:
        return requirements_fingerprint(config, app_dir)

    def reload(
        self, replica_id: str, source: Path, changed: Sequence[str], removed: Sequence[str]
    ) -> Reload | None:
        """Patch the files into the container's ``/app`` volume (as root, through its
        directory on this machine, like :meth:`_hand_over_volumes`) and reload: a model
        class over its reload path, a custom server by restarting the container (the
        volume keeps the files). ``None`` (a swap) where the image did more with the
        project than copy it to ``/app``: build commands, ``no_build``, a ``data_dir``
        copied elsewhere, or bundled packages the image does not link."""
        with self._lock:
            rep = self._replicas.get(replica_id)
            if rep is None or not self._reloadable(rep, [*changed, *removed]):
                return None
            rep.reloading = True  # the monitor starts no new action of it (``_async``)
        try:
            while rep.busy:  # one already in flight ends first
                time.sleep(0.02)
            if rep.phase != ReplicaPhase.READY or rep.stopping or rep.container_id is None:
                return None
            app = self._app_volume(rep.container_id)
            if app is None:
                return None
            assert rep.spec is not None
            patch = Patch(app, runtime_uid(rep.spec))
            try:
                patch.apply(source, changed, removed)
            except OSError as exc:  # e.g. a link the server planted where a file goes
                patch.undo()
                return Reload(False, f"cannot patch the replica's files: {exc}")
            model_class = rep.spec.kind == ServerKind.MODEL_CLASS
            if model_class and rep.endpoint is not None:
                result = ask_reload(rep.endpoint, rep.reload_token, self.settings.build_timeout)
            elif model_class:
                result = Reload(False, "the replica has no address to reload it at")
            else:
                result = self._restart_container(rep)
            if result.ok:
                rep.reloaded = True
                return result
            patch.undo()
            if not model_class and not self._restart_container(rep).ok:
                log.warning("docker engine: replica %s is not ready on its old files either",
                            replica_id)  # fmt: skip
            return result
        finally:
            rep.next_check = time.monotonic()
            rep.reloading = False

    @staticmethod
    def _reloadable(rep: _Replica, paths: Sequence[str]) -> bool:
        spec = rep.spec
        if (
            spec is None  # adopted: no token nor spec kept
            or not spec.reloadable
            or rep.stopping
            or rep.phase != ReplicaPhase.READY
            or spec.config is None
            or spec.config.no_build
            or spec.config.build_commands
            or (spec.config.data_dir.strip("/") or "data") != "data"
        ):
            return False
        packages = spec.config.bundled_packages_dir.strip("/") or "packages"
        return _packages_linked(spec) or not any(p.startswith(f"{packages}/") for p in paths)

    def _app_volume(self, container_id: str) -> Path | None:
        """The directory on this machine of the container's ``/app`` volume."""
        from docker.errors import DockerException

        try:
            attrs = self.client.api.inspect_container(container_id)
        except DockerException:
            return None
        for mount in attrs.get("Mounts") or []:
            if mount.get("Type") == "volume" and mount.get("Destination") == APP_DIR:
                root = Path(mount.get("Source") or "")
                return root if mount.get("Source") and root.is_dir() else None
        return None

    def _restart_container(self, rep: _Replica) -> Reload:
        """A custom server on its patched files: the container restarted (out of the
        routing table meanwhile) and waited for until ready."""
        from docker.errors import DockerException

        assert rep.container_id is not None
        since = int(time.time())
        rep.phase, rep.ready_fails, rep.live_fails = ReplicaPhase.STARTING, 0, 0
        try:
            self.client.api.restart(rep.container_id, timeout=STOP_GRACE_S)
            self._started(rep)
        except DockerException as exc:
            return Reload(False, f"cannot restart the container: {exc}")
        deadline = time.monotonic() + self.settings.build_timeout
        while time.monotonic() < deadline:
            state = self._state(rep.container_id)
            if not state or not state.get("Running"):
                break
            if rep.endpoint is not None and http_probe(
                rep.endpoint, rep.probes.readiness_path, rep.probes.timeout_s
            ):
                rep.phase, rep.ever_ready = ReplicaPhase.READY, True
                if self.on_ready is not None:
                    self.on_ready()
                return Reload(True)
            time.sleep(TICK_S)
        try:
            data = self.client.api.logs(rep.container_id, since=since, tail=50)
            output = data.decode(errors="replace") if isinstance(data, bytes) else str(data)
        except DockerException:
            output = ""
        return Reload(False, "the server did not become ready on the new files", output)

    def logs(self, deployment_id: str, tail: int = 200) -> list[LogLine]:
        out: list[LogLine] = []
        saved = sorted(
            self.settings.replicas_dir.glob(f"{deployment_id}-*/output.log"),
            key=lambda p: p.stat().st_mtime,
        )
        for path in saved:
            lines = path.read_text(errors="replace").splitlines()[-tail:]
            out.extend(LogLine(path.parent.name, line) for line in lines)
        with self._lock:
            live = [
                (r.replica_id, r.container_id)
                for r in self._replicas.values()
                if r.deployment_id == deployment_id and r.container_id
            ]
        for replica_id, cid in live:
            out.extend(LogLine(replica_id, line) for line in self._container_logs(cid, tail))
        return out[-tail:]

    keeps_replicas = True

    def kept_replicas_hint(self) -> str:
        return f"docker rm -f $(docker ps -aq --filter label={LABEL_SCOPE}={self.scope})"

    def close(self) -> None:
        """Stop watching; containers keep running for the next control plane to adopt.

        Replicas already asked to stop are stopped first."""
        self._finish_stops(STOP_GRACE_S)
        self._pool.shutdown(wait=True)
        self._probes.shutdown(wait=True)

    # -- setup ----------------------------------------------------------------------------
    def _ensure_network(self) -> None:
        """Create this installation's network, dropping traffic between its containers,
        or check that an existing one does."""
        from docker.errors import APIError, DockerException

        try:
            found = self._find_network()
            if found is None:
                with contextlib.suppress(APIError):  # a concurrent creator won
                    self.client.networks.create(
                        self.network,
                        driver="bridge",
                        options={ICC_OPTION: "false"},
                        labels={"kingpost.network": "1", LABEL_SCOPE: self.scope},
                    )
                found = self._find_network()
        except DockerException as exc:
            raise EngineError(
                f"docker engine: cannot create the network {self.network!r}: {exc}"
            ) from exc
        options = (found or {}).get("Options") or {}
        if options.get(ICC_OPTION) != "false":
            raise EngineError(
                f"docker engine: the network {self.network!r} (KINGPOST_DOCKER_NETWORK) lets "
                f"its containers reach each other ({ICC_OPTION} is not false), so one model "
                "could call another's server past the gateway's API keys; unset "
                "KINGPOST_DOCKER_NETWORK to use a network of this installation, or name one "
                f"created with `-o {ICC_OPTION}=false`"
            )

    def _find_network(self) -> dict[str, Any] | None:
        # The name filter matches substrings ("kingpost" finds "kingpost-1a2b"): compare.
        for net in self.client.api.networks(names=[self.network]):
            if net.get("Name") == self.network:
                found: dict[str, Any] = net
                return found
        return None

    def _remove_network_if_unused(self) -> None:
        """Remove this installation's network once no replica of it is left (the next
        launch creates it again). A network named in settings is the operator's: kept."""
        from docker.errors import DockerException

        if self.settings.docker_network:
            return
        with self._lock:
            if self._replicas:
                return
            try:
                net = self._find_network()
                if net is None:
                    return
                detail = self.client.api.inspect_network(net["Id"])
                if not detail.get("Containers"):
                    self.client.api.remove_network(net["Id"])
                    log.info("docker engine: removed the unused network %s", self.network)
            except DockerException as exc:  # in use after all, or gone: harmless
                log.debug("docker engine: keeping the network %s: %s", self.network, exc)

    def _volume_quota(self, size: int) -> int | None:
        """``size`` if the Docker Engine can bound a volume's size, else None (logged)."""
        from docker.errors import DockerException

        probe = f"kingpost-quota-probe-{self.scope}"
        try:
            self.client.api.create_volume(probe, driver="local", driver_opts={"size": str(size)})
        except DockerException as exc:
            log.warning(
                "docker engine: this Docker Engine cannot bound volume sizes (%s); replicas' "
                "writable paths /app, /workspace, $HOME and /packages can fill its disk. "
                "Volume quotas need its data root on XFS mounted with pquota",
                _explain(exc),
            )
            return None
        with contextlib.suppress(DockerException):
            self.client.api.remove_volume(probe, force=True)
        return size

    def _adopt(self) -> None:
        """Take over this installation's containers left by an earlier control plane."""
        from docker.errors import DockerException

        try:
            containers = self.client.containers.list(
                all=True, filters={"label": f"{LABEL_SCOPE}={self.scope}"}
            )
        except DockerException as exc:
            raise EngineError(f"docker engine: cannot list containers: {exc}") from exc
        for container in containers:
            labels = container.labels
            replica_id = labels.get(LABEL_REPLICA, "")
            try:
                port, probes = _runtime_from_label(labels.get(LABEL_RUNTIME, ""))
            except (ValueError, KeyError):
                port, probes = 0, Probes()
            outdated = labels.get(LABEL_ISOLATION) != ISOLATION
            if outdated and container.status == "running":
                log.warning(
                    "docker engine: replacing replica %s, started by an older Kingpost without "
                    "this one's isolation (shared network, root, capabilities)",
                    replica_id or container.name,
                )
            if container.status != "running" or not replica_id or not port or outdated:
                self._save_logs(replica_id or str(container.name), str(container.id))
                with contextlib.suppress(DockerException):
                    container.remove(force=True, v=True)
                continue
            now = time.monotonic()
            rep = _Replica(
                port,
                probes,
                replica_id=replica_id,
                deployment_id=labels.get(LABEL_DEPLOYMENT, ""),
                container_id=container.id,
                launched=now,
                ever_ready=True,
                started_at=time.time(),
                message="adopted from an earlier control plane",
                generation=_int(labels.get(LABEL_GENERATION, "")),
            )
            rep.endpoint = self._endpoint(container.attrs, port)
            if rep.endpoint is not None and http_probe(
                rep.endpoint, probes.readiness_path, min(probes.timeout_s, 1.0)
            ):
                # Ready now, so the controller's first pass (which publishes the routing
                # table after a restart) routes to it instead of reporting no replica ready.
                rep.phase = ReplicaPhase.READY
            self._replicas[replica_id] = rep
            log.info("docker engine: adopted replica %s", replica_id)
        # Secret files of replicas whose containers exited or vanished while no control
        # plane watched: nothing will run them again (the controller starts new replicas).
        if self._secrets_root.is_dir():
            for path in self._secrets_root.iterdir():
                if path.name not in self._replicas:
                    remove_secrets(path)

    # -- the monitor thread -------------------------------------------------------------------
    def _due(self, rep: _Replica) -> bool:
        return not rep.busy and not rep.reloading

    def _step(self, rep: _Replica, now: float) -> None:
        if rep.stopping:
            self._async(rep, self._remove)
            return
        if rep.phase == ReplicaPhase.FAILED:
            return
        if rep.container_id is None or rep.endpoint is None:
            if now >= rep.next_start:
                self._async(rep, self._launch)
            return
        if now < rep.next_check:
            return
        rep.next_check = now + rep.probe_period(rep.probes.period_s, now)
        self._async(rep, self._check, self._probes)

    def _check(self, rep: _Replica) -> None:
        """One health round (the container's state, then the probes), on the probe pool:
        a replica whose endpoint hangs holds up only its own rounds."""
        assert rep.container_id is not None
        now = time.monotonic()
        try:
            state = self._state(rep.container_id)
        except Exception:  # the engine hiccuped: the next round asks again
            log.exception("docker engine: inspecting replica %s", rep.replica_id)
            return
        if state is None:
            self._exited(rep, now, "the container was removed from outside", gone=True)
        elif not state.get("Running"):
            code = state.get("ExitCode")
            why = "killed: out of memory" if state.get("OOMKilled") else f"exited with code {code}"
            self._exited(rep, now, why)
        else:
            self._probe(rep, now)

    def _async(
        self,
        rep: _Replica,
        action: Callable[[_Replica], None],
        pool: ThreadPoolExecutor | None = None,
    ) -> None:
        with self._lock:  # atomic with reload()'s claim: one of them has the replica
            if rep.reloading:
                return
            rep.busy = True

        def run() -> None:
            try:
                action(rep)
            except Exception as exc:
                log.exception("docker engine: replica %s", rep.replica_id)
                rep.phase, rep.message = ReplicaPhase.FAILED, f"docker engine: {exc}"
            finally:
                rep.busy = False
                if not rep.ever_ready:  # a starting container's next round is due soon
                    self._kick.set()

        try:
            (pool or self._pool).submit(run)
        except RuntimeError:  # shutting down
            rep.busy = False

    def _state(self, container_id: str) -> dict[str, Any] | None:
        from docker.errors import NotFound

        try:
            attrs = self.client.api.inspect_container(container_id)
        except NotFound:
            return None
        state: dict[str, Any] = attrs.get("State", {})
        return state

    def _exited(self, rep: _Replica, now: float, why: str, gone: bool = False) -> None:
        if gone:
            rep.container_id = None
        self._after_exit(rep, now, why, lambda: self._container_logs(rep.container_id, 20))

    def _schedule_restart(self, rep: _Replica, now: float, why: str) -> None:
        rep.endpoint, rep.live_fails, rep.ready_fails = None, 0, 0
        rep.back_off(now, why)

    def _probe(self, rep: _Replica, now: float) -> None:
        self._probe_round(rep, rep.probes, self._kill_and_restart)

    def _kill_and_restart(self, rep: _Replica, now: float, why: str) -> None:
        from docker.errors import DockerException

        if rep.container_id is not None:
            with contextlib.suppress(DockerException):
                self.client.api.kill(rep.container_id)
        self._schedule_restart(rep, now, why)

    # -- blocking actions (on the pool) -----------------------------------------------------
    def _launch(self, rep: _Replica) -> None:
        """Start the replica's container again, or create it (anew, if it was removed)."""
        from docker.errors import DockerException, NotFound

        if rep.container_id is not None:
            try:
                self.client.api.start(rep.container_id)
                self._started(rep)
                return
            except NotFound:
                rep.container_id = None
            except DockerException as exc:
                if rep.spec is None:
                    self._drop(rep, f"cannot restart the adopted container: {exc}")
                    return
                self._save_logs(rep.replica_id, rep.container_id)
                with contextlib.suppress(DockerException):
                    self.client.api.remove_container(rep.container_id, force=True, v=True)
                rep.container_id = None
        if rep.spec is None:
            self._drop(rep, "the adopted container is gone")
            return
        if rep.reloaded:
            self._drop(rep, "its container is gone, and its image predates its reloaded files")
            return
        spec = rep.spec
        secrets_dir = self._write_secrets(spec)
        options = container_options(
            spec,
            name=_container_name(spec.replica_id),
            network=self.network,
            scope=self.scope,
            secrets_dir=secrets_dir,
            limits=self.limits,
            reload_token=rep.reload_token,
        )
        container = None
        try:
            self._ensure_network()  # removed when the last replica went
            container = self._create(options)
            self._hand_over_volumes(container.id, image_uid(spec), runtime_uid(spec))
            container.start()
        except (DockerException, EngineError, OSError) as exc:
            if container is not None:  # created, but never ran: nothing would remove it
                with contextlib.suppress(DockerException):
                    self.client.api.remove_container(container.id, force=True, v=True)
            rep.phase = ReplicaPhase.FAILED
            rep.message = f"cannot start the container: {_explain(exc)}"
            return
        rep.container_id = container.id
        self._started(rep)

    def _create(self, options: dict[str, Any]) -> Any:
        from docker.errors import APIError, NotFound
        from docker.types import DeviceRequest

        kwargs = dict(options)
        kwargs["mounts"] = docker_mounts(options["mounts"])
        if "device_requests" in options:
            kwargs["device_requests"] = [
                DeviceRequest(
                    driver=d["Driver"], device_ids=d["DeviceIDs"], capabilities=d["Capabilities"]
                )
                for d in options["device_requests"]
            ]
        try:
            return self.client.containers.create(**kwargs)
        except APIError as exc:
            if exc.status_code != 409:  # 409: a container of that name exists (a retry)
                raise
        with contextlib.suppress(NotFound):
            self.client.api.remove_container(options["name"], force=True, v=True)
        return self.client.containers.create(**kwargs)

    def _hand_over_volumes(self, container_id: str, owner: int, uid: int) -> None:
        """Give the deployment's UID what the image's user owned in the container's new
        volumes (Docker filled them from the image at create; the container has not run,
        so nothing in them moves). Links are changed, never followed."""
        if owner == uid:
            return
        attrs = self.client.api.inspect_container(container_id)
        for mount in attrs.get("Mounts") or []:
            if mount.get("Type") != "volume" or not mount.get("Source"):
                continue
            root = Path(mount["Source"])
            if not root.is_dir():
                raise EngineError(
                    f"docker engine: volume {mount.get('Name')} of {container_id[:12]} is not at "
                    f"{root} on this machine; the docker engine needs a local Docker Engine"
                )
            for folder, dirs, files in os.walk(root):
                for name in [*dirs, *files, None]:
                    path = os.path.join(folder, name) if name else folder
                    st = os.lstat(path)
                    if st.st_uid == owner or st.st_gid == owner:
                        uid_to = uid if st.st_uid == owner else st.st_uid
                        gid_to = uid if st.st_gid == owner else st.st_gid
                        os.chown(path, uid_to, gid_to, follow_symlinks=False)

    def _started(self, rep: _Replica) -> None:
        assert rep.container_id is not None
        attrs = self.client.api.inspect_container(rep.container_id)
        now = time.monotonic()
        rep.endpoint = self._endpoint(attrs, rep.port)
        rep.launched, rep.next_check = now, now + min(STARTING_PROBE_S, rep.probes.period_s)
        rep.phase, rep.ready_fails = ReplicaPhase.STARTING, 0

    def _endpoint(self, attrs: dict[str, Any], port: int) -> Endpoint | None:
        networks = attrs.get("NetworkSettings", {}).get("Networks", {}) or {}
        net = networks.get(self.network) or next(iter(networks.values()), None)
        address = (net or {}).get("IPAddress")
        return Endpoint(address, port) if address else None

    def _remove(self, rep: _Replica) -> None:
        from docker.errors import DockerException, NotFound

        if rep.container_id is not None:
            rep.phase = ReplicaPhase.STOPPED
            try:
                self.client.api.stop(rep.container_id, timeout=STOP_GRACE_S)
            except NotFound:
                pass
            except DockerException as exc:
                log.warning("docker engine: stopping %s: %s", rep.replica_id, exc)
            self._save_logs(rep.replica_id, rep.container_id)
            with contextlib.suppress(NotFound):
                self.client.api.remove_container(rep.container_id, force=True, v=True)
        self._forget(rep)
        self._remove_network_if_unused()

    def _drop(self, rep: _Replica, why: str) -> None:
        """Forget a replica the controller must replace (so it starts a fresh one)."""
        log.info("docker engine: replica %s dropped: %s", rep.replica_id, why)
        self._forget(rep)

    def _forget(self, rep: _Replica) -> None:
        remove_secrets(self._secrets_root / rep.replica_id)
        self._forget_replica(rep)

    # -- files ----------------------------------------------------------------------------------
    def _write_secrets(self, spec: ReplicaSpec) -> Path:
        """Secret files on tmpfs, readable only by the server's user, bound read-only.

        Directory 0500 and files 0400 owned by :func:`runtime_uid`."""
        path = self._secrets_root / spec.replica_id
        remove_secrets(path)
        return write_secrets(path, spec.secrets, runtime_uid(spec))

    def _container_logs(self, container_id: str | None, tail: int) -> list[str]:
        from docker.errors import DockerException

        if container_id is None:
            return []
        try:
            data = self.client.api.logs(container_id, tail=tail, stdout=True, stderr=True)
        except DockerException:
            return []
        text = data.decode(errors="replace") if isinstance(data, bytes) else str(data)
        return text.splitlines()

    def _save_logs(self, replica_id: str, container_id: str) -> None:
        """Keep a removed container's output for ``kingpost logs``."""
        lines = self._container_logs(container_id, 2000)
        if not lines:
            return
        root = self.settings.replicas_dir / replica_id
        root.mkdir(parents=True, exist_ok=True)
        with (root / "output.log").open("a") as fh:
            fh.write("\n".join(lines) + "\n")


def docker_mounts(mounts: list[dict[str, Any]]) -> list[Any]:
    """``container_options``' mounts as the docker SDK's ``Mount`` objects."""
    from docker.types import DriverConfig, Mount

    def mount(m: dict[str, Any]) -> Mount:
        if m["Type"] == "volume":  # anonymous: removed with the container (v=True)
            size = m["Size"]
            driver = DriverConfig("local", {"size": str(size)}) if size else None
            return Mount(m["Target"], None, type="volume", driver_config=driver)
        return Mount(m["Target"], m["Source"], type=m["Type"], read_only=m["ReadOnly"])

    return [mount(m) for m in mounts]


def _container_name(replica_id: str) -> str:
    return f"kingpost-{replica_id}"


def _secrets_root(scope: str) -> Path:
    return tmpfs() / f"kingpost-docker-{scope}"


def _explain(exc: Exception) -> str:
    text = str(exc)
    if "could not select device driver" in text:
        return (
            f"{text}; resources.accelerator asks for a GPU, and this Docker Engine has no "
            "GPU runtime (install the NVIDIA Container Toolkit) or no GPU"
        )
    return text
