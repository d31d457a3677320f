"""The controller places replicas on devices: the fake engine, a real SQLite store, and
an inventory given at the seam (``Controller(gpus=...)``)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from kingpost.controller.loop import Controller
from kingpost.engines.fake import FakeEngine
from kingpost.errors import EngineError
from kingpost.gpus import Gpu, Inventory
from kingpost.packaging import pack_project, unpack_project
from kingpost.secrets_box import SecretBox, load_or_create_key
from kingpost.settings import Settings
from kingpost.store import (
    Database,
    DeploymentStatus,
    DesiredState,
    NewDeployment,
    RolloutStatus,
    Store,
)

SERVER = """\
model_name: gpu
docker_server:
  start_command: python server.py
  server_port: 8000
  predict_endpoint: /predict
  readiness_endpoint: /health
  liveness_endpoint: /health
"""
L4 = SERVER + "resources:\n  accelerator: L4\n"
ONE_L4 = Inventory((Gpu("0", "GPU-l4", "NVIDIA L4", 22 * 1024**3),), source="test")


class Rig:
    def __init__(self, tmp_path: Path, inventory: Inventory = ONE_L4, **settings: object) -> None:
        self.tmp_path = tmp_path
        self.settings = Settings(home=tmp_path / "home", **settings)  # type: ignore[arg-type]
        db = Database(self.settings.db_url)
        db.migrate()
        self.store = Store(db, SecretBox(load_or_create_key(self.settings.home, None)))
        self.engine = FakeEngine()
        self.inventory = inventory
        self.now = 1000.0
        self.controller = self.new_controller()
        self.projects: dict[str, str] = {}

    def new_controller(self) -> Controller:
        c = Controller(self.settings, self.store, engines={"fake": self.engine},
                       gpus=lambda: self.inventory, clock=lambda: self.now)  # fmt: skip
        c.gpus.read()
        return c

    def deploy(
        self,
        config: str = L4,
        min_replicas: int = 1,
        environment: str | None = None,
        development: bool = False,
    ) -> str:
        if config not in self.projects:
            project = self.tmp_path / f"project{len(self.projects)}"
            project.mkdir()
            (project / "config.yaml").write_text(config)
            packed = pack_project(project)
            unpack_project(packed.data, self.settings.projects_dir / packed.sha256)
            self.projects[config] = packed.sha256
        new = NewDeployment(model_name="gpu", project_hash=self.projects[config], config={},
                            engine="fake", min_replicas=min_replicas, environment=environment,
                            development=development,
                            max_replicas=max(1, min_replicas))  # fmt: skip
        return self.store.create_deployment(new).id

    def gpus_of(self, dep: str) -> list[tuple[str, ...] | None]:
        return [self.engine.specs[r].gpus for r in self.engine.live(dep)]

    def passes(self, n: int = 2) -> None:
        """``n`` passes, a second apart."""
        for _ in range(n):
            self.controller.reconcile_once()
            self.now += 1.0


def test_the_second_one_gpu_deployment_waits_then_starts_when_the_first_goes(
    tmp_path: Path,
) -> None:
    rig = Rig(tmp_path)
    first = rig.deploy()
    rig.passes()
    assert rig.gpus_of(first) == [("GPU-l4",)]
    second = rig.deploy()
    rig.passes()
    assert rig.engine.live(second) == []
    view = rig.store.get_deployment(second)
    assert view.status == DeploymentStatus.DEPLOYING
    assert view.message == "waiting for 1\u00d7L4: 0 free of 1"
    assert rig.store.get_deployment(first).status == DeploymentStatus.ACTIVE

    rig.store.set_desired(first, DesiredState.INACTIVE)
    rig.passes(3)  # the first is stopped; its process may hold the device a grace longer
    assert rig.engine.live(first) == [] and rig.engine.live(second) == []
    assert rig.settings.stop_grace_period == 5
    rig.passes(5)  # past the grace: released, and the second placed and ready
    assert rig.gpus_of(second) == [("GPU-l4",)]
    assert rig.store.get_deployment(second).status == DeploymentStatus.ACTIVE
    held = rig.controller.gpus.held()
    assert [(d, devices) for d, devices in held.values()] == [(second, ("GPU-l4",))]


def test_a_scale_up_that_cannot_be_placed_waits_with_the_reason(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    dep = rig.deploy(min_replicas=2)
    rig.passes(3)
    assert rig.gpus_of(dep) == [("GPU-l4",)]
    view = rig.store.get_deployment(dep)
    assert view.status == DeploymentStatus.ACTIVE  # one serves
    assert view.message == "waiting for 1\u00d7L4: 0 free of 1"


def test_replicas_that_ask_for_no_gpu_see_none_where_the_host_has_some(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    dep = rig.deploy(SERVER)
    rig.passes()
    assert rig.gpus_of(dep) == [()]  # CUDA_VISIBLE_DEVICES="" hides every GPU
    bare = Rig(tmp_path / "bare", inventory=Inventory())
    dep = bare.deploy(SERVER)
    bare.passes()
    assert bare.gpus_of(dep) == [None]  # no GPU here: the environment is left alone


def test_a_restarted_controller_readopts_assignments_and_releases_gone_ones(
    tmp_path: Path,
) -> None:
    two = (Gpu("0", "GPU-a", "NVIDIA L4", 0), Gpu("1", "GPU-b", "NVIDIA L4", 0))
    rig = Rig(tmp_path, inventory=Inventory(two, source="test"))
    kept, gone = rig.deploy(), rig.deploy()
    rig.passes()
    assert rig.gpus_of(kept) == [("GPU-a",)] and rig.gpus_of(gone) == [("GPU-b",)]
    # The control plane restarts; the engine kept one replica (as docker keeps containers)
    # and lost the other.
    rig.store.set_desired(gone, DesiredState.INACTIVE)
    rig.engine.stop(rig.engine.live(gone)[0])
    rig.controller = rig.new_controller()
    third = rig.deploy()
    rig.passes()
    assert rig.gpus_of(kept) == [("GPU-a",)]  # untouched
    assert rig.gpus_of(third) == [("GPU-b",)]  # the gone replica's device, not the kept one's


def test_a_start_the_engine_refuses_releases_the_devices(tmp_path: Path) -> None:
    rig = Rig(tmp_path)

    def refuse(spec: object) -> None:
        raise EngineError("no room")

    rig.engine.start = refuse  # type: ignore[method-assign]
    dep = rig.deploy()
    rig.passes(1)
    assert rig.store.get_deployment(dep).status == DeploymentStatus.FAILED
    assert rig.controller.gpus.held() == {}


def test_ignore_runs_what_the_host_lacks_on_cpu_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rig = Rig(tmp_path, accelerators="ignore")
    h100 = rig.deploy(SERVER + "resources:\n  accelerator: H100\n")
    l4 = rig.deploy()
    with caplog.at_level(logging.WARNING, logger="kingpost.controller.gpus"):
        rig.passes()
    assert rig.gpus_of(h100) == [()]  # on CPU, every GPU hidden
    assert rig.gpus_of(l4) == [("GPU-l4",)]  # what the host has is still placed
    assert "runs on CPU as KINGPOST_ACCELERATORS=ignore says" in caplog.text


def test_sharing_lets_two_replicas_onto_one_device(tmp_path: Path) -> None:
    rig = Rig(tmp_path, gpu_sharing=True)
    a, b = rig.deploy(), rig.deploy()
    rig.passes()
    assert rig.gpus_of(a) == rig.gpus_of(b) == [("GPU-l4",)]


def test_a_rolling_promotion_on_a_full_machine_makes_room_and_says_so(tmp_path: Path) -> None:
    two = (Gpu("0", "GPU-a", "NVIDIA L4", 0), Gpu("1", "GPU-b", "NVIDIA L4", 0))
    rig = Rig(tmp_path, inventory=Inventory(two, source="test"))
    first = rig.deploy(min_replicas=2)
    rig.passes()
    assert sorted(rig.gpus_of(first)) == [("GPU-a",), ("GPU-b",)]  # the machine is full
    rolling = {"rolling_deploy": True, "rolling_deploy_config": {"max_surge_percent": 50}}
    rig.store.set_promotion_settings("gpu", "production", rolling)
    second = rig.deploy(min_replicas=2, environment="production")
    messages = set()
    for _ in range(30):
        rig.passes(1)
        rollout = rig.store.latest_rollout("gpu", "production")
        assert rollout is not None
        messages.add(rollout.message)
        held = [d for _, d in rig.controller.gpus.held().values()]
        assert len(held) == len(set(held)) <= 2  # never a device twice
        assert len(rig.engine.live(first)) + len(rig.engine.live(second)) >= 1  # no outage
    assert rollout.status == RolloutStatus.SUCCEEDED, rollout
    assert sorted(rig.gpus_of(second)) == [("GPU-a",), ("GPU-b",)]
    assert rig.engine.live(first) == []
    assert any("a previous replica stops first" in m for m in messages), messages


def test_a_users_own_kind_names_devices_through_the_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KINGPOST_ACCELERATOR_NAMES", '{"MYCARD": "NVIDIA L4"}')
    rig = Rig(tmp_path)
    dep = rig.deploy(SERVER + "resources:\n  accelerator: MYCARD\n")
    rig.passes()
    assert rig.gpus_of(dep) == [("GPU-l4",)]


def test_a_development_swap_on_a_full_machine_stops_the_old_replica_first(
    tmp_path: Path,
) -> None:
    rig = Rig(tmp_path)
    dep = rig.deploy(development=True)
    rig.passes()
    (old,) = rig.engine.live(dep)
    view = rig.store.get_deployment(dep)
    rig.store.set_development_project(dep, view.project_hash, {}, view.activation + 1)
    rig.passes(1)
    message = rig.store.get_deployment(dep).message
    assert message.startswith("waiting for 1\u00d7L4: 0 free of 1"), message
    assert "the running replica stops first" in message
    assert rig.engine.live(dep) == []  # stopped, its device free after the grace
    rig.passes(7)
    (new,) = rig.engine.live(dep)
    assert new != old and rig.gpus_of(dep) == [("GPU-l4",)]
    assert rig.store.get_deployment(dep).status == DeploymentStatus.ACTIVE


def test_devices_stay_held_while_the_engine_that_runs_them_cannot_be_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restarted control plane whose engine (docker, which keeps its containers) cannot
    be created at first must not free that engine's replicas' devices: they still run, and
    the engine adopts them once it comes back."""
    import kingpost.controller.loop as loop

    rig = Rig(tmp_path, inventory=Inventory((Gpu("0", "GPU-a", "NVIDIA L4", 0),), source="t"))
    kept = rig.deploy()
    rig.passes()
    assert rig.gpus_of(kept) == [("GPU-a",)]

    def unavailable(name: str, settings: Settings) -> FakeEngine:
        raise EngineError(f"engine {name} is unavailable now")

    monkeypatch.setattr(loop, "create_engine", unavailable)
    rig.controller = Controller(rig.settings, rig.store, gpus=lambda: rig.inventory,
                                clock=lambda: rig.now)  # fmt: skip
    rig.controller.start()  # logs the engine as unavailable, runs the first pass
    rig.controller.stop()
    rig.passes(8)  # well past the stop grace period
    assert [d for d, _ in rig.controller.gpus.held().values()] == [kept]
    # The engine comes back with the replica it kept: the device is still its own.
    monkeypatch.setattr(loop, "create_engine", lambda name, settings: rig.engine)
    rig.passes(8)
    assert rig.gpus_of(kept) == [("GPU-a",)]
    assert [d for d, _ in rig.controller.gpus.held().values()] == [kept]
