"""GPU placement against a real `kingpost server` on the process engine, with real
replicas: the inventory is injected at the seam (KINGPOST_FAKE_GPUS, a JSON file), so
these run on machines without a GPU."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers.platform import EXAMPLES, Platform, wait_for

L4_UUID = "GPU-0aa1b2c3-0000-4000-8000-00000000004c"


@pytest.fixture
def gpu_platform(tmp_path: Path) -> Iterator[Platform]:
    fake = tmp_path / "gpus.json"
    fake.write_text(json.dumps([{"uuid": L4_UUID, "name": "NVIDIA L4", "memory_mib": 23034}]))
    p = Platform(tmp_path / "home", extra_env={"KINGPOST_FAKE_GPUS": str(fake)}).start()
    try:
        yield p
    finally:
        p.stop()


def _project(tmp_path: Path, name: str, accelerator: str | None) -> Path:
    project = tmp_path / name
    shutil.copytree(EXAMPLES / "echo-server", project)
    text = (project / "config.yaml").read_text().replace("echo-server", name)
    if accelerator:
        text += f"resources:\n  accelerator: {accelerator}\n"
    (project / "config.yaml").write_text(text)
    return project


def _push(p: Platform, project: Path, *flags: str) -> dict[str, Any]:
    out = p.cli("push", str(project), "--output", "json", *flags)
    assert out.returncode == 0, out.stdout + out.stderr
    return dict(json.loads(out.stdout))


def _env(p: Platform, model_id: str) -> dict[str, str]:
    with p.gateway() as gw:
        r = gw.get(f"/models/{model_id}/environments/production/sync/env")
        assert r.status_code == 200, r.text
        return dict(r.json()["env"])


def test_one_gpu_two_deployments_the_second_waits_then_starts(
    gpu_platform: Platform, tmp_path: Path
) -> None:
    p = gpu_platform
    first = _push(p, _project(tmp_path, "gpu-first", "L4"), "--wait")
    assert first["deployment"]["status"] == "ACTIVE", first
    env = _env(p, first["model"]["id"])
    assert env["CUDA_VISIBLE_DEVICES"] == L4_UUID
    assert env["NVIDIA_VISIBLE_DEVICES"] == L4_UUID

    second = _push(p, _project(tmp_path, "gpu-second", "L4"))
    dep2 = second["deployment"]["id"]
    with p.client() as c:
        waiting = wait_for(
            lambda: (d := c.deployment(dep2))["message"].startswith("waiting for") and d,
            60, "the second deployment to wait for the GPU",
        )  # fmt: skip
    assert waiting["message"] == "waiting for 1\u00d7L4: 0 free of 1"
    assert waiting["status"] == "DEPLOYING"

    gpus = p.cli("gpus", "-o", "json")
    assert gpus.returncode == 0, gpus.stderr
    (device,) = json.loads(gpus.stdout)["devices"]
    assert device["uuid"] == L4_UUID
    assert device["held_by"]["deployment_id"] == first["deployment"]["id"]
    table = p.cli("gpus")
    assert "NVIDIA L4" in table.stdout and first["deployment"]["id"] in table.stdout
    described = p.cli("deployments", "describe", "gpu-first", first["deployment"]["id"],
                      "-o", "json")  # fmt: skip
    (held,) = json.loads(described.stdout)[0]["gpus"].values()
    assert held == [f"0:{L4_UUID}"]

    with p.client() as c:
        c.deployment_action("gpu-first", first["deployment"]["id"], "deactivate")
    p.wait_status(dep2, "ACTIVE", timeout=90)
    assert _env(p, second["model"]["id"])["CUDA_VISIBLE_DEVICES"] == L4_UUID

    # A replica that asks for no GPU sees none on a host that has some.
    plain = _push(p, _project(tmp_path, "gpu-none", None), "--wait")
    env = _env(p, plain["model"]["id"])
    assert env["CUDA_VISIBLE_DEVICES"] == "" and env["NVIDIA_VISIBLE_DEVICES"] == "none"


def test_a_kind_the_host_lacks_is_refused_at_push(gpu_platform: Platform, tmp_path: Path) -> None:
    out = gpu_platform.cli("push", str(_project(tmp_path, "gpu-h100", "H100:2")))
    assert out.returncode != 0
    assert "this host has no H100" in out.stderr and "0: NVIDIA L4 (22 GiB)" in out.stderr
    with gpu_platform.client() as c:
        assert c.deployments() == []
