"""Replica crashes, control-plane restarts, logs and the CLI against a real server."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from helpers.platform import EXAMPLES, Platform, wait_answer, wait_for


def _push(platform: Platform, tmp_path: Path, name: str) -> tuple[str, str]:
    project = tmp_path / name
    shutil.copytree(EXAMPLES / "echo-server", project)
    text = (
        (project / "config.yaml")
        .read_text()
        .replace("model_name: echo-server", f"model_name: {name}")
    )
    (project / "config.yaml").write_text(text)
    out = platform.cli("push", str(project), "--wait", "--output", "json")
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(out.stdout)
    assert result["deployment"]["status"] == "ACTIVE", result
    return result["model"]["id"], result["deployment"]["id"]


def _pid(platform: Platform, model_id: str) -> int:
    with platform.gateway() as gw:
        r = gw.get(f"/models/{model_id}/environments/production/sync/env")
        assert r.status_code == 200, r.text
        return int(r.json()["pid"])


def test_killed_replica_comes_back(fresh_platform: Platform, tmp_path: Path) -> None:
    model_id, dep_id = _push(fresh_platform, tmp_path, "crashy")
    pid = _pid(fresh_platform, model_id)
    os.kill(pid, signal.SIGKILL)
    new_pid = wait_for(
        lambda: (p := _pid(fresh_platform, model_id)) != pid and p, 60, "a new replica process"
    )
    assert new_pid != pid
    out = fresh_platform.cli("predict", "--model", "crashy", "-d", '{"again": true}')
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["echo"] == {"again": True}
    logs = fresh_platform.cli("logs", "--deployment", dep_id)
    assert logs.returncode == 0 and logs.stdout.strip(), logs


def test_control_plane_restart_brings_deployments_back(
    fresh_platform: Platform, tmp_path: Path
) -> None:
    model_id, dep_id = _push(fresh_platform, tmp_path, "durable")
    old_pid = _pid(fresh_platform, model_id)
    fresh_platform.stop()
    wait_for(lambda: not _alive(old_pid), 15, "replica to stop with the server")
    fresh_platform.start()
    fresh_platform.wait_status(dep_id, "ACTIVE")
    with fresh_platform.gateway() as gw:
        r = wait_answer(gw, f"/models/{model_id}/production/predict", 200, {"n": 1}, 30)
    assert r.json()["echo"] == {"n": 1}
    models = json.loads(fresh_platform.cli("models", "list", "--output", "json").stdout)
    assert [m["name"] for m in models] == ["durable"]


def test_deleting_a_model_stops_its_replicas_and_frees_its_name(
    fresh_platform: Platform, tmp_path: Path
) -> None:
    model_id, _ = _push(fresh_platform, tmp_path, "doomed")
    pid = _pid(fresh_platform, model_id)
    out = fresh_platform.cli("models", "delete", "doomed", "--yes")
    assert out.returncode == 0 and "deleted model doomed" in out.stdout, out.stdout + out.stderr
    wait_for(lambda: not _alive(pid), 15, "the replica to stop")
    with fresh_platform.gateway() as gw:
        r = wait_answer(gw, f"/models/{model_id}/production/predict", 404)
    assert "error" in r.json()
    assert json.loads(fresh_platform.cli("models", "list", "-o", "json").stdout) == []
    # The name is free again: a push makes a new model, first deployment in production.
    new_model, _ = _push(fresh_platform, tmp_path / "again", "doomed")
    assert new_model != model_id
    assert _pid(fresh_platform, new_model) != pid


def test_crashing_server_is_failed_with_its_output(
    fresh_platform: Platform, tmp_path: Path
) -> None:
    project = tmp_path / "broken"
    shutil.copytree(EXAMPLES / "echo-server", project)
    text = (project / "config.yaml").read_text()
    lines = [ln for ln in text.splitlines() if "start_command" not in ln]
    text = "\n".join(lines).replace(
        "docker_server:",
        "docker_server:\n  start_command: python -c \"raise SystemExit('kaboom-42')\"",
    )
    (project / "config.yaml").write_text(
        text.replace("model_name: echo-server", "model_name: broken")
    )
    out = fresh_platform.cli("push", str(project), "--wait", "--timeout", "90")
    # A failed push says why and where the log is, not how to call a model that is not there.
    assert out.returncode == 1, out.stderr
    assert "predict: curl" not in out.stdout, out.stdout
    assert "kaboom-42" in out.stderr, out.stderr
    assert "the whole log: kingpost logs -d " in out.stderr, out.stderr
    with fresh_platform.client() as c:
        (dep,) = c.deployments("broken")
    failed = fresh_platform.wait_status(dep["id"], "FAILED", timeout=90)
    assert "kaboom-42" in failed["message"]
    # The table shows the model's name and a one-line reason, the output's last line in it.
    out = fresh_platform.cli("deployments", "list")
    header, row = out.stdout.splitlines()
    assert header.split()[:4] == ["ID", "NAME", "MODEL", "STATUS"], header
    assert row.split()[2:4] == ["broken", "FAILED"], row
    assert "kaboom-42" in row, row


def test_a_killed_control_plane_leaves_no_unrecorded_replica_process_behind(
    fresh_platform: Platform, tmp_path: Path
) -> None:
    """Replicas outlive a SIGKILLed control plane, for the next one to adopt by their
    records (``test_process_adopt.py``). One that no record names (its record lost, or
    the plane died between launch and record), here a server the start_command shell did
    not exec into (``cd … && python3 server.py``), must not be left running forever."""
    project = tmp_path / "shelled"
    shutil.copytree(EXAMPLES / "echo-server", project)
    text = (project / "config.yaml").read_text()
    text = text.replace(
        "start_command: python3 server.py", "start_command: cd . && python3 server.py"
    )
    (project / "config.yaml").write_text(
        text.replace("model_name: echo-server", "model_name: shelled")
    )
    out = fresh_platform.cli("push", str(project), "--wait", "--output", "json")
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(out.stdout)
    model_id, dep_id = result["model"]["id"], result["deployment"]["id"]
    old_pid = _pid(fresh_platform, model_id)
    fresh_platform.stop(signal.SIGKILL)
    for record in (fresh_platform.home / "run" / "replicas").glob("*.json"):
        record.unlink()
    fresh_platform.start()
    fresh_platform.wait_status(dep_id, "ACTIVE")
    try:
        wait_for(lambda: not _alive(old_pid), 15, "the old replica's server to be gone")
    finally:
        if _alive(old_pid):
            os.kill(old_pid, signal.SIGKILL)
    assert _pid(fresh_platform, model_id) != old_pid


def _alive(pid: int) -> bool:
    """Running (a zombie awaiting its reaper counts as gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def _hanging_project(tmp_path: Path, name: str, model: str = "") -> Path:
    """A model (``model``, else ``name``) whose requirement is a local sdist whose
    ``setup.py`` writes its pid to ``{tmp_path}/pids/{name}``, then sleeps for 15 minutes:
    a build that hangs."""
    package = tmp_path / "packages" / name
    package.mkdir(parents=True)
    (tmp_path / "pids").mkdir(exist_ok=True)
    (package / "setup.py").write_text(
        "import os, pathlib, time\n"
        f"pathlib.Path({str(tmp_path / 'pids' / name)!r}).write_text(str(os.getpid()))\n"
        "time.sleep(900)\n"
        "from setuptools import setup\n"
        f"setup(name={name!r}, version='1.0')\n"
    )
    return _model_project(tmp_path, name, f"{name} @ file://{package}", model)


def _model_project(tmp_path: Path, name: str, requirement: str, model: str = "") -> Path:
    project = tmp_path / "projects" / name
    (project / "model").mkdir(parents=True)
    (project / "model" / "model.py").write_text(
        "class Model:\n    def predict(self, model_input):\n        return model_input\n"
    )
    (project / "config.yaml").write_text(
        f"model_name: {model or name}\nrequirements:\n  - {requirement}\n"
    )
    return project


def _setup_py_pid(tmp_path: Path, name: str) -> int:
    """The pid of ``name``'s hanging ``setup.py`` once it runs (a new one after a restart)."""
    path = tmp_path / "pids" / name
    pid = wait_for(lambda: path.is_file() and path.read_text(), 120, f"{name}'s setup.py")
    path.unlink()
    return int(pid)


def _group(pid: int) -> int:
    """The process group of ``pid``: the installer's own, which it leads."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[2])


@pytest.mark.slow
def test_hung_builds_block_no_other_build_and_end_with_their_deployment(
    fresh_platform: Platform, tmp_path: Path
) -> None:
    """Two builds whose setup.py sleeps used to take both build workers (a third, quick
    deployment stayed BUILDING), kept running when deactivated or deleted, and kept a
    SIGTERMed server alive while it waited for them."""
    with fresh_platform.client() as c:
        first = c.push(_hanging_project(tmp_path, "hangone"))["deployment"]
        # Its model's second deployment: deleting the first, in production, is refused.
        second = c.push(_hanging_project(tmp_path, "hangtwo", "hangone"))["deployment"]
        pids = [_setup_py_pid(tmp_path, "hangone"), _setup_py_pid(tmp_path, "hangtwo")]
        groups = [_group(pid) for pid in pids]
        quick = c.push(_model_project(tmp_path, "quick", "attrs==23.2.0"))["deployment"]
        fresh_platform.wait_status(quick["id"], "ACTIVE", timeout=180)
        assert [c.deployment(d["id"])["status"] for d in (first, second)] == ["BUILDING"] * 2
        c.deployment_action(first["model_id"], first["id"], "deactivate")
        c.deployment_action(second["model_id"], second["id"], "delete")
        for pid, group in zip(pids, groups, strict=True):  # setup.py, and uv that ran it
            wait_for(lambda p=pid, g=group: not _alive(p) and not _alive(g), 15, "the build")
        assert c.deployment(first["id"])["status"] == "INACTIVE"
        c.deployment_action(first["model_id"], first["id"], "activate")
        again = _setup_py_pid(tmp_path, "hangone")
    started = time.monotonic()
    fresh_platform.stop(signal.SIGTERM)
    assert time.monotonic() - started < 15, fresh_platform.output()
    wait_for(lambda: not _alive(again), 5, "the build to end with the control plane")


@pytest.mark.slow
def test_a_hung_build_times_out_and_a_killed_control_plane_takes_its_installer(
    tmp_path: Path,
) -> None:
    platform = Platform(tmp_path / "home", extra_env={"KINGPOST_BUILD_TIMEOUT": "20"}).start()
    pid = 0
    try:
        with platform.client() as c:
            dep = c.push(_hanging_project(tmp_path, "hangs"))["deployment"]
            pid = _setup_py_pid(tmp_path, "hangs")
            failed = platform.wait_status(dep["id"], "BUILD_FAILED", timeout=90)
            assert "did not finish within 20 s (KINGPOST_BUILD_TIMEOUT)" in failed["message"]
            assert "building environment" in failed["message"]  # its last output lines
            wait_for(lambda: not _alive(pid), 15, "the timed-out build to be killed")
            c.deployment_action(dep["model_id"], dep["id"], "activate")
            pid = _setup_py_pid(tmp_path, "hangs")
        installer = _group(pid)
        platform.stop(signal.SIGKILL)
        wait_for(lambda: not _alive(installer), 15, "the installer to die with the plane")
        # The setup.py it ran outlives it, until the next control plane starts.
        assert _alive(pid)
        platform.start()
        wait_for(lambda: not _alive(pid), 15, "the next control plane to kill the orphan")
        pid = _setup_py_pid(tmp_path, "hangs")  # the deployment is built again
        with platform.client() as c:  # the builds before the restart are still in its log
            text = [line["text"] for line in c.logs(dep["id"], tail=10_000)]
        starts = [t for t in text if t.startswith("--- build started ")]
        assert len(starts) == 3, text
        stop = "--- build stopped: the build did not finish within 20 s (KINGPOST_BUILD_TIMEOUT)"
        assert any(t.startswith(stop) for t in text), text
        platform.stop(signal.SIGTERM)
        wait_for(lambda: not _alive(pid), 5, "the build to end with the control plane")
    finally:
        platform.stop(signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
