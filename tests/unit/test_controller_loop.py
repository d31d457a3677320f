"""The reconcile loop against the fake engine and a real SQLite store."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from kingpost._cancel import current as current_cancel
from kingpost.config import TrussConfig
from kingpost.controller.loop import TABLE_REFRESH_S, Controller
from kingpost.engines.base import BuildLog, Prepared, ReplicaPhase
from kingpost.engines.fake import FakeEngine
from kingpost.errors import BuildError
from kingpost.gateway.table import DeploymentState, RoutingTable
from kingpost.packaging import pack_project, unpack_project
from kingpost.secrets_box import SecretBox, load_or_create_key
from kingpost.server.contract import ENVIRONMENT_ENV, ENVIRONMENT_KEY
from kingpost.settings import Settings
from kingpost.store import (
    Database,
    DeploymentStatus,
    DesiredState,
    NewDeployment,
    Store,
    hash_api_key,
)

CONFIG = """\
model_name: loop
docker_server:
  start_command: python server.py
  server_port: 8000
  predict_endpoint: /predict
  readiness_endpoint: /health
  liveness_endpoint: /health
"""


class Rig:
    def __init__(
        self,
        tmp_path: Path,
        config: str = CONFIG,
        engine: FakeEngine | None = None,
        build_timeout: float = 1800.0,
    ) -> None:
        self.settings = Settings(home=tmp_path / "home", build_timeout=build_timeout)
        db = Database(self.settings.db_url)
        db.migrate()
        self.store = Store(db, SecretBox(load_or_create_key(self.settings.home, None)))
        self.engine = engine or FakeEngine()
        self.pushed: list[RoutingTable] = []
        self.controller = Controller(
            self.settings, self.store, push=self.pushed.append, engines={"fake": self.engine}
        )
        project = tmp_path / "project"
        project.mkdir()
        (project / "config.yaml").write_text(config)
        packed = pack_project(project)
        unpack_project(packed.data, self.settings.projects_dir / packed.sha256)
        self.sha = packed.sha256

    def deploy(self, **kw: object) -> str:
        new = NewDeployment(
            model_name="loop", project_hash=self.sha, config={}, engine="fake", **kw
        )  # type: ignore[arg-type]
        return self.store.create_deployment(new).id


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp_path)


def test_deployment_becomes_active_and_routable(rig: Rig) -> None:
    dep = rig.deploy()
    rig.controller.reconcile_once()
    assert len(rig.engine.live(dep)) == 1
    spec = rig.engine.specs[rig.engine.live(dep)[0]]
    assert (spec.server_port, spec.predict_path, spec.command) == (
        8000,
        "/predict",
        "python server.py",
    )
    rig.controller.reconcile_once()
    assert rig.store.get_deployment(dep).status == DeploymentStatus.ACTIVE
    table = rig.pushed[-1]
    route = table.deployments[dep]
    assert route.state == DeploymentState.SERVING and len(route.upstreams) == 1
    model = next(iter(table.models.values()))
    assert model.environments["production"] == ((dep, 1.0),)
    assert table.model_names["loop"] == model.model_id


def test_table_is_pushed_only_when_it_changes(tmp_path: Path) -> None:
    """Once nothing changes, passes push nothing (until the refresh for restarted gateways,
    which sends the same version); a change pushes the next version at once."""
    now = [1000.0]
    rig = Rig(tmp_path)
    rig.controller = Controller(
        rig.settings, rig.store, push=rig.pushed.append, engines={"fake": rig.engine},
        clock=lambda: now[0],
    )  # fmt: skip
    dep = rig.deploy()
    for _ in range(3):  # start, ready, ACTIVE: the table settles
        rig.controller.reconcile_once()
    settled = len(rig.pushed)
    version = rig.controller.table.version
    assert rig.pushed[-1].version == version
    for _ in range(5):
        rig.controller.reconcile_once()
    assert len(rig.pushed) == settled, [t.version for t in rig.pushed[settled:]]
    now[0] += TABLE_REFRESH_S
    rig.controller.reconcile_once()
    assert [t.version for t in rig.pushed[settled:]] == [version]  # the refresh, unchanged
    rig.store.set_desired(dep, DesiredState.INACTIVE)
    rig.controller.reconcile_once()
    assert rig.pushed[-1].version == version + 1
    assert rig.pushed[-1].deployments[dep].state == DeploymentState.INACTIVE


def test_replicas_follow_min_replicas_and_deactivation(rig: Rig) -> None:
    dep = rig.deploy(min_replicas=3, max_replicas=3)
    rig.controller.reconcile_once()
    assert len(rig.engine.live(dep)) == 3
    rig.store.set_desired(dep, DesiredState.INACTIVE)
    rig.controller.reconcile_once()
    assert rig.engine.live(dep) == []
    assert rig.store.get_deployment(dep).status == DeploymentStatus.INACTIVE
    assert rig.pushed[-1].deployments[dep].state == DeploymentState.INACTIVE


def test_failed_replica_fails_the_deployment_until_reactivated(rig: Rig) -> None:
    dep = rig.deploy()
    rig.controller.reconcile_once()
    (rid,) = rig.engine.live(dep)
    rig.engine.set_phase(rid, ReplicaPhase.FAILED, "Traceback: boom")
    rig.controller.reconcile_once()
    view = rig.store.get_deployment(dep)
    assert view.status == DeploymentStatus.FAILED and "boom" in view.message
    assert rig.engine.live(dep) == [rid]  # not retried by the controller
    rig.store.set_desired(dep, DesiredState.INACTIVE)
    rig.controller.reconcile_once()
    rig.store.set_desired(dep, DesiredState.ACTIVE)
    rig.controller.reconcile_once()
    assert rig.engine.live(dep) and rig.engine.live(dep) != [rid]


def test_missing_secret_keeps_replicas_off_until_it_is_set(tmp_path: Path) -> None:
    rig = Rig(tmp_path, CONFIG + "secrets:\n  token: null\n")
    dep = rig.deploy()
    rig.controller.reconcile_once()
    view = rig.store.get_deployment(dep)
    assert view.status == DeploymentStatus.FAILED and "token" in view.message
    assert rig.engine.live(dep) == []
    rig.store.set_secret("token", "t0k")
    rig.controller.reconcile_once()
    (rid,) = rig.engine.live(dep)
    assert rig.engine.specs[rid].secrets == {"token": "t0k"}


def test_a_secret_deleted_under_running_replicas_is_a_note_not_a_flapping_status(
    tmp_path: Path,
) -> None:
    rig = Rig(tmp_path, CONFIG + "secrets:\n  token: null\n")
    rig.store.set_secret("token", "t0k")
    dep = rig.deploy()
    rig.controller.reconcile_once()
    (rid,) = rig.engine.live(dep)
    rig.engine.set_phase(rid, ReplicaPhase.READY)
    rig.controller.reconcile_once()
    assert rig.store.get_deployment(dep).status == DeploymentStatus.ACTIVE
    rig.store.delete_secret("token")
    seen = set()
    for _ in range(4):
        rig.controller.reconcile_once()
        view = rig.store.get_deployment(dep)
        seen.add((view.status, view.message, view.updated_at))
    # The running replica keeps its files and its traffic; the deployment says what a new
    # replica would lack, and is not rewritten from pass to pass (it was: FAILED, then
    # ACTIVE again, in every pass).
    (status, message, _) = seen.pop()
    assert not seen, seen
    assert status == DeploymentStatus.ACTIVE and "token" in message
    assert rig.engine.live(dep) == [rid]
    assert rig.pushed[-1].deployments[dep].state == DeploymentState.SERVING
    rig.store.set_secret("token", "again")
    rig.controller.reconcile_once()
    assert rig.store.get_deployment(dep).message == ""


class FlakyBuild(FakeEngine):
    """Its first build fails, as an install does when the package index drops a download."""

    def __init__(self) -> None:
        super().__init__()
        self.builds = 0

    def prepare(self, config: TrussConfig, app_dir: Path, log: BuildLog) -> Prepared:
        self.builds += 1
        if self.builds == 1:
            log("error: connection reset while downloading torch")
            raise BuildError("installing requirements failed (exit 1)")
        return Prepared()


def _settle(rig: Rig, dep: str, *statuses: DeploymentStatus) -> DeploymentStatus:
    deadline = time.monotonic() + 10
    while (status := rig.store.get_deployment(dep).status) not in statuses:
        assert time.monotonic() < deadline, status
        rig.controller.reconcile_once()
        time.sleep(0.01)
    return status


def test_activating_a_deployment_whose_build_failed_builds_it_again(tmp_path: Path) -> None:
    rig = Rig(tmp_path, engine=FlakyBuild())
    dep = rig.deploy()
    _settle(rig, dep, DeploymentStatus.BUILD_FAILED)
    for _ in range(3):  # left alone, a failed build is not retried
        rig.controller.reconcile_once()
    assert (rig.engine.builds, rig.engine.live(dep)) == (1, [])
    rig.store.set_desired(dep, DesiredState.ACTIVE)
    assert _settle(rig, dep, DeploymentStatus.ACTIVE, DeploymentStatus.BUILD_FAILED) == (
        DeploymentStatus.ACTIVE
    )
    assert rig.engine.builds == 2 and len(rig.engine.live(dep)) == 1


class HangingBuild(FakeEngine):
    """Its first ``hang`` builds never finish until cancelled, as uv's does on a
    ``setup.py`` that sleeps; later builds finish at once."""

    def __init__(self, hang: int) -> None:
        super().__init__()
        self.hang = hang
        self.builds = 0
        self.stopped_because: list[str] = []
        self._builds_lock = threading.Lock()

    def prepare(self, config: TrussConfig, app_dir: Path, log: BuildLog) -> Prepared:
        with self._builds_lock:
            self.builds += 1
            hangs = self.builds <= self.hang
        if not hangs:
            return Prepared()
        log("Building slowpkg @ file:///srv/slowpkg")
        switch = current_cancel()
        deadline = time.monotonic() + 30
        while switch.reason is None and time.monotonic() < deadline:
            time.sleep(0.01)
        with self._builds_lock:
            self.stopped_because.append(str(switch.reason))
        raise BuildError(f"installing requirements was stopped: {switch.reason}")


def _wait(what: str, check: Callable[[], object], rig: Rig | None = None) -> None:
    deadline = time.monotonic() + 10
    while not check():
        assert time.monotonic() < deadline, what
        if rig is not None:
            rig.controller.reconcile_once()
        time.sleep(0.01)


def test_hung_builds_do_not_hold_up_another_deployments_build(tmp_path: Path) -> None:
    """With a pool of two workers, two builds that never end kept a third, quick one
    BUILDING forever."""
    engine = HangingBuild(hang=2)
    rig = Rig(tmp_path, engine=engine)
    deps = [rig.deploy() for _ in range(3)]
    try:
        _wait(
            "one deployment to become ACTIVE",
            lambda: (
                [rig.store.get_deployment(d).status for d in deps].count(DeploymentStatus.ACTIVE)
                == 1
            ),
            rig,
        )
        statuses = sorted(rig.store.get_deployment(d).status for d in deps)
        assert statuses == [DeploymentStatus.ACTIVE, *[DeploymentStatus.BUILDING] * 2]
    finally:
        rig.controller.stop()


def test_deactivating_or_deleting_a_deployment_cancels_its_build(tmp_path: Path) -> None:
    engine = HangingBuild(hang=2)
    rig = Rig(tmp_path, engine=engine)
    deactivated, deleted = rig.deploy(), rig.deploy()
    rig.controller.reconcile_once()
    _wait("both builds to run", lambda: engine.builds == 2)
    rig.store.set_desired(deactivated, DesiredState.INACTIVE)
    rig.store.set_desired(deleted, DesiredState.DELETED)
    rig.controller.reconcile_once()
    _wait("both builds to be stopped", lambda: len(engine.stopped_because) == 2)
    assert sorted(engine.stopped_because) == [
        "the deployment was deactivated",
        "the deployment was deleted",
    ]
    assert rig.store.get_deployment(deactivated).status == DeploymentStatus.INACTIVE
    # Activating it again builds it afresh (this third build finishes).
    rig.store.set_desired(deactivated, DesiredState.ACTIVE)
    _wait(
        "the re-activated deployment to be ACTIVE",
        lambda: rig.store.get_deployment(deactivated).status == DeploymentStatus.ACTIVE,
        rig,
    )
    assert engine.builds == 3


class CountingBuild(FakeEngine):
    def __init__(self) -> None:
        super().__init__()
        self.builds = 0

    def prepare(self, config: TrussConfig, app_dir: Path, log: BuildLog) -> Prepared:
        self.builds += 1
        log(f"build {self.builds}: Step 1/1")
        return Prepared()


def test_a_finished_build_outlives_deactivation_with_its_log(tmp_path: Path) -> None:
    """Cancelling builds on deactivation dropped finished ones too: the deployment's build
    log was gone from ``kingpost logs`` and re-activating it built it again."""
    rig = Rig(tmp_path, engine=CountingBuild())
    dep = rig.deploy()
    _settle(rig, dep, DeploymentStatus.ACTIVE)
    rig.store.set_desired(dep, DesiredState.INACTIVE)
    _settle(rig, dep, DeploymentStatus.INACTIVE)
    rig.controller.reconcile_once()
    assert _build_log(rig, dep) == ["build 1: Step 1/1"]
    rig.store.set_desired(dep, DesiredState.ACTIVE)
    _settle(rig, dep, DeploymentStatus.ACTIVE)
    assert rig.engine.builds == 1


def _build_log(rig: Rig, dep: str, *, marks: bool = False) -> list[str]:
    """The deployment's build lines in ``kingpost logs``; with ``marks``, the lines that
    say when each build started and how it ended as ``started``/``finished``/..."""
    out = []
    for line in rig.controller.logs(rig.store.get_deployment(dep), tail=10_000):
        if line.replica_id != "build":
            continue
        if line.text.startswith("--- build "):
            if marks:
                out.append(line.text.split()[2])
        else:
            out.append(line.text)
    return out


def test_build_logs_outlive_a_control_plane_restart(tmp_path: Path) -> None:
    """Build output lived in memory only: after a restart ``kingpost logs`` lost why a
    build failed. Each build's lines now go to a file, after the builds before it."""
    rig = Rig(tmp_path, engine=FlakyBuild())
    dep = rig.deploy()
    _settle(rig, dep, DeploymentStatus.BUILD_FAILED)
    rig.controller.stop()
    engine = CountingBuild()
    rig.controller = Controller(rig.settings, rig.store, engines={"fake": engine})
    assert _build_log(rig, dep, marks=True) == [
        "started",
        "error: connection reset while downloading torch",
        "failed",
    ]
    # The failure stands across the restart; re-activating builds again, after it.
    for _ in range(3):
        rig.controller.reconcile_once()
    assert (engine.builds, rig.store.get_deployment(dep).status) == (
        0,
        DeploymentStatus.BUILD_FAILED,
    )
    rig.store.set_desired(dep, DesiredState.ACTIVE)
    _settle(rig, dep, DeploymentStatus.ACTIVE)
    assert _build_log(rig, dep, marks=True) == [
        "started",
        "error: connection reset while downloading torch",
        "failed",
        "started",
        "build 1: Step 1/1",
        "finished",
    ]
    # A stopped build says why it stopped.
    hanging = HangingBuild(hang=2)  # this one's and the re-check of the first one's
    rig.controller = Controller(rig.settings, rig.store, engines={"fake": hanging})
    other = rig.deploy()
    rig.controller.reconcile_once()
    _wait("the builds to run", lambda: hanging.builds == 2)
    rig.store.set_desired(other, DesiredState.INACTIVE)
    rig.controller.reconcile_once()
    _wait("the build to stop", lambda: _build_log(rig, other, marks=True)[-1:] == ["stopped:"])
    last = rig.controller.logs(rig.store.get_deployment(other))[-1].text
    assert last.startswith("--- build stopped: the deployment was deactivated after ")
    rig.controller.stop()


