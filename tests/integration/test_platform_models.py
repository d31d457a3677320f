"""Model-class projects through the whole platform: push -> controller -> process engine ->
kingpost.server -> gateway -> predict."""

from __future__ import annotations

import contextlib
import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from helpers.platform import REPO, Platform

FIXTURES = REPO / "tests" / "fixtures" / "models"


def deploy(
    platform: Platform, name: str, *statuses: str, timeout: float = 120
) -> tuple[str, dict[str, Any]]:
    with platform.client() as c:
        result = c.push(FIXTURES / name)
    dep = platform.wait_status(
        result["deployment"]["id"], *(statuses or ("ACTIVE",)), timeout=timeout
    )
    return result["model"]["id"], dep


def predict_url(model_id: str) -> str:
    return f"/models/{model_id}/environments/production/predict"


def test_basic_async_and_pre_post(platform: Platform) -> None:
    with platform.gateway() as gw:
        model_id, _ = deploy(platform, "pre_post")
        r = gw.post(predict_url(model_id), json={"value": 1})
        assert r.json() == {"value": 20, "steps": ["pre", "predict", "post"]}
        model_id, _ = deploy(platform, "async_model")
        assert gw.post(predict_url(model_id), json={"n": 21}).json()["n"] == 42


def test_streaming_through_the_gateway(platform: Platform) -> None:
    model_id, _ = deploy(platform, "streaming")
    with platform.gateway() as gw, gw.stream("POST", predict_url(model_id), json={"n": 4}) as r:
        assert r.status_code == 200
        assert r.headers["transfer-encoding"] == "chunked"
        assert b"".join(r.iter_raw()) == b"chunk-0;chunk-1;chunk-2;chunk-3;"


def test_predict_cli_says_a_stream_was_broken_off_not_that_the_gateway_is_unreachable(
    platform: Platform,
) -> None:
    """A generator that raised midway got `cannot reach the gateway at ...`, after the
    chunks that came through it: the user went looking for a network problem."""
    _, dep = deploy(platform, "streaming")
    args = ("predict", "-m", "streaming", "--deployment", dep["id"], "-d")
    ok = platform.cli(*args, '{"n": 2}')
    assert ok.returncode == 0 and ok.stdout.startswith("chunk-0;chunk-1;"), ok.stderr
    out = platform.cli(*args, '{"n": 3, "fail_at": 1}')
    assert out.returncode == 1 and out.stdout.startswith("chunk-0;"), out
    text = " ".join(out.stderr.split())
    assert "cannot reach" not in text and "broken off" in text, text
    assert f"kingpost logs --deployment {dep['id']}" in text, text
    request_id = text.split("request id ")[1].split(";")[0]
    logs = platform.cli("logs", "--deployment", dep["id"]).stdout
    assert any(request_id in ln and "stream failed on purpose" in ln for ln in logs.splitlines()), (
        request_id,
        logs,
    )


def test_request_argument_and_pydantic_inputs(platform: Platform) -> None:
    with platform.gateway() as gw:
        model_id, _ = deploy(platform, "request_only")
        r = gw.post(predict_url(model_id), content=b"raw bytes", headers={"x-custom": "yes"})
        assert r.json()["raw"] == "raw bytes" and r.json()["header"] == "yes"
        model_id, _ = deploy(platform, "pydantic_types")
        assert gw.post(predict_url(model_id), json={"text": "ab", "times": 2}).json() == {
            "result": "abab",
            "length": 4,
        }
        bad = gw.post(predict_url(model_id), json={"times": "many"})
        assert bad.status_code == 400 and "text" in bad.json()["error"]


def test_error_in_predict_is_generic_500(platform: Platform) -> None:
    model_id, _ = deploy(platform, "predict_error")
    with platform.gateway() as gw:
        r = gw.post(predict_url(model_id), json={})
    assert r.status_code == 500
    assert "secret internals" not in r.text and "error" in r.json()


def test_error_in_load_fails_the_deployment_with_its_traceback(platform: Platform) -> None:
    _, dep = deploy(platform, "load_error", "FAILED", timeout=120)
    assert "load failed on purpose" in dep["message"]


def test_secrets_reach_the_model(platform: Platform) -> None:
    with platform.client() as c:
        c.set_secret("api_key", "from-the-store")
    model_id, _ = deploy(platform, "secrets")
    with platform.gateway() as gw:
        assert gw.post(predict_url(model_id), json={"name": "api_key"}).json() == {
            "value": "from-the-store"
        }
        assert gw.post(predict_url(model_id), json={"name": "with_default"}).json() == {
            "value": "the-default"
        }
        assert gw.post(predict_url(model_id), json={"name": "overridden"}).json() == {
            "value": "from-a-variable"
        }


