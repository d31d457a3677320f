"""The development deployment through the whole platform: `push --watch`'s deployment,
live reload in place (same process), failed reloads that leave the last good code serving,
swaps for what a reload cannot take, an invalid config, and promotion to a new deployment."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from helpers.platform import Platform, free_port, wait_for
from kingpost.errors import ConfigError, NotFoundError, ValidationError

MODEL = """
import os


class Model:
    def __init__(self, **kwargs):
        self.loaded = None

    def load(self):
        self.loaded = VALUE

    def predict(self, model_input):
        return {"value": self.loaded, "pid": os.getpid(), "six": SIX}
"""


def write_model(project: Path, value: str, extra: str = "", six: str = "None") -> None:
    code = MODEL.replace("VALUE", value).replace("SIX", six) + extra
    (project / "model" / "model.py").write_text(code)


def make_project(tmp_path: Path, name: str, config_extra: str = "") -> Path:
    project = tmp_path / name
    (project / "model").mkdir(parents=True)
    (project / "config.yaml").write_text(f"model_name: {name}\n{config_extra}")
    write_model(project, "1")
    return project


def predict(platform: Platform, model: str) -> dict[str, Any]:
    with platform.gateway() as gw:
        r = gw.post(f"/models/{model}/development/predict", json={})
    assert r.status_code == 200, r.text
    return dict(r.json())


def sync(platform: Platform, project: Path, model: str) -> dict[str, Any]:
    with platform.client() as c:
        return c.development_sync(model, c.upload(project))


def push_development(platform: Platform, project: Path) -> dict[str, Any]:
    with platform.client() as c:
        result = c.push(project, development=True)
    dep = result["deployment"]
    assert dep["name"] == "development" and dep["is_development"]
    assert dep["environments"] == []
    platform.wait_status(dep["id"], "ACTIVE", timeout=180)
    return result


def test_live_reload_in_place_and_failed_reloads(platform: Platform, tmp_path: Path) -> None:
    project = make_project(tmp_path, "dev-reload")
    result = push_development(platform, project)
    assert result["predict_url"].endswith("/development/predict")
    first = predict(platform, "dev-reload")
    assert first["value"] == 1

    write_model(project, "2")
    done = sync(platform, project, "dev-reload")
    assert (done["kind"], done["ok"], done["changed"]) == ("reload", True, ["model/model.py"])
    # The very next request sees the change, from the same process.
    assert predict(platform, "dev-reload") == {**first, "value": 2}

    write_model(project, "3", extra="\ndef broken(:\n")
    done = sync(platform, project, "dev-reload")
    assert (done["kind"], done["ok"]) == ("reload", False)
    assert "SyntaxError" in done["error"] and "model.py" in done["traceback"]
    assert predict(platform, "dev-reload") == {**first, "value": 2}

    write_model(project, "1 / 0")
    done = sync(platform, project, "dev-reload")
    assert not done["ok"] and "ZeroDivisionError" in done["error"]
    assert "self.loaded = 1 / 0" in done["traceback"]
    assert predict(platform, "dev-reload") == {**first, "value": 2}

    # Metadata is no reason for a new replica either.
    (project / "config.yaml").write_text("model_name: dev-reload\nmodel_metadata: {a: 1}\n")
    write_model(project, "4")
    done = sync(platform, project, "dev-reload")
    assert (done["kind"], done["ok"]) == ("reload", True)
    assert predict(platform, "dev-reload") == {**first, "value": 4}

    # An invalid config is refused with its file and line; the last good code serves on.
    (project / "config.yaml").write_text("model_name: dev-reload\nresources:\n  cpu: lots\n")
    with pytest.raises(ConfigError) as bad:
        sync(platform, project, "dev-reload")
    assert "config.yaml" in bad.value.message and "line 3" in bad.value.message
    assert predict(platform, "dev-reload") == {**first, "value": 4}


def test_reload_path_is_not_reachable_through_the_gateway(
    platform: Platform, tmp_path: Path
) -> None:
    project = make_project(tmp_path, "dev-guard")
    push_development(platform, project)
    with platform.gateway() as gw:
        for path in ("_kingpost/reload", "/_kingpost/reload", "%5Fkingpost/reload"):
            r = gw.post(
                f"/models/dev-guard/development/sync/{path}",
                headers={"x-kingpost-reload-token": "guess"},
            )
            assert r.status_code == 404, (path, r.text)


def test_push_watch_cli_reloads_on_edit_and_reports_an_invalid_config(
    platform: Platform, tmp_path: Path
) -> None:
    project = make_project(tmp_path, "dev-watch")
    out = tmp_path / "watch.out"
    with out.open("w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kingpost.cli", "push", "--watch", str(project)],
            env={**platform.env, "COLUMNS": "200"},
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for(lambda: "watching" in out.read_text() or None, 120, "the watch to start")
        assert "deployment development" in out.read_text()
        pid = predict(platform, "dev-watch")["pid"]
        write_model(project, "7")
        wait_for(lambda: predict(platform, "dev-watch")["value"] == 7 or None, 30, "reload")
        assert predict(platform, "dev-watch")["pid"] == pid
        wait_for(lambda: "reloaded in place" in out.read_text() or None, 10, "the report")
        assert "model/model.py" in out.read_text()
        (project / "config.yaml").write_text("model_name: dev-watch\nresources: [1\n")
        wait_for(lambda: "invalid config" in out.read_text() or None, 30, "the config error")
        assert "config.yaml" in out.read_text()
        assert predict(platform, "dev-watch")["value"] == 7
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)


def test_requirements_change_swaps_and_promote_publishes(
    platform: Platform, tmp_path: Path
) -> None:
    project = make_project(tmp_path, "dev-swap")
    dev_id = push_development(platform, project)["deployment"]["id"]
    before = predict(platform, "dev-swap")

    (project / "config.yaml").write_text("model_name: dev-swap\nrequirements:\n  - six==1.16.0\n")
    write_model(project, "5", six="__import__('six').__version__")
    started = time.monotonic()
    done = sync(platform, project, "dev-swap")
    assert (done["kind"], done["ok"]) == ("swap", True), done
    assert "requirements" in done["why"]
    after = predict(platform, "dev-swap")
    assert after["value"] == 5 and after["six"] == "1.16.0"
    assert after["pid"] != before["pid"]
    assert time.monotonic() - started < 300

    # Never in an environment: promoting it publishes a new numbered deployment.
    with platform.client() as c:
        with pytest.raises(ValidationError):
            c.push(project, deployment_name="development")
        published = c.promote("dev-swap", "development", "production")
        assert published["name"].startswith("deployment-")
        assert published["id"] != dev_id and published["environments"] == ["production"]
        assert not published["is_development"]
    platform.wait_status(published["id"], "ACTIVE", timeout=120)
    with platform.gateway() as gw:
        r = gw.post("/models/dev-swap/production/predict", json={})
    assert r.status_code == 200 and r.json()["value"] == 5
    # The development deployment still answers, and is still in no environment.
    assert predict(platform, "dev-swap")["value"] == 5
    with platform.client() as c:
        dev = c.deployment(dev_id)
        assert dev["environments"] == [] and dev["name"] == "development"

    # Pushed with --watch again: the same deployment, a new replica on the new project.
    write_model(project, "6", six="__import__('six').__version__")
    again = push_development(platform, project)["deployment"]
    assert again["id"] == dev_id
    # ACTIVE once the old replica is out of the table: only the new one answers.
    for _ in range(5):
        final = predict(platform, "dev-swap")
        assert final["value"] == 6 and final["pid"] != after["pid"]


def test_watch_without_development_deployment_says_how(platform: Platform, tmp_path: Path) -> None:
    project = make_project(tmp_path, "dev-none")
    with platform.client() as c:
        c.push(project)
        sha = c.upload(project)
        with pytest.raises(NotFoundError, match="'dev-none' has no development deployment"):
            c.development_sync("dev-none", sha)
        with pytest.raises(NotFoundError, match="no-such-model"):
            c.development_sync("no-such-model", sha)
        with pytest.raises(ValidationError, match="in no environment"):
            c.push(project, development=True, environment="staging")
    r = platform.cli("watch", str(project))
    assert r.returncode != 0
    assert "no development deployment" in r.stderr and "push --watch" in r.stderr


SERVER = """
import json, os
from http.server import BaseHTTPRequestHandler, HTTPServer