def test_a_deleted_deployments_build_log_goes_with_it(tmp_path: Path) -> None:
    rig = Rig(tmp_path, engine=CountingBuild())
    kept, deleted, deleted_while_down = rig.deploy(), rig.deploy(), rig.deploy()
    for dep in (kept, deleted, deleted_while_down):
        _settle(rig, dep, DeploymentStatus.ACTIVE)
    logs = rig.settings.builds_dir
    assert sorted(p.name for p in logs.iterdir()) == sorted(
        f"build-{d}.log" for d in (kept, deleted, deleted_while_down)
    )
    rig.store.set_desired(deleted, DesiredState.DELETED)
    rig.controller.reconcile_once()
    assert not (logs / f"build-{deleted}.log").exists()
    rig.controller.stop()
    rig.store.set_desired(deleted_while_down, DesiredState.DELETED)
    rig.controller = Controller(rig.settings, rig.store, engines={"fake": CountingBuild()})
    rig.controller.reconcile_once()
    assert [p.name for p in logs.iterdir()] == [f"build-{kept}.log"]
    assert _build_log(rig, kept)[0] == "build 1: Step 1/1"


def test_a_build_past_its_timeout_is_stopped_and_fails_naming_the_timeout(
    tmp_path: Path,
) -> None:
    engine = HangingBuild(hang=1)
    rig = Rig(tmp_path, engine=engine, build_timeout=0.3)
    dep = rig.deploy()
    _settle(rig, dep, DeploymentStatus.BUILD_FAILED)
    message = rig.store.get_deployment(dep).message
    assert "did not finish within 0.3 s (KINGPOST_BUILD_TIMEOUT)" in message
    assert message.endswith("last output lines:\nBuilding slowpkg @ file:///srv/slowpkg")
    _wait("the build to be stopped", lambda: engine.stopped_because)
    assert "KINGPOST_BUILD_TIMEOUT" in engine.stopped_because[0]
    for _ in range(3):  # the thread's own failure does not replace the message
        rig.controller.reconcile_once()
    assert rig.store.get_deployment(dep).message == message


