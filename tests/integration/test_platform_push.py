"""End to end on the process engine: push a custom-server project, call it via the gateway."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from helpers.platform import EXAMPLES, REPO, Platform, wait_answer, wait_for
from kingpost.errors import AuthError, ConfigError, SecretError

ECHO = EXAMPLES / "echo-server"
FIXTURES = REPO / "tests" / "fixtures" / "models"


def copy_project(tmp_path: Path, name: str, config_extra: str = "", base: Path = ECHO) -> Path:
    """A copy of the example; ``model_name:`` lines in ``config_extra`` replace the original."""
    dest = tmp_path / name
    shutil.copytree(base, dest)
    lines = (dest / "config.yaml").read_text().splitlines()
    if "model_name:" in config_extra:
        lines = [ln for ln in lines if not ln.startswith("model_name:")]
    (dest / "config.yaml").write_text("\n".join(lines) + "\n" + config_extra)
    return dest


def deploy(platform: Platform, project: Path, **options: object) -> dict[str, object]:
    with platform.client() as c:
        result = c.push(project, **options)
    dep = result["deployment"]
    platform.wait_status(dep["id"], "ACTIVE")
    return result


def test_push_predict_sync_and_passthrough(platform: Platform, tmp_path: Path) -> None:
    project = copy_project(tmp_path, "echo-a", "model_name: echo-a\n")
    result = deploy(platform, project, labels={"team": "ml"})
    model_id = result["model"]["id"]
    assert result["deployment"]["name"] == "deployment-1"
    assert result["deployment"]["environments"] == ["production"]
    with platform.gateway() as gw:
        for path in (
            f"/models/{model_id}/environments/production/predict",
            f"/models/{model_id}/production/predict",
            "/models/echo-a/environments/production/predict",
            f"/models/{model_id}/deployment/{result['deployment']['id']}/predict",
        ):
            r = gw.post(path, json={"hello": "world"})
            assert r.status_code == 200, (path, r.text)
            assert r.json()["echo"] == {"hello": "world"}
            assert r.headers["x-baseten-request-id"]
        r = gw.post(
            "/environments/production/predict",
            json={"x": 1},
            headers={"Host": f"model-{model_id}.localhost:{platform.gateway_port}"},
        )
        assert r.status_code == 200 and r.json()["echo"] == {"x": 1}
        r = gw.get(f"/models/{model_id}/environments/production/sync/health?probe=1")
        assert r.status_code == 200
        r = gw.get(f"/models/{model_id}/environments/production/sync/no/such/route")
        assert r.status_code == 404  # the server's own 404, passed through
        r = gw.post(
            f"/models/{model_id}/environments/production/predict",
            json={},
            headers={"X-Baseten-Request-Id": "req-123"},
        )
        assert r.headers["x-baseten-request-id"] == "req-123"


def test_streaming_passes_through(platform: Platform, tmp_path: Path) -> None:
    project = copy_project(tmp_path, "echo-stream", "model_name: echo-stream\n")
    model_id = deploy(platform, project)["model"]["id"]
    with (
        platform.gateway() as gw,
        gw.stream("GET", f"/models/{model_id}/environments/production/sync/stream?n=5") as r,
    ):
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line.startswith("data:")]
    assert len(events) == 5


def test_auth_is_required_everywhere(platform: Platform) -> None:
    r = httpx.get(f"{platform.api_url}/v1/models")
    assert r.status_code == 401 and "error" in r.json()
    r = httpx.get(f"{platform.api_url}/v1/models", headers={"Authorization": "Api-Key nope"})
    assert r.status_code == 401
    r = httpx.post(
        f"{platform.gateway_url}/models/x/production/predict",
        json={},
        headers={"Authorization": "Api-Key nope"},
    )
    assert r.status_code == 401 and "error" in r.json()
    with pytest.raises(AuthError):
        from kingpost.client import KingpostClient

        KingpostClient(platform.api_url, "wrong", platform.gateway_url).models()


def test_bad_config_is_refused_and_nothing_is_created(platform: Platform, tmp_path: Path) -> None:
    project = copy_project(tmp_path, "bad", "model_name: bad-config\n")
    text = (project / "config.yaml").read_text().replace("server_port: 8000", "server_port: 70000")
    (project / "config.yaml").write_text(text)
    with platform.client() as c:
        with pytest.raises(ConfigError) as info:
            c.push(project)
        assert "server_port" in info.value.message and "70000" in info.value.message
        assert "bad-config" not in [m["name"] for m in c.models()]
    out = platform.cli("push", str(project))
    assert out.returncode == 2, out
    assert "server_port" in out.stderr


def test_secrets_flow(platform: Platform, tmp_path: Path) -> None:
    project = copy_project(
        tmp_path, "sec", "model_name: with-secret\nsecrets:\n  api_token: null\n"
    )
    with platform.client() as c, pytest.raises(SecretError, match="api_token"):
        c.push(project)
    out = platform.cli("secrets", "set", "api_token", input="tok-VALUE-123\n")
    assert out.returncode == 0, out.stderr
    listed = platform.cli("secrets", "list", "--output", "json")
    assert [s["name"] for s in json.loads(listed.stdout)] == ["api_token"]
    assert "tok-VALUE-123" not in listed.stdout
    model_id = deploy(platform, project)["model"]["id"]
    with platform.gateway() as gw:
        env = gw.get(f"/models/{model_id}/environments/production/sync/env").json()
    assert env["secrets"]["api_token"] == "tok-VALUE-123"
    assert env["secrets_writable"] is False
    assert "tok-VALUE-123" not in platform.output()


def test_deactivate_answers_404_and_activate_brings_it_back(
    platform: Platform, tmp_path: Path
) -> None:
    project = copy_project(tmp_path, "deact", "model_name: deact\n")
    result = deploy(platform, project)
    model_id, dep_id = result["model"]["id"], result["deployment"]["id"]
    with platform.client() as c:
        c.deployment_action(model_id, dep_id, "deactivate")
        platform.wait_status(dep_id, "INACTIVE")
        with platform.gateway() as gw:
            r = wait_answer(gw, f"/models/{model_id}/production/predict", 404)
            assert "error" in r.json()
            c.deployment_action(model_id, dep_id, "activate")
            platform.wait_status(dep_id, "ACTIVE")
            r = gw.post(f"/models/{model_id}/production/predict", json={"a": 1})
            assert r.status_code == 200


def test_promotion_and_named_deployments(platform: Platform, tmp_path: Path) -> None:
    project = copy_project(tmp_path, "promo", "model_name: promo\n")
    first = deploy(platform, project)
    second = deploy(platform, project, deployment_name="canary-1", environment="staging")
    model_id = first["model"]["id"]
    assert second["deployment"]["environments"] == ["staging"]
    with platform.gateway() as gw:
        assert (
            gw.post(f"/models/{model_id}/environments/staging/predict", json={}).status_code == 200
        )
    with platform.client() as c:
        c.promote(model_id, second["deployment"]["id"], "production")
        # Production serves: it moves once canary-1 is ready (it is: at the next pass).
        wait_for(
            lambda: (
                {e["name"]: e["deployment_id"] for e in c.environments(model_id)}["production"]
                == second["deployment"]["id"]
                or None
            ),
            10,
            "production to move to canary-1",
        )
    out = platform.cli("deployments", "list", "--model", model_id, "--output", "json")
    names = {d["name"]: d for d in json.loads(out.stdout)}
    assert set(names) == {"deployment-1", "canary-1"}
    # The CLI takes a deployment's name with its model, as `deployments promote` does.
    out = platform.cli("predict", "--model", "promo", "--deployment", "canary-1", "-d", '{"n": 2}')
    assert out.returncode == 0 and json.loads(out.stdout)["echo"] == {"n": 2}, out.stderr
    out = platform.cli("logs", "--model", "promo", "--deployment", "canary-1")
    assert out.returncode == 0 and out.stdout.strip(), out.stderr
    # An error answer reads as its message, not as escaped JSON.
    out = platform.cli("predict", "--model", "promo", "--environment", "nope", "-d", "{}")
    assert out.returncode != 0 and "HTTP 404: " in out.stderr, out.stderr
    assert '{"error"' not in out.stderr and "nope" in out.stderr, out.stderr
    # An action shows what was asked next to where the deployment is now.
    out = platform.cli("deployments", "deactivate", "promo", "deployment-1")
    assert out.returncode == 0, out.stderr
    header, row = out.stdout.splitlines()
    assert header.split()[4:8] == ["DESIRED", "STATE", "STATUS", "ENVIRONMENTS"], header
    assert row.split()[1] == "deployment-1" and row.split()[3] == "inactive", row
    platform.wait_status(first["deployment"]["id"], "INACTIVE")
    # Deactivating what an environment serves asks first, naming the environment.
    out = platform.cli("deployments", "deactivate", "promo", "canary-1", input="n\n")
    assert out.returncode == 130, out.stderr  # aborted, as Ctrl-C
    assert "serves environment(s) production, staging" in out.stderr, out.stderr
    assert "production, staging will answer 404" in out.stderr, out.stderr
    with platform.client() as c:
        assert c.deployment(second["deployment"]["id"])["desired_state"] == "active"
    # The table names the model, not its id.
    out = platform.cli("deployments", "list", "--model", "promo")
    header, *rows = out.stdout.splitlines()
    assert header.split()[2] == "MODEL" and {r.split()[2] for r in rows} == {"promo"}, out.stdout
    # Rename and relabel: the new name answers, the old one is gone, nothing restarted.
    out = platform.cli(
        "deployments",
        "update",
        "promo",
        "canary-1",
        "--name",
        "blue",
        "--labels",
        '{"t": "a"}',
        "--output",
        "json",
    )
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout)[0]
    assert (row["name"], row["labels"]) == ("blue", {"t": "a"}), row
    out = platform.cli("predict", "--model", "promo", "--deployment", "blue", "-d", "{}")
    assert out.returncode == 0, out.stderr
    # Its replica, as the engine runs it: ready, never restarted, reachable.
    out = platform.cli("deployments", "replicas", "promo", "blue", "--output", "json")
    assert out.returncode == 0, out.stderr
    [replica] = json.loads(out.stdout)
    assert replica["status"] == "READY" and replica["restarts"] == 0, replica
    assert replica["deployment_id"] == second["deployment"]["id"] and replica["address"], replica
    out = platform.cli("deployments", "replicas", "promo", "nope")
    assert out.returncode != 0 and "nope" in out.stderr, out.stderr
    out = platform.cli("deployments", "update", "promo", "blue", "--name", "development")
    assert out.returncode != 0 and "development" in out.stderr, out.stderr
    out = platform.cli("deployments", "update", "promo", "blue")
    assert out.returncode != 0 and "--name, --labels" in out.stderr, out.stderr


def test_weights_are_mirrored_then_mounted_read_only(
    platform: Platform, tmp_path: Path, public_tmp: Path
) -> None:
    repo = public_tmp / "weights-repo"  # any user may read it: the mirror copies only that
    (repo / "sub").mkdir(parents=True)
    (repo / "model.safetensors").write_bytes(b"w" * 4096)
    (repo / "sub" / "config.json").write_text("{}")
    project = copy_project(
        tmp_path,
        "weighted",
        f"model_name: weighted\nweights:\n  - source: file://{repo}\n"
        "    mount_location: /models/weighted\n",
    )
    out = platform.cli("push", str(project), "--wait", "--output", "json")
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(out.stdout)
    assert result["deployment"]["status"] == "ACTIVE", result
    model_id = result["model"]["id"]
    with platform.gateway() as gw:
        seen = gw.get(
            f"/models/{model_id}/environments/production/sync/files?dir=/models/weighted"
        ).json()
    assert seen == {"files": ["model.safetensors", "sub/config.json"], "writable": False}
    listed = json.loads(platform.cli("weights", "list", "--output", "json").stdout)
    assert any(m["source"] == f"file://{repo}" and m["files"] == 2 for m in listed)
    dep_id = platform.cli("deployments", "list", "--model", "weighted", "--output", "json")
    status = platform.cli(
        "weights", "status", "-d", json.loads(dep_id.stdout)[0]["id"], "-o", "json"
    )
    assert json.loads(status.stdout)[0]["state"] == "COMPLETE"


def test_push_warns_once_the_server_picked_an_engine_that_ignores_keys(
    platform: Platform, tmp_path: Path
) -> None:
    """The server's default engine is known to the CLI only from the push's answer."""
    project = copy_project(tmp_path, "pkgs", "model_name: push-pkgs\nsystem_packages: [jq]\n")
    out = platform.cli("push", str(project))
    assert out.returncode == 0, out.stdout + out.stderr
    stderr = " ".join(out.stderr.split())  # rich wraps long lines
    assert stderr.count("warning:") == 1, stderr
    assert "system_packages: not installed" in stderr and '(found ["jq"])' in stderr, stderr


def test_push_prints_the_curl_command_on_one_line(platform: Platform, tmp_path: Path) -> None:
    """The command to copy was wrapped at 80 columns (rich's width when stdout is not a
    terminal, and in a narrow one): pasted, its first line ran `curl -X POST` alone."""
    project = copy_project(tmp_path, "one-line", "model_name: push-one-line\n")
    out = platform.cli("push", str(project), "--wait")
    assert out.returncode == 0, out.stdout + out.stderr
    (line,) = [ln for ln in out.stdout.splitlines() if ln.startswith("predict:")]
    command = line.removeprefix("predict: ")
    assert command.startswith("curl -X POST http://") and command.endswith("-d '{...}'"), line
    env = {**platform.env, "KINGPOST_API_KEY": platform.api_key}
    ran = subprocess.run(
        ["sh", "-c", command.replace("{...}", '{"hi": 1}') + " -sS --fail"],
        env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert ran.returncode == 0 and json.loads(ran.stdout)["echo"] == {"hi": 1}, ran


def test_push_wait_exits_non_zero_unless_the_deployment_is_up(
    platform: Platform, tmp_path: Path
) -> None:
    """With --output json a FAILED deployment exited 0 (the table output exited 1), and
    a --wait that timed out exited 0 with the deployment still DEPLOYING."""
    crash = copy_project(tmp_path, "crash", "model_name: push-crash\n")
    text = (crash / "config.yaml").read_text()
    (crash / "config.yaml").write_text(text.replace("python3 server.py", "exit 3"))
    out = platform.cli("push", str(crash), "--wait", "--output", "json")
    assert out.returncode == 1, out.stdout + out.stderr
    assert json.loads(out.stdout)["deployment"]["status"] == "FAILED"
    assert "FAILED" in out.stderr and "Traceback" not in out.stderr
    slow = copy_project(tmp_path, "slow", "model_name: push-slow\n")
    text = (slow / "config.yaml").read_text()
    (slow / "config.yaml").write_text(text.replace("python3 server.py", "sleep 60"))
    for output in ("json", "table"):
        out = platform.cli("push", str(slow), "--wait", "--timeout", "1", "--output", output)
        assert out.returncode == 1, out.stdout + out.stderr
        assert "not ACTIVE after 1s" in " ".join(out.stderr.split()), out.stderr
        if output == "json":
            assert json.loads(out.stdout)["deployment"]["status"] != "ACTIVE"


@pytest.mark.slow
def test_a_custom_servers_requirements_are_installed_for_its_start_command(
    platform: Platform,
) -> None:
    """Its `requirements` were ignored: `wheel version && exec python3 server.py` failed
    with "command not found". They get an environment of their own, as Truss installs
    them into its image, without the model server; the command runs in it."""
    with platform.client() as c:
        result = c.push(FIXTURES / "custom_server_requirements")
    dep_id = result["deployment"]["id"]
    dep = platform.wait_status(dep_id, "ACTIVE", "FAILED", "BUILD_FAILED", timeout=300)
    assert dep["status"] == "ACTIVE", dep["message"]
    with platform.gateway() as gw:
        r = gw.post(f"/models/{result['model']['id']}/environments/production/predict", json={})
    assert r.status_code == 200, r.text
    venv = r.json()["VIRTUAL_ENV"]
    assert Path(venv).parent == platform.home / "envs"
    assert r.json() == {
        "wheel": "0.45.1",
        "prefix": venv,
        "VIRTUAL_ENV": venv,
        "PYTHON_EXECUTABLE": f"{venv}/bin/python",
        "path0": f"{venv}/bin",
        "model_server": [],
    }
    with platform.client() as c:
        assert any(line["text"] == "wheel 0.45.1" for line in c.logs(dep_id, 2000))


def test_an_upload_streams_from_disk_with_progress_and_only_once(
    platform: Platform, tmp_path: Path
) -> None:
    """Packed to a temporary file while hashed, then sent in chunks: the server gets the
    same archive (it checks the hash), progress reaches the whole size, and a second push
    of the same project sends nothing."""
    project = copy_project(tmp_path, "streamed")
    (project / "data").mkdir()
    (project / "data" / "blob.bin").write_bytes(b"\x01\x02\x03" * 1_500_000)  # 4.5 MB
    seen: list[tuple[int, int]] = []
    with platform.client() as c:
        sha = c.upload(project, progress=lambda sent, total: seen.append((sent, total)))
        assert len(seen) > 1 and seen[-1][0] == seen[-1][1] > 4_500_000
        assert [s for s, _ in seen] == sorted(s for s, _ in seen)
        seen.clear()
        assert c.upload(project, progress=lambda *a: seen.append(a)) == sha
    assert seen == []
    assert (platform.home / "projects" / sha / "data" / "blob.bin").stat().st_size == 4_500_000