MESSAGE = open("message.txt").read().strip()


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        self._answer()

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._answer()

    def _answer(self):
        body = json.dumps({"message": MESSAGE, "pid": os.getpid()}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


HTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
"""


def test_custom_server_restarts_on_new_files(platform: Platform, tmp_path: Path) -> None:
    port = free_port()
    project = tmp_path / "dev-custom"
    project.mkdir()
    (project / "config.yaml").write_text(
        "model_name: dev-custom\ndocker_server:\n  start_command: python3 server.py\n"
        f"  server_port: {port}\n  predict_endpoint: /predict\n"
        "  readiness_endpoint: /health\n  liveness_endpoint: /health\n"
    )
    (project / "server.py").write_text(SERVER.replace("PORT", str(port)))
    (project / "message.txt").write_text("one\n")
    push_development(platform, project)
    first = predict(platform, "dev-custom")
    assert first["message"] == "one"

    (project / "message.txt").write_text("two\n")
    done = sync(platform, project, "dev-custom")
    assert (done["kind"], done["ok"], done["changed"]) == ("reload", True, ["message.txt"])
    second = predict(platform, "dev-custom")
    assert second["message"] == "two" and second["pid"] != first["pid"]

    (project / "server.py").write_text("raise SystemExit('broken on purpose')\n")
    done = sync(platform, project, "dev-custom")
    assert (done["kind"], done["ok"]) == ("reload", False), done
    assert "broken on purpose" in done["traceback"]
    wait_for(
        lambda: predict(platform, "dev-custom")["message"] == "two" or None,
        30,
        "the server to run on the last good files again",
    )


def test_a_failed_first_push_recovers_with_the_fix(platform: Platform, tmp_path: Path) -> None:
    project = make_project(
        tmp_path, "dev-fix", "requirements:\n  - kingpost-no-such-package-zz==1.0\n"
    )
    with platform.client() as c:
        dep = c.push(project, development=True)["deployment"]
    platform.wait_status(dep["id"], "BUILD_FAILED", timeout=120)
    (project / "config.yaml").write_text("model_name: dev-fix\n")
    write_model(project, "8")
    done = sync(platform, project, "dev-fix")
    assert (done["kind"], done["ok"]) == ("swap", True), done
    assert done["deployment"]["status"] in ("DEPLOYING", "ACTIVE")
    assert predict(platform, "dev-fix")["value"] == 8
    platform.wait_status(dep["id"], "ACTIVE", timeout=30)


def test_an_idle_development_deployment_scales_to_zero_and_wakes_on_its_files(
    platform: Platform, tmp_path: Path
) -> None:
    """Issues 25/26: the development deployment scales to zero when idle with the
    autoscaler's mechanism; a change made meanwhile is recorded (nothing runs to reload),
    and the next request wakes a replica on the new files."""
    project = make_project(tmp_path, "dev-zero")
    dep = push_development(platform, project)["deployment"]
    assert dep["min_replicas"] == 0 and dep["max_replicas"] == 1
    assert predict(platform, "dev-zero")["value"] == 1
    with platform.client() as c:
        c.update_autoscaling(
            "dev-zero", {"autoscaling_window": 10, "scale_down_delay": 0}, deployment=dep["id"]
        )
    platform.wait_status(dep["id"], "SCALED_TO_ZERO", timeout=60)
    write_model(project, "7")
    done = sync(platform, project, "dev-zero")
    assert (done["kind"], done["ok"], done["changed"]) == ("recorded", True, ["model/model.py"])
    assert predict(platform, "dev-zero")["value"] == 7  # held while a replica wakes