def test_stopping_the_controller_cancels_running_builds_promptly(tmp_path: Path) -> None:
    engine = HangingBuild(hang=1)
    rig = Rig(tmp_path, engine=engine)
    rig.deploy()
    rig.controller.start()
    _wait("the build to run", lambda: engine.builds == 1)
    started = time.monotonic()
    rig.controller.stop()
    assert time.monotonic() - started < 5
    assert engine.stopped_because == ["the control plane is stopping"]


def test_a_replica_is_told_the_environment_its_deployment_is_in(rig: Rig) -> None:
    first = rig.deploy()  # the model's first deployment goes to production
    second = rig.deploy()
    rig.controller.reconcile_once()
    rig.controller.reconcile_once()
    (in_production,) = rig.engine.live(first)
    (in_none,) = rig.engine.live(second)
    assert json.loads(rig.engine.specs[in_production].env[ENVIRONMENT_ENV]) == {
        "name": "production"
    }
    assert ENVIRONMENT_ENV not in rig.engine.specs[in_none].env


def test_environment_files_follow_promotions_while_replicas_run(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    first = rig.deploy()  # production
    second = rig.deploy()
    rig.controller.reconcile_once()
    rig.controller.reconcile_once()
    root = rig.settings.dynamic_dir

    def told(dep: str) -> str:
        return (root / dep / ENVIRONMENT_KEY).read_text()

    (replica,) = rig.engine.live(second)
    assert rig.engine.specs[replica].dynamic_config_dir == root / second
    assert json.loads(told(first)) == {"name": "production"}
    assert told(second) == ""  # in no environment
    before = (root / first / ENVIRONMENT_KEY).stat().st_ino
    rig.controller.reconcile_once()
    assert (root / first / ENVIRONMENT_KEY).stat().st_ino == before  # unchanged: not rewritten

    rig.store.promote("loop", second, "production")
    rig.store.promote("loop", second, "staging")
    rig.controller.reconcile_once()
    assert json.loads(told(second)) == {"name": "production"}  # production wins over staging
    assert told(first) == ""
    assert rig.engine.live(second) == [replica]  # told in place, not restarted

    # A deleted deployment's directory goes; so does one left by a run that died before
    # it could clean up, once a restarted controller looks.
    rig.store.set_desired(first, DesiredState.DELETED)
    rig.controller.reconcile_once()
    assert not (root / first).exists()
    (root / "gone-while-down").mkdir()
    (root / "gone-while-down" / ENVIRONMENT_KEY).write_text("{}")
    restarted = Controller(rig.settings, rig.store, engines={"fake": rig.engine})
    restarted.reconcile_once()
    assert not (root / "gone-while-down").exists()
    assert json.loads(told(second)) == {"name": "production"}


def test_environment_names_prefer_production_then_the_first_name() -> None:
    from datetime import datetime

    from kingpost.controller.specs import environment_names
    from kingpost.store import EnvironmentView

    now = datetime(2026, 1, 1)
    envs = [
        EnvironmentView("1", "m", "staging", "a", now),
        EnvironmentView("2", "m", "production", "a", now),
        EnvironmentView("3", "m", "qa", "b", now),
        EnvironmentView("4", "m", "beta", "b", now),
        EnvironmentView("5", "m", "empty", None, now),
    ]
    assert environment_names(envs) == {"a": "production", "b": "beta"}


def test_stray_replicas_of_unknown_deployments_are_stopped(rig: Rig) -> None:
    dep = rig.deploy()
    rig.controller.reconcile_once()
    rig.store.promote("loop", rig.deploy(), "production")
    rig.store.set_desired(dep, DesiredState.DELETED)
    rig.controller.reconcile_once()
    assert rig.engine.live(dep) == []
    assert dep not in rig.pushed[-1].deployments


def test_a_failing_step_does_not_stop_the_loop(rig: Rig) -> None:
    dep = rig.deploy()
    broken = rig.deploy()
    rig.store.db.engine.dispose()
    with rig.store.db.session() as s:
        from kingpost.store.models import Deployment

        row = s.get(Deployment, broken)
        assert row is not None
        row.project_hash = "f" * 64  # project missing on disk: config cannot load
    rig.controller.reconcile_once()
    rig.controller.reconcile_once()
    assert rig.store.get_deployment(dep).status == DeploymentStatus.ACTIVE
    assert rig.store.get_deployment(broken).status == DeploymentStatus.FAILED


def test_a_restarted_controller_publishes_first_and_keeps_adopted_replicas(
    tmp_path: Path,
) -> None:
    """After a control-plane restart the engine still runs the replicas: the new
    controller must route to them at once, and not show the deployment as building
    while its (cached) build is checked again."""
    import threading

    from kingpost.engines.base import Prepared

    rig = Rig(tmp_path)
    dep = rig.deploy()
    rig.controller.reconcile_once()
    rig.controller.reconcile_once()
    assert rig.store.get_deployment(dep).status == DeploymentStatus.ACTIVE
    running = rig.engine.live(dep)

    release = threading.Event()

    class SlowBuild(FakeEngine):
        def prepare(self, config: object, app_dir: Path, log: BuildLog) -> Prepared:
            release.wait(10)
            return Prepared()

    adopted = SlowBuild()
    adopted.specs, adopted._status = rig.engine.specs, dict(rig.engine._status)  # adoption
    pushed: list[RoutingTable] = []
    restarted = Controller(rig.settings, rig.store, push=pushed.append, engines={"fake": adopted})
    restarted.start()
    try:
        assert pushed, "no table was published before start() returned"
        assert rig.store.api_key_scopes().admin <= pushed[0].api_key_hashes
        restarted.reconcile_once()
        route = restarted.table.deployments[dep]
        assert route.state == DeploymentState.SERVING
        assert [u.replica_id for u in route.upstreams] == running
        assert rig.store.get_deployment(dep).status == DeploymentStatus.ACTIVE
        assert adopted.live(dep) == running
    finally:
        release.set()
        restarted.stop()


def test_an_engine_refusing_to_start_a_replica_fails_the_deployment(rig: Rig) -> None:
    """What ``start`` raises (a port another deployment holds) is the deployment's status,
    not hidden behind DEPLOYING by the plan's status of the same pass."""
    from kingpost.engines.base import ReplicaSpec
    from kingpost.errors import EngineError

    class Refusing(FakeEngine):
        def start(self, spec: ReplicaSpec) -> None:
            raise EngineError("server_port 8000 is already bound by deployment other")

    rig.controller._engines["fake"] = Refusing()
    dep = rig.deploy()
    for _ in range(3):
        rig.controller.reconcile_once()
    view = rig.store.get_deployment(dep)
    assert view.status == DeploymentStatus.FAILED
    assert "already bound" in view.message
    assert rig.pushed[-1].deployments[dep].state == DeploymentState.INACTIVE


def test_a_replica_that_fails_right_after_the_build_is_not_silently_replaced(
    tmp_path: Path,
) -> None:
    """Only a re-activation replaces failed replicas: moving from BUILDING to DEPLOYING
    while the first replica starts is not one."""
    import threading

    from kingpost.engines.base import Prepared

    release = threading.Event()

    class SlowBuild(FakeEngine):
        def prepare(self, config: object, app_dir: Path, log: BuildLog) -> Prepared:
            release.wait(10)
            return Prepared()

    rig = Rig(tmp_path)
    engine = rig.controller._engines["fake"] = SlowBuild(auto_ready=False)
    dep = rig.deploy()
    rig.controller.reconcile_once()
    assert rig.store.get_deployment(dep).status == DeploymentStatus.BUILDING
    release.set()
    job = rig.controller.builds.jobs._jobs[f"build:{dep}"]
    for _ in range(100):
        if job.state != "running":
            break
        threading.Event().wait(0.02)
    rig.controller.reconcile_once()
    (rid,) = engine.live(dep)
    engine.set_phase(rid, ReplicaPhase.FAILED, "Traceback: crash")
    rig.controller.reconcile_once()
    view = rig.store.get_deployment(dep)
    assert engine.live(dep) == [rid] and engine.started == [rid]
    assert view.status == DeploymentStatus.FAILED and "crash" in view.message


def test_a_failed_replica_fails_the_deployment_in_any_local_timezone(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """West of UTC, a naive ``updated_at`` from SQLite lies hours in the future, so every
    failed replica looked older than a re-activation and was replaced, forever."""
    import time

    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        dep = rig.deploy()
        rig.controller.reconcile_once()
        (rid,) = rig.engine.live(dep)
        rig.engine.set_phase(rid, ReplicaPhase.FAILED, "Traceback: boom")
        rig.controller.reconcile_once()
        assert rig.engine.live(dep) == [rid]
        assert rig.store.get_deployment(dep).status == DeploymentStatus.FAILED
    finally:
        monkeypatch.undo()
        time.tzset()


def test_start_creates_the_default_engine_with_no_deployment_on_it(rig: Rig) -> None:
    """Creating an engine is what clears a killed run's leftovers (test_process_engine),
    so it must happen even when every deployment that used it is gone."""
    controller = Controller(rig.settings, rig.store, push=lambda _: None)
    controller.start()
    try:
        assert set(controller._engines) == {"process"}
    finally:
        controller.stop()


def test_a_long_build_log_keeps_its_end(tmp_path: Path) -> None:
    """A deployment rebuilt many times must not grow its log without end: over
    ``LOG_FILE_MAX`` the file keeps its last ``LOG_FILE_KEEP`` bytes, whole lines only."""
    from kingpost.controller import prepare

    jobs = prepare.Jobs(60, log_dir=tmp_path)
    old = "".join(f"old line {i:07d}\n" for i in range(prepare.LOG_FILE_MAX // 17 + 1000))
    (tmp_path / "build-d.log").write_text(old)
    job = jobs.ensure("build:d", lambda out: out("new line"))
    assert job.thread is not None
    job.thread.join(5)
    size = (tmp_path / "build-d.log").stat().st_size
    assert size < prepare.LOG_FILE_KEEP + 200
    lines = jobs.output("build:d")
    assert lines[-3].startswith("--- build started ") and lines[-2] == "new line"
    assert lines[-1].startswith("--- build finished after ")
    assert all(ln.startswith("old line ") and len(ln) == 16 for ln in lines[:-3])
    assert len(lines) == prepare.OUTPUT_LINES


def _marks(lines: list[str]) -> list[str]:
    """A build log with each ``--- build ...`` line cut to how it starts."""
    return [" ".join(ln.split()[:3]) if ln.startswith("--- build ") else ln for ln in lines]


def test_a_stopped_build_that_runs_on_stays_out_of_its_rebuilds_log(tmp_path: Path) -> None:
    """A cancelled build's thread runs on until what it waits on returns; re-activating
    started the next build of the deployment meanwhile, both appended to one file, and
    the old build's late lines and its ``stopped`` line landed inside the new build's."""
    from kingpost.controller import prepare

    jobs = prepare.Jobs(60, log_dir=tmp_path)
    wrote, release = threading.Event(), threading.Event()

    def stuck(out: BuildLog) -> None:
        out("old: step 1")
        wrote.set()
        release.wait(10)  # a wait the cancel does not end
        out("old: step 2, after it was stopped")

    old = jobs.ensure("build:d", stuck)
    assert wrote.wait(5)
    jobs.cancel("build:d", "the deployment was deactivated")
    new = jobs.ensure("build:d", lambda out: out("new: step 1"))
    assert new.thread is not None and old.thread is not None
    new.thread.join(5)
    release.set()
    old.thread.join(5)
    assert _marks(jobs.output("build:d")) == [
        "--- build started",
        "old: step 1",
        "--- build stopped:",
        "--- build started",
        "new: step 1",
        "--- build finished",
    ]


def test_a_deleted_deployments_build_that_runs_on_leaves_no_log_file(tmp_path: Path) -> None:
    """``cancel_others`` removed the file of a deleted deployment's build, but the build's
    thread, still running, wrote its next line into a new one."""
    from kingpost.controller import prepare

    jobs = prepare.Jobs(60, log_dir=tmp_path)
    running, release = threading.Event(), threading.Event()

    def stuck(out: BuildLog) -> None:
        running.set()
        release.wait(10)
        out("a line after the deployment was deleted")

    job = jobs.ensure("build:gone", stuck)
    assert running.wait(5) and job.thread is not None
    jobs.cancel_others(set(), "the deployment was deleted")
    release.set()
    job.thread.join(5)
    assert list(tmp_path.iterdir()) == []


def test_publish_keys_pushes_a_revocation_at_once_with_the_routes_kept(rig: Rig) -> None:
    """A revoked key must stop working at the gateway before the revocation answers, not
    at the next pass (which keeps it out too)."""
    from kingpost.store import ApiKeyKind

    dep = rig.deploy()
    rig.controller.reconcile_once()
    rig.controller.reconcile_once()
    model_id = rig.store.get_deployment(dep).model_id
    view, key = rig.store.create_api_key("ci", ApiKeyKind.INVOKE, [model_id])
    rig.controller.routing.publish_keys()
    table = rig.pushed[-1]
    assert table.invoke_keys == {hash_api_key(key): frozenset({model_id})}
    assert table.deployments[dep].state == DeploymentState.SERVING  # routes unchanged
    rig.store.revoke_api_key(view.prefix)
    before = len(rig.pushed)
    rig.controller.routing.publish_keys()
    assert len(rig.pushed) == before + 1 and rig.pushed[-1].invoke_keys == {}
    assert rig.pushed[-1].version == table.version + 1
    rig.controller.reconcile_once()
    assert rig.pushed[-1].invoke_keys == {}


def test_publish_keys_before_the_first_pass_pushes_nothing(rig: Rig) -> None:
    rig.controller.routing.publish_keys()
    assert rig.pushed == []


def test_the_loop_counts_its_passes_their_time_and_the_steps_that_raised(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    dep = rig.deploy()
    rig.controller.reconcile_once()
    stats = rig.controller.stats
    assert (stats.passes, stats.failed_passes, stats.step_errors) == (1, 0, 0)
    assert 0 < stats.last_pass_s <= stats.max_pass_s <= stats.total_pass_s

    def boom(*_: object) -> None:
        raise RuntimeError("engine lost")

    monkeypatch.setattr(rig.controller, "_reconcile", boom)
    rig.controller.reconcile_once()  # a step that raises is counted, not raised
    assert (stats.passes, stats.last_step_errors, stats.step_errors) == (2, 1, 1)
    view = rig.store.get_deployment(dep)
    assert view.status == DeploymentStatus.FAILED and "engine lost" in view.message
    monkeypatch.setattr(rig.store, "routing_snapshot", boom)
    with pytest.raises(RuntimeError):
        rig.controller.reconcile_once()
    assert (stats.passes, stats.failed_passes, stats.last_step_errors) == (3, 1, 0)


def test_the_gateways_stats_are_pulled_once_a_second_and_a_failure_is_skipped(
    tmp_path: Path,
) -> None:
    from kingpost.gateway.stats import DeploymentStats, GatewayStats

    now, pulls = [1000.0], []

    def pull() -> GatewayStats:
        pulls.append(now[0])
        if len(pulls) == 2:
            raise OSError("gateway restarting")
        return GatewayStats({"d": DeploymentStats(queued=len(pulls))})

    rig = Rig(tmp_path)
    rig.controller = Controller(
        rig.settings, rig.store, engines={"fake": rig.engine}, pull_stats=pull,
        clock=lambda: now[0],
    )  # fmt: skip
    rig.controller.reconcile_once()
    rig.controller.reconcile_once()  # within the second: no pull
    assert pulls == [1000.0]
    stats = rig.controller.gateway_stats
    assert stats is not None and stats.deployments["d"].queued == 1
    now[0] += 1.0
    rig.controller.reconcile_once()  # fails: the last figures stay
    assert rig.controller.gateway_stats is stats
    now[0] += 1.0
    rig.controller.reconcile_once()
    assert rig.controller.gateway_stats.deployments["d"].queued == 3


class KeepingEngine(FakeEngine):
    """An engine whose replicas outlive the control plane, as docker's containers do."""

    keeps_replicas = True

    def kept_replicas_hint(self) -> str:
        return "remove-them-by-hand"


@pytest.mark.parametrize("stop_replicas", [False, True])
def test_stopping_says_what_an_engine_leaves_running_or_stops_it(
    tmp_path: Path, stop_replicas: bool
) -> None:
    """Ctrl-C of `kingpost server` printed nothing while docker replicas kept running."""
    rig = Rig(tmp_path, engine=KeepingEngine())
    if stop_replicas:
        rig.controller.settings = rig.settings.model_copy(update={"stop_replicas_on_exit": True})
    dep = rig.deploy(min_replicas=2)
    rig.controller.reconcile_once()
    rig.controller.reconcile_once()
    assert len(rig.engine.live(dep)) == 2
    said = rig.controller.stop()
    if stop_replicas:
        assert said == [] and rig.engine.live(dep) == []
    else:
        (line,) = said
        assert line.startswith("2 replica(s) of 1 deployment(s) left running on the fake engine")
        assert "--stop-replicas-on-exit" in line and line.endswith("remove-them-by-hand")
        assert len(rig.engine.live(dep)) == 2
    assert rig.engine.closed
