"""Replica crashes, control-plane restarts, logs and the CLI against a real server."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

from helpers.platform import EXAMPLES, Platform, wait_for


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
        r = wait_for(
            lambda: (
                (
                    resp := gw.post(f"/models/{model_id}/production/predict", json={"n": 1})
                ).status_code
                == 200
                and resp
            ),
            30,
            "predict after restart",
        )
    assert r.json()["echo"] == {"n": 1}
    models = json.loads(fresh_platform.cli("models", "list", "--output", "json").stdout)
    assert [m["name"] for m in models] == ["durable"]


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
    with fresh_platform.client() as c:
        dep = c.push(project)["deployment"]
    failed = fresh_platform.wait_status(dep["id"], "FAILED", timeout=90)
    assert "kaboom-42" in failed["message"]


def test_a_killed_control_plane_leaves_no_replica_process_behind(
    fresh_platform: Platform, tmp_path: Path
) -> None:
    """PR_SET_PDEATHSIG reaches only the shell that runs start_command; a server the shell
    did not exec into (``cd … && python3 server.py``) outlived a SIGKILLed control plane.
    The restarted platform must not leave it running forever."""
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