@pytest.mark.parametrize(
    ("fixture", "serial"), [("slow_concurrency_1", True), ("slow_concurrency_2", False)]
)
def test_predict_concurrency_is_enforced_end_to_end(
    platform: Platform, fixture: str, serial: bool
) -> None:
    model_id, _ = deploy(platform, fixture)
    url = platform.gateway_url + predict_url(model_id)
    headers = {"Authorization": f"Api-Key {platform.api_key}"}
    codes: list[int] = []

    def call() -> None:
        codes.append(
            httpx.post(url, json={"seconds": 0.5}, headers=headers, timeout=30).status_code
        )

    threads = [threading.Thread(target=call) for _ in range(2)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    assert codes == [200, 200]
    assert (elapsed >= 1.0) if serial else (elapsed < 0.95)


@pytest.mark.slow
def test_project_files_do_not_replace_installed_or_standard_modules(platform: Platform) -> None:
    """A project's root ``yaml.py`` crashed the server at start (the working directory came
    first on its path), and bundled packages replaced installed ones, unlike Truss."""
    with platform.client() as c:
        dep_id = c.push(FIXTURES / "shadowing")["deployment"]["id"]
    platform.wait_status(dep_id, "ACTIVE")
    with platform.gateway() as gw:
        r = gw.post("/models/shadowing/production/predict", json={})
    assert r.json() == {"stdlib_secrets": True, "installed_click": True, "bundled": "bundled"}


def test_requirements_are_installed_for_the_deployment(platform: Platform) -> None:
    model_id, dep = deploy(platform, "with_requirements", timeout=300)
    with platform.gateway() as gw:
        r = gw.post(predict_url(model_id), json={})
    assert r.status_code == 200, r.text
    with platform.client() as c:
        assert any("six" in line["text"] for line in c.logs(dep["id"], 2000))


def test_venvs_gc_removes_only_environments_no_deployment_uses(
    platform: Platform, tmp_path: Path
) -> None:
    """Every set of requirements leaves a virtualenv under the home (gigabytes with
    torch); `kingpost venvs gc` removes those of deleted deployments, and no other."""
    model_id, kept = deploy(platform, "with_requirements", timeout=300)
    older = tmp_path / "older"
    shutil.copytree(FIXTURES / "with_requirements", older)
    config = older / "config.yaml"
    config.write_text(config.read_text().replace("six==1.16.0", "six==1.15.0"))
    with platform.client() as c:  # a second deployment of the model, not promoted
        gone = c.push(older)["deployment"]
    platform.wait_status(gone["id"], "ACTIVE", timeout=300)
    listed = json.loads(platform.cli("venvs", "list", "--output", "json").stdout)
    users = {v["hash"]: v["deployments"] for v in listed}
    (kept_env,) = [h for h, deps in users.items() if kept["id"] in deps]
    (gone_env,) = [h for h, deps in users.items() if deps == [gone["id"]]]
    assert kept_env != gone_env
    shown = platform.cli("venvs", "show", gone_env[:8])  # what it was built with
    assert shown.returncode == 0 and "six==1.15.0" in shown.stdout.splitlines(), shown.stdout
    missing = platform.cli("venvs", "show", "f" * 24)
    assert missing.returncode != 0 and "no environment" in missing.stderr, missing.stderr
    with platform.client() as c:
        c.deployment_action(model_id, gone["id"], "delete")
    out = platform.cli("venvs", "gc")
    assert out.returncode == 0 and "removed" in out.stdout, out.stdout + out.stderr
    envs = platform.home / "envs"
    assert not (envs / gone_env).exists() and (envs / kept_env).is_dir()
    assert gone_env not in {
        v["hash"] for v in json.loads(platform.cli("venvs", "list", "-o", "json").stdout)
    }
    with platform.gateway() as gw:  # the deployment left serves on
        assert gw.post(predict_url(model_id), json={}).status_code == 200


def test_gc_removes_a_deleted_models_project_and_replica_dirs_and_nothing_else(
    platform: Platform, tmp_path: Path
) -> None:
    """Disk was never reclaimed: a deleted model's upload and its replicas' working copies
    stayed. `kingpost gc` removes them (past their graces, which the test ages them past),
    and leaves every other model's files."""
    import os

    project = tmp_path / "gc-me"
    shutil.copytree(FIXTURES / "pre_post", project)
    (project / "config.yaml").write_text("model_name: gc-me\n")
    with platform.client() as c:
        sha = c.upload(project)
        result = c.push(project)
    dep_id = result["deployment"]["id"]
    platform.wait_status(dep_id, "ACTIVE")
    home = platform.home
    mine = list((home / "replicas").glob(f"{dep_id}-*"))
    assert mine and (home / "projects" / sha).is_dir()
    others_before = {p.name for p in (home / "replicas").iterdir()} - {p.name for p in mine}
    with platform.client() as c:
        c.delete_model("gc-me")
    old = time.time() - 7200
    deadline = time.time() + 30

    def age(path: str) -> None:
        with contextlib.suppress(FileNotFoundError):  # gone meanwhile: a gc or the replica's stop
            os.utime(path, (old, old))

    while time.time() < deadline:  # the replica stops, then its directory may go
        # A gc before the replica stopped may already have removed the project: age what
        # is still there (its removal is checked below).
        for path in [home / "projects" / sha, *mine]:
            for root, dirs, files in os.walk(path):
                for name in dirs + files:
                    age(os.path.join(root, name))
            age(str(path))
        out = platform.cli("gc", "-o", "json")
        assert out.returncode == 0, out.stderr
        if not any(p.exists() for p in mine):
            break
        time.sleep(1)
    report = json.loads(out.stdout)
    assert not (home / "projects" / sha).exists()
    assert not any(p.exists() for p in mine), report
    assert others_before <= {p.name for p in (home / "replicas").iterdir()}
    human = platform.cli("gc")
    assert human.returncode == 0 and "projects and replica dirs: removed" in human.stdout
