"""What a deployment needs before a replica can start, and the housekeeping of it.

:class:`Builds` is the controller's preparation and housekeeping concern: parsed configs
(cached by project hash), the prerequisite checks in order (secrets, engine, build,
weights) as a value (:class:`Ready`, or :class:`Blocked` with the status to record),
the build jobs (idempotent, one per deployment), the weights mirror, and the collection
of what nothing uses any more (environments, images, projects and replica directories).
Everything here is soft state, rebuilt after a restart; the reconcile loop
(:mod:`kingpost.controller.loop`) asks and records.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kingpost.controller.prepare import Jobs, JobState
from kingpost.controller.specs import ServerShape, missing_secrets, server_shape
from kingpost.engines import Engine, Prepared, engine_kind
from kingpost.envs.gc import GcReport, VenvInfo, collect, list_environments
from kingpost.errors import KingpostError
from kingpost.housekeeping import DiskReport, collect_disk
from kingpost.store import DeploymentStatus, DeploymentView, Store

if TYPE_CHECKING:
    from kingpost.config import TrussConfig
    from kingpost.engines.base import WeightMount
    from kingpost.settings import Settings
    from kingpost.weights import MirrorStatus, WeightsManager

__all__ = ["Blocked", "Builds", "Ready"]

log = logging.getLogger(__name__)

_IMAGE_LINE = re.compile(r"^(?:built image (\S+)|image (\S+) is up to date)$")


@dataclass(frozen=True)
class Ready:
    """Prerequisites met: what replica specs need beyond the config."""

    built: Prepared
    weights: tuple[WeightMount, ...]


@dataclass(frozen=True)
class Blocked:
    """A prerequisite not met: the status it calls for, recorded once by the pass (or not
    at all while adopted replicas serve: they keep serving, and ``message`` becomes the
    deployment's note)."""

    status: DeploymentStatus | None
    """``None``: nothing to record (e.g. a recorded BUILD_FAILED that stands); from
    ``_start_replicas``, a replica waiting for devices: the status stays, the message says
    why."""
    message: str = ""


def image_of(build_log: list[str]) -> str | None:
    """The image tag a docker build last ended with, from its log lines."""
    for line in reversed(build_log):
        found = _IMAGE_LINE.match(line.strip())
        if found:
            return found.group(1) or found.group(2)
    return None


class Builds:
    """Preparation and housekeeping (see the module's text).

    ``engine`` gets (creating on first use) the engine of a name; ``engines`` is the
    controller's live map of the engines created so far; ``running`` lists the replica
    ids the engines run now; ``wake`` asks the loop for a pass."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        *,
        engine: Callable[[str], Engine],
        engines: Mapping[str, Engine],
        running: Callable[[], set[str]],
        wake: Callable[[], None],
    ) -> None:
        self.settings = settings
        self.store = store
        self._engine = engine
        self._engines = engines
        self._running = running
        self._wake = wake
        self.jobs = Jobs(settings.build_timeout, log_dir=settings.builds_dir)
        self._configs: dict[str, TrussConfig] = {}
        self._failed_builds: set[str] = set()
        """Deployments whose BUILD_FAILED is recorded: re-activating one builds it again."""
        self._built_for: dict[str, str] = {}
        """Per deployment: the project its build job prepares (a development deployment's
        changes; a job for an older project is run again)."""
        self._failed_weights: set[str] = set()
        """Deployments whose weights mirror gave up: re-activating one mirrors afresh."""
        self._weights: WeightsManager | None = None
        self._images: set[str] | None = None
        self._images_lock = threading.Lock()

    # -- configs ------------------------------------------------------------------------
    def config(self, dep: DeploymentView) -> TrussConfig:
        cfg = self._configs.get(dep.project_hash)
        if cfg is None:
            from kingpost.config import load_config

            cfg = load_config(self.app_dir(dep)).config
            self._configs[dep.project_hash] = cfg
        return cfg

    def app_dir(self, dep: DeploymentView) -> Path:
        return self.settings.projects_dir / dep.project_hash

    def shape(self, dep: DeploymentView) -> ServerShape | None:
        try:
            return server_shape(self.config(dep))
        except KingpostError:
            return None

    # -- prerequisites ------------------------------------------------------------------
    def prepare(self, dep: DeploymentView, serving: bool) -> Ready | Blocked:
        """Check prerequisites in order (secrets, engine, build, weights): what the
        deployment's replicas need, or the first one missing as a status to record.
        ``serving``: adopted replicas serve (after a restart), which a recorded
        BUILD_FAILED does not stop from re-checking the build."""
        config = self.config(dep)
        missing = missing_secrets(config, self.store.secret_names())
        if missing:
            what = f"secret(s) not defined: {', '.join(missing)}; define each with "
            if serving:  # the running replicas keep the files they started with
                return Blocked(
                    DeploymentStatus.FAILED, what + "`kingpost secrets set NAME` before a "
                    "replica starts",
                )  # fmt: skip
            return Blocked(
                DeploymentStatus.FAILED,
                what + "`kingpost secrets set NAME` (the deployment starts once they exist)",
            )
        if dep.engine not in self._engines:
            try:
                self._engine(dep.engine)
            except KingpostError as exc:
                return Blocked(DeploymentStatus.FAILED, exc.message)
        built = self._build_for(dep, config, serving)
        if isinstance(built, Blocked):
            return built
        weights = self._weights_for(dep, config)
        if isinstance(weights, Blocked):
            return weights
        return Ready(built=built, weights=weights)

    def _build_for(
        self, dep: DeploymentView, config: TrussConfig, serving: bool
    ) -> Prepared | Blocked:
        """What the deployment's engine builds for it (an environment, an image), once."""
        engine, app_dir = self._engine(dep.engine), self.app_dir(dep)
        key = f"build:{dep.id}"
        if dep.status == DeploymentStatus.BUILD_FAILED and not serving:
            # The recorded failure stands until the user re-activates (which resets the
            # status), a restarted control plane included: it does not build it again.
            return Blocked(None)
        if dep.id in self._failed_builds and dep.status == DeploymentStatus.DEPLOYING:
            # BUILD_FAILED was recorded, and re-activating reset it since: build again.
            self._failed_builds.discard(dep.id)
            self.jobs.forget(key)
        if self._built_for.setdefault(dep.id, dep.project_hash) != dep.project_hash:
            # A development deployment's new project: prepare it, not the one before.
            self.jobs.cancel(key, "the deployment's project changed")
            self.jobs.forget(key)
            self._built_for[dep.id] = dep.project_hash
        job = self.jobs.ensure(key, lambda out: engine.prepare(config, app_dir, out))
        if job.state == JobState.RUNNING:
            what = engine_kind(dep.engine).builds
            return Blocked(DeploymentStatus.BUILDING, f"building {what}")
        if job.state == JobState.FAILED:
            self._failed_builds.add(dep.id)
            return Blocked(DeploymentStatus.BUILD_FAILED, job.error)
        built = job.result if isinstance(job.result, Prepared) else Prepared()
        if built.image is not None:
            self._record_image(built.image)
        return built

    def _weights_for(
        self, dep: DeploymentView, config: TrussConfig
    ) -> tuple[WeightMount, ...] | Blocked:
        entries = list(config.weights or [])
        if not entries:
            return ()
        manager = self.weights_manager()
        if dep.id in self._failed_weights and dep.status == DeploymentStatus.DEPLOYING:
            # Gave up, recorded FAILED, and re-activating reset it since: mirror afresh.
            self._failed_weights.discard(dep.id)
            manager.forget(dep.id)
        secret_names = {e.secret_name for e in entries if e.secret_name}
        manager.start(dep.id, entries, self.store.reveal_secrets(secret_names))
        st = manager.status(dep.id)
        state = str(getattr(st.state, "value", st.state)).upper()
        if state == "COMPLETE":
            return tuple(manager.mounts(dep.id))
        if state == "FAILED" and st.retry_in_s is None:
            self._failed_weights.add(dep.id)
            return Blocked(
                DeploymentStatus.FAILED,
                f"weights: {st.error} (gave up after {st.attempts} attempts; fix the source "
                "or its secret, then re-activate the deployment)",
            )
        if state == "FAILED":
            return Blocked(
                DeploymentStatus.WAITING_FOR_WEIGHTS,
                f"weights: attempt {st.attempts} of {manager.attempts} failed: {st.error}; "
                f"trying again in {st.retry_in_s:.0f} s",
            )
        progress = f"{st.files_done}/{st.files_total} files, {st.bytes_done}/{st.bytes_total} bytes"
        return Blocked(DeploymentStatus.WAITING_FOR_WEIGHTS, progress)

    def weights_manager(self) -> WeightsManager:
        if self._weights is None:
            from kingpost.weights import WeightsManager

            self._weights = WeightsManager(
                self.settings.weights_dir,
                home=self.settings.home,
                attempts=self.settings.weights_mirror_attempts,
            )
        return self._weights

    def weights_status(self, deployment_id: str) -> MirrorStatus | None:
        return None if self._weights is None else self._weights.status(deployment_id)

    # -- build jobs ---------------------------------------------------------------------
    def output(self, deployment_id: str) -> list[str]:
        """The lines of the deployment's last build."""
        return self.jobs.output(f"build:{deployment_id}")

    def cancel(self, deployment_id: str, why: str) -> None:
        self.jobs.cancel(f"build:{deployment_id}", why)

    def cancel_others(self, known: set[str], why: str) -> None:
        """Cancel the builds of deployments not in ``known`` (deleted ones)."""
        self.jobs.cancel_others({f"build:{d}" for d in known}, why)

    def prepare_again(self, deployment_id: str) -> None:
        """Its next replica is prepared afresh (environment, image, weights): the development
        deployment got a project that needs it (see :mod:`kingpost.controller.devloop`)."""
        self.cancel(deployment_id, "the development deployment changed again")
        self.jobs.forget(f"build:{deployment_id}")
        self._failed_builds.discard(deployment_id)
        self._failed_weights.discard(deployment_id)
        if self._weights is not None:
            self._weights.restart(deployment_id)
        self._wake()

    def build_failure(self, deployment_id: str) -> str | None:
        """The error of the deployment's last preparation, if it failed."""
        state = self.jobs.state(f"build:{deployment_id}")
        return state[1] if state is not None and state[0] == JobState.FAILED else None

    def close(self) -> None:
        self.jobs.close()

    # -- images -------------------------------------------------------------------------
    def _images_path(self) -> Path:
        return self.settings.builds_dir / "docker-images"

    def _built_images(self) -> set[str]:
        """Every image tag this installation's builds ended with (a Docker Engine may
        serve several installations: only these are ever collected)."""
        if self._images is None:
            try:
                self._images = set(self._images_path().read_text().split())
            except FileNotFoundError:
                self._images = set()
        return self._images

    def _record_image(self, tag: str) -> None:
        with self._images_lock:
            images = self._built_images()
            if tag in images:
                return
            images.add(tag)
            path = self._images_path()
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                f.write(tag + "\n")
        engine = self._engines.get("docker")
        if engine is not None and hasattr(engine, "claim_image"):
            engine.claim_image(tag)

    def gc_images(self) -> tuple[list[str], int, str]:
        """Remove images the docker engine built that no deployment (deleted ones aside)
        uses: (tags removed, bytes, why nothing was collected, or "")."""
        engine = self._engines.get("docker")
        if engine is None or not hasattr(engine, "collect_images"):
            return [], 0, ""
        keep: set[str] = set()
        for dep in self.store.list_deployments():
            if dep.engine != "docker":
                continue
            if dep.status == DeploymentStatus.BUILDING:  # may be about to reuse a candidate
                return [], 0, f"deployment {dep.id} is building; run it again afterwards"
            tag = image_of(self.output(dep.id))
            if tag is not None:  # none: never built (failed, or still to come), so it holds
                keep.add(tag)  # no image; a build of it later finds or makes its own
        with self._images_lock:
            candidates = self._built_images() - keep
            removed, freed = engine.collect_images(candidates)
            if removed:
                left = self._built_images() - set(removed)
                self._images = left
                tmp = self._images_path().with_suffix(".tmp")
                tmp.write_text("".join(f"{t}\n" for t in sorted(left)))
                tmp.replace(self._images_path())
        return removed, freed, ""

    # -- Python environments ------------------------------------------------------------
    def venvs_in_use(self) -> dict[str, list[str]]:
        """Environment hash -> ids of the deployments (not deleted) that use it.

        A deployment whose environment cannot be told (its config no longer loads, its
        engine is unavailable, the Python it asks for is gone) is left out: it could
        not be built either."""
        used: dict[str, list[str]] = {}
        for dep in self.store.list_deployments():
            try:
                env = self._engine(dep.engine).environment_hash(self.config(dep), self.app_dir(dep))
            except KingpostError as exc:
                log.info("no environment known for deployment %s: %s", dep.id, exc.message)
                continue
            if env is not None:
                used.setdefault(env, []).append(dep.id)
        return used

    def venvs(self) -> list[tuple[VenvInfo, list[str]]]:
        """Every environment under ``{home}/envs`` with the deployments that use it."""
        used = self.venvs_in_use()
        return [(v, used.get(v.hash, [])) for v in list_environments(self.settings.envs_dir)]

    def gc_venvs(self) -> GcReport:
        """Remove the environments no deployment uses (see :mod:`kingpost.envs.gc`)."""
        started = time.time()
        return collect(self.settings.envs_dir, set(self.venvs_in_use()), started)

    # -- disk ---------------------------------------------------------------------------
    def gc_disk_logged(self) -> None:
        try:
            self.gc_disk()
        except Exception:
            log.exception("disk gc failed")

    def gc_disk(self) -> DiskReport:
        """Remove uploaded projects and replica directories nothing needs any more (see
        :mod:`kingpost.housekeeping`)."""
        deployments = self.store.list_deployments()  # deleted ones left out
        report = collect_disk(
            self.settings.projects_dir,
            self.settings.replicas_dir,
            projects_in_use={d.project_hash for d in deployments},
            live_deployments={d.id for d in deployments},
            running_replicas=self._running(),
            now=time.time(),
        )
        if report.removed:
            log.info(
                "disk gc: removed %d entries (%d bytes)", len(report.removed), report.removed_bytes
            )
        for error in report.errors:
            log.warning("disk gc: %s", error)
        return report
