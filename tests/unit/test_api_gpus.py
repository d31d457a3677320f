"""GPU surfaces of the API in-process: the push check against the inventory, GET /v1/gpus,
and each replica's devices in a deployment's description."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from kingpost.api import ControlPlane, create_app
from kingpost.cli.gpus import gpu_rows
from kingpost.config import Accelerator
from kingpost.controller.loop import Controller
from kingpost.gpus import Gpu, Inventory
from kingpost.packaging import pack_project
from kingpost.serve import bootstrap
from kingpost.settings import Settings

CONFIG = """\
model_name: gpu-api
docker_server:
  start_command: python server.py
  server_port: 8000
  predict_endpoint: /predict
  readiness_endpoint: /health
  liveness_endpoint: /health
resources:
  accelerator: {accelerator}
"""
ONE_L4 = Inventory((Gpu("0", "GPU-l4", "NVIDIA L4", 22 * 1024**3),), source="test")

Api = tuple[TestClient, ControlPlane]


@pytest.fixture
def make_api(tmp_path: Path) -> Iterator[Callable[..., Api]]:
    clients: list[TestClient] = []

    def make(inventory: Inventory = ONE_L4, **settings: object) -> Api:
        s = Settings(home=tmp_path / "home", **settings)  # type: ignore[arg-type]
        store = bootstrap(s, lambda _: None, show_key=True)
        key = (s.home / "credentials").read_text().strip()
        plane = ControlPlane(s, store, Controller(s, store, gpus=lambda: inventory))
        plane.controller.gpus.read()
        client = TestClient(create_app(plane))
        client.headers["Authorization"] = f"Api-Key {key}"
        clients.append(client)
        return client, plane

    yield make
    for c in clients:
        c.close()


def push(client: TestClient, tmp_path: Path, accelerator: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    project = tmp_path / f"project-{accelerator.replace(':', '-')}"
    project.mkdir(exist_ok=True)
    (project / "config.yaml").write_text(CONFIG.format(accelerator=accelerator))
    packed = pack_project(project)
    assert client.put(f"/v1/projects/{packed.sha256}", content=packed.data).status_code == 201
    r = client.post("/v1/push", json={"project_hash": packed.sha256})
    return r.status_code, r.json()


def test_a_kind_the_host_lacks_is_refused_at_push_with_the_inventory(
    make_api: Callable[..., Api], tmp_path: Path
) -> None:
    client, _ = make_api()
    for accelerator, why in (("H100", "this host has no H100"), ("L4:2", "this host has 1 L4")):
        status, body = push(client, tmp_path, accelerator)
        assert status == 422, body
        assert why in body["error"] and "0: NVIDIA L4 (22 GiB)" in body["error"]
        assert "KINGPOST_ACCELERATORS=ignore" in body["error"]
        assert body["errors"][0]["path"] == "resources.accelerator"
    assert client.get("/v1/deployments").json() == {"deployments": []}  # nothing was deployed
    status, body = push(client, tmp_path, "L4")
    assert status == 200, body
    assert not any("accelerator" in w for w in body["warnings"])


def test_ignore_accepts_it_with_a_warning_on_every_push(
    make_api: Callable[..., Api], tmp_path: Path
) -> None:
    client, _ = make_api(accelerators="ignore")
    for _ in range(2):
        status, body = push(client, tmp_path, "H100")
        assert status == 200, body
        (warning,) = [w for w in body["warnings"] if "accelerator" in w]
        assert "this host has no H100" in warning and "run on CPU" in warning


def test_gpus_route_and_describe_show_who_holds_each_device(
    make_api: Callable[..., Api], tmp_path: Path
) -> None:
    client, plane = make_api()
    body = client.get("/v1/gpus").json()
    assert body["source"] == "test" and body["accelerators"] == "enforce"
    assert [(d["uuid"], d["held_by"]) for d in body["devices"]] == [("GPU-l4", None)]
    _, pushed = push(client, tmp_path, "L4")
    dep = pushed["deployment"]["id"]
    assert plane.controller.gpus.devices_for(dep, f"{dep}-r1", Accelerator("L4")) == ("GPU-l4",)
    body = client.get("/v1/gpus").json()
    assert body["devices"][0]["held_by"] == {"replica_id": f"{dep}-r1", "deployment_id": dep}
    assert client.get(f"/v1/deployments/{dep}").json()["gpus"] == {f"{dep}-r1": ["0:GPU-l4"]}
    rows = gpu_rows(body)
    assert rows[0]["replica"] == f"{dep}-r1" and rows[0]["memory"] == "22 GiB"


def test_no_gpu_reads_as_an_empty_inventory(make_api: Callable[..., Api]) -> None:
    client, _ = make_api(inventory=Inventory(note="NVML: NVML Shared Library Not Found"))
    body = client.get("/v1/gpus").json()
    assert body["devices"] == [] and "Shared Library" in body["note"]
