"""The docker engine end to end, on a real Docker Engine.

Skipped with the reason when no engine answers on a developer machine; under
``CI=true`` a missing engine fails instead. The Kingpost base image is built
once per machine with debootstrap (see kingpost.images.base) and reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from test_platform_models import FIXTURES
from test_platform_push import copy_project
from test_platform_rollouts import Load
from websockets.sync.client import connect

from helpers.platform import EXAMPLES, Platform, wait_for

# The first test may build the base image and pip-install a model-class image.
pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(900)]

ECHO = EXAMPLES / "echo-server"


def _docker() -> Any:
    try:
        import docker

        client = docker.from_env(timeout=120)
        client.ping()
    except Exception as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true, but no Docker Engine answers: {exc}")
        pytest.skip(f"no Docker Engine answers here ({exc}); start dockerd to run these")
    return client


@pytest.fixture(scope="module")
def docker_client() -> Iterator[Any]:
    client = _docker()
    from kingpost.images import ensure_base_image

    ensure_base_image(client, log=lambda line: None)  # once per machine; cached by tag
    yield client
    client.close()


def _remove_containers(client: Any, home: Path) -> None:
    """Remove what a test's home left with the Docker Engine and on tmpfs (secret files
    outlive a stopped control plane, as its containers do)."""
    from kingpost.engines._secrets import remove_secrets
    from kingpost.engines.docker import LABEL_SCOPE, _secrets_root, scope_of

    scope = scope_of(home)
    for c in client.containers.list(all=True, filters={"label": f"{LABEL_SCOPE}={scope}"}):
        c.remove(force=True, v=True)
    for net in client.networks.list(filters={"label": f"{LABEL_SCOPE}={scope}"}):
        net.remove()
    remove_secrets(_secrets_root(scope))


@pytest.fixture(scope="module")
def dplatform(docker_client: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    home = tmp_path_factory.mktemp("kingpost-docker")
    p = Platform(home, engine="docker").start()
    try:
        yield p
    finally:
        p.stop()
        _remove_containers(docker_client, home)


def containers_of(client: Any, dep_id: str) -> list[Any]:
    return list(
        client.containers.list(all=True, filters={"label": f"kingpost.deployment={dep_id}"})
    )


def push(platform: Platform, project: Path, **options: Any) -> dict[str, Any]:
    with platform.client() as c:
        result: dict[str, Any] = c.push(project, **options)
    return result


def test_custom_server_replicas_share_a_fixed_port_with_uid_secrets_limits_and_weights(
    dplatform: Platform, docker_client: Any, tmp_path: Path, public_tmp: Path
) -> None:
    weights_src = public_tmp / "weights-src"  # any user may read it: the mirror copies only that
    (weights_src / "sub").mkdir(parents=True)
    (weights_src / "model.bin").write_bytes(b"w" * 1000)
    (weights_src / "sub" / "tok.json").write_text("{}")
    project = copy_project(
        tmp_path,
        "dock-echo",
        "model_name: dock-echo\n"
        "secrets:\n  dock_token: null\n"
        "resources:\n  cpu: 500m\n  memory: 256Mi\n"
        "weights:\n"
        f"  - source: file://{weights_src}\n"
        "    mount_location: /models/echo\n"
        "    allow_patterns: ['**/*']\n",
    )
    text = (project / "config.yaml").read_text()
    (project / "config.yaml").write_text(
        text.replace("  server_port: 8000\n", "  server_port: 8000\n  run_as_user_id: 4321\n")
    )
    with dplatform.client() as c:
        c.set_secret("dock_token", "s3cr3t-value")
    result = push(dplatform, project, min_replicas=2)
    dep_id, model_id = result["deployment"]["id"], result["model"]["id"]
    dplatform.wait_status(dep_id, "ACTIVE", timeout=300)

    containers = wait_for(
        lambda: (
            [c for c in containers_of(docker_client, dep_id) if c.status == "running"]
            if len(containers_of(docker_client, dep_id)) == 2
            else None
        ),
        60,
        "two running containers",
    )
    assert len(containers) == 2
    for container in containers:
        host = container.attrs["HostConfig"]
        assert host["NanoCpus"] == 500_000_000
        assert host["Memory"] == 256 * 1024**2
        assert not host["PortBindings"]  # reached on Kingpost's network, no host ports

    seen: dict[str, dict[str, Any]] = {}
    path = f"/models/{model_id}/environments/production/sync/env"
    with dplatform.gateway() as gw:

        def both_replicas_answered() -> bool:
            body = gw.get(path).json()
            seen[body["env"]["HOSTNAME"]] = body
            return len(seen) == 2

        wait_for(both_replicas_answered, 60, "answers from both replicas")
        for body in seen.values():
            assert body["uid"] == 4321
            assert body["secrets"] == {"dock_token": "s3cr3t-value"}
            assert body["secrets_writable"] is False
            assert body["env"]["GREETING"] == "hello"
            assert body["env"]["BT_MODEL_DEPLOYMENT_ID"] == dep_id
            assert body["env"]["KINGPOST_SECRETS_DIR"] == "/secrets"
        files = gw.get(f"/models/{model_id}/environments/production/sync/files?dir=/models/echo")
        assert files.json() == {"files": ["model.bin", "sub/tok.json"], "writable": False}
        r = gw.post(f"/models/{model_id}/environments/production/predict", json={"a": 1})
        assert r.status_code == 200 and r.json()["echo"] == {"a": 1}

    with dplatform.client() as c:
        c.deployment_action(model_id, dep_id, "deactivate")
    dplatform.wait_status(dep_id, "INACTIVE")
    wait_for(lambda: not containers_of(docker_client, dep_id), 60, "containers removed")
    with dplatform.client() as c:
        lines = [entry["text"] for entry in c.logs(dep_id)]
    assert any("Step" in line or "up to date" in line for line in lines), lines


def test_model_class_project_runs_in_a_container(dplatform: Platform, tmp_path: Path) -> None:
    project = copy_project(
        tmp_path, "dock-model", "model_name: dock-model\n", base=EXAMPLES / "echo-model"
    )
    result = push(dplatform, project)
    dep_id, model_id = result["deployment"]["id"], result["model"]["id"]
    dplatform.wait_status(dep_id, "ACTIVE", timeout=600)
    with dplatform.gateway() as gw:
        r = gw.post(f"/models/{model_id}/environments/production/predict", json={"text": "hi"})
        assert r.status_code == 200, r.text
        assert "hi" in r.text


def test_a_development_deployment_reloads_code_in_place_and_swaps_for_requirements(
    dplatform: Platform, docker_client: Any, tmp_path: Path
) -> None:
    """On docker a sync of changed model code is patched into the running container's
    ``/app`` volume and the model reloaded in place: the same container on the same image.
    A reload that fails serves on the old code. A requirements change builds the next
    image and swaps. The model imports Truss's server packages (numpy below 2) without
    listing them."""
    from test_platform_development import make_project, predict, sync, write_model

    numpy = "__import__('numpy').__version__ + ' ' + __import__('requests').__name__"
    project = make_project(tmp_path, "dock-dev")
    write_model(project, "1", six=numpy)
    dep = push(dplatform, project, development=True)["deployment"]
    dplatform.wait_status(dep["id"], "ACTIVE", timeout=600)  # builds an image first
    first = predict(dplatform, "dock-dev")
    assert first["value"] == 1
    assert first["six"].startswith("1.") and first["six"].endswith(" requests"), first

    def live() -> list[tuple[str, str]]:
        # The list call alone: the SDK's inspect of each races a container being removed
        found = docker_client.api.containers(
            filters={"label": f"kingpost.deployment={dep['id']}", "status": "running"}
        )
        return [(str(c["Id"]), str(c["ImageID"])) for c in found]

    def running() -> tuple[str, str]:
        wait_for(lambda: len(live()) == 1, 60, "one running container")
        (container,) = live()
        return container

    before = running()
    write_model(project, "2", six=numpy)
    done = sync(dplatform, project, "dock-dev")
    assert (done["kind"], done["ok"], done["changed"]) == ("reload", True, ["model/model.py"])
    assert predict(dplatform, "dock-dev") == {**first, "value": 2}

    write_model(project, "3", six=numpy, extra="\ndef broken(:\n")
    done = sync(dplatform, project, "dock-dev")
    assert (done["kind"], done["ok"]) == ("reload", False), done
    assert "SyntaxError" in done["error"] and "model.py" in done["traceback"]
    assert predict(dplatform, "dock-dev") == {**first, "value": 2}
    assert running() == before  # patched and reloaded, never replaced

    # A new container of it (here: its container removed) runs the current files, from
    # the image the controller rebuilt after the reload, not the first image's.
    docker_client.containers.get(before[0]).remove(force=True)
    wait_for(lambda: live() and live()[0][0] != before[0], 300, "a fresh container")
    with dplatform.gateway() as gw:
        wait_for(lambda: gw.post("/models/dock-dev/development/predict", json={}).status_code
                 == 200, 120, "the fresh replica to answer")  # fmt: skip
    assert predict(dplatform, "dock-dev")["value"] == 2
    assert running()[1] != before[1]
    before = running()

    # Requirements are in the image: a new one is built, and the replica swapped.
    (project / "config.yaml").write_text("model_name: dock-dev\nrequirements:\n  - requests\n")
    write_model(project, "4", six=numpy)
    done = sync(dplatform, project, "dock-dev")
    assert (done["kind"], done["ok"]) == ("swap", True), done
    assert predict(dplatform, "dock-dev")["value"] == 4
    after = running()
    assert after[0] != before[0] and after[1] != before[1]


def test_a_development_custom_server_restarts_in_its_container_on_new_files(
    dplatform: Platform, docker_client: Any, tmp_path: Path
) -> None:
    """The container restarts on the patched /app (same container, same image); a server
    that does not come up on the new files gets the old ones back and runs again."""
    from test_platform_development import SERVER, predict, sync

    project = tmp_path / "dock-dev-custom"
    project.mkdir()
    (project / "config.yaml").write_text(
        "model_name: dock-dev-custom\ndocker_server:\n  start_command: python3 server.py\n"
        "  server_port: 8000\n  predict_endpoint: /predict\n"
        "  readiness_endpoint: /health\n  liveness_endpoint: /health\n"
    )
    server = SERVER.replace('"127.0.0.1", PORT', '"0.0.0.0", 8000')
    (project / "server.py").write_text(server)
    (project / "message.txt").write_text("one\n")
    dep = push(dplatform, project, development=True)["deployment"]
    dplatform.wait_status(dep["id"], "ACTIVE", timeout=600)
    assert predict(dplatform, "dock-dev-custom")["message"] == "one"
    (before,) = [c.id for c in containers_of(docker_client, dep["id"])]

    (project / "message.txt").write_text("two\n")
    done = sync(dplatform, project, "dock-dev-custom")
    assert (done["kind"], done["ok"], done["changed"]) == ("reload", True, ["message.txt"])
    assert predict(dplatform, "dock-dev-custom")["message"] == "two"

    (project / "server.py").write_text("raise SystemExit('broken on purpose')\n")
    done = sync(dplatform, project, "dock-dev-custom")
    assert (done["kind"], done["ok"]) == ("reload", False), done
    assert "broken on purpose" in done["traceback"]
    assert predict(dplatform, "dock-dev-custom")["message"] == "two"
    assert [c.id for c in containers_of(docker_client, dep["id"])] == [before]


def test_build_commands_can_patch_the_bundled_packages_at_slash_packages(
    dplatform: Platform, tmp_path: Path
) -> None:
    """Truss runs build commands after the project is in the image, with bundled packages
    at /packages; its own test project patches a file there."""
    project = copy_project(
        tmp_path,
        "dock-patched",
        "model_name: dock-patched\n"
        "build_commands:\n"
        "  - sed -i s/upper/lower/ /packages/helperlib/__init__.py\n"
        "  - test -f model/model.py && touch built-in-app-dir\n",
        base=FIXTURES / "bundled",
    )
    result = push(dplatform, project)
    dep_id, model_id = result["deployment"]["id"], result["model"]["id"]
    dplatform.wait_status(dep_id, "ACTIVE", timeout=600)
    with dplatform.gateway() as gw:
        r = gw.post(f"/models/{model_id}/environments/production/predict", json={"text": "Hi"})
    assert (r.status_code, r.json()) == (200, {"shout": "hi!"})


def test_a_websocket_model_in_a_container(dplatform: Platform) -> None:
    # The gateway's upgrade tunnel reaches a replica behind Docker's port mapping, and the
    # server in the image (with its own framing) speaks WebSocket there too.
    with dplatform.client() as c:
        result = c.push(FIXTURES / "websocket_echo")
    dplatform.wait_status(result["deployment"]["id"], "ACTIVE", timeout=600)
    url = dplatform.gateway_url.replace("http://", "ws://")
    with connect(
        f"{url}/models/{result['model']['id']}/production/websocket",
        additional_headers={"Authorization": f"Api-Key {dplatform.api_key}"},
        open_timeout=30,
    ) as client:
        for word in ("one", "two"):
            client.send(word)
            assert client.recv(timeout=10) == f"echo: {word}"


def test_failing_build_command_is_reported(dplatform: Platform, tmp_path: Path) -> None:
    project = copy_project(
        tmp_path,
        "dock-broken",
        "model_name: dock-broken\n"
        "build_commands:\n"
        "  - echo first-step-ran\n"
        "  - echo about-to-fail && echo on-stderr >&2 && exit 3\n",
    )
    dep_id = push(dplatform, project)["deployment"]["id"]
    dep = dplatform.wait_status(dep_id, "BUILD_FAILED", timeout=300)
    assert "echo about-to-fail && echo on-stderr >&2 && exit 3" in dep["message"]
    tail = dep["message"].split("last output:")[1]
    assert "about-to-fail" in tail and "on-stderr" in tail
    # the builder paints stderr red and adds its own lines; neither helps the user
    assert "\x1b" not in tail and "Running in" not in tail, tail
    out = dplatform.cli("logs", "-d", dep_id)
    assert "first-step-ran" in out.stdout, out.stdout + out.stderr


def test_deactivating_a_deployment_stops_its_image_build(
    dplatform: Platform, docker_client: Any, tmp_path: Path
) -> None:
    """The build's thread stopped, but the Docker Engine ran the step on to its end: a
    ``RUN`` of an hour held a container (and a CPU) for an hour after the deployment was
    deactivated. Hanging up the build request makes the engine stop it."""
    marker = f"sleep {3000 + os.getpid() % 1000}"
    project = copy_project(
        tmp_path, "dock-slow", f"model_name: dock-slow\nbuild_commands:\n  - {marker}\n"
    )
    dep = push(dplatform, project)["deployment"]

    def step_containers() -> list[Any]:
        return [
            c
            for c in docker_client.containers.list(all=True)
            if marker in " ".join(c.attrs["Config"].get("Cmd") or [])
        ]

    wait_for(step_containers, 300, "the build to reach its slow step")
    # A second deployment of the same project waits for that build of the same image,
    # and stops waiting when it is deactivated itself.
    second = push(dplatform, project)["deployment"]

    def waiting() -> bool:
        logs = dplatform.cli("logs", "-d", second["id"]).stdout
        return "waiting for another deployment's build of image" in logs

    wait_for(waiting, 60, "the second build to wait for the first")
    with dplatform.client() as c:
        c.deployment_action(second["model_id"], second["id"], "deactivate")
    dplatform.wait_status(second["id"], "INACTIVE")
    assert step_containers(), "the first build must go on"
    with dplatform.client() as c:
        c.deployment_action(dep["model_id"], dep["id"], "deactivate")
    wait_for(lambda: not step_containers(), 30, "the engine to stop the build")
    dplatform.wait_status(dep["id"], "INACTIVE")
    out = dplatform.cli("logs", "-d", dep["id"]).stdout
    assert "--- build stopped: the deployment was deactivated" in out, out


def test_a_built_image_runs_as_its_deployments_uid_and_writes_its_paths(
    dplatform: Platform, tmp_path: Path
) -> None:
    # The image's writable directories belong to UID 60000; each container's copies of
    # them are handed to the deployment's own UID before it starts.
    from kingpost.engines.docker import deployment_uid

    project = copy_project(tmp_path, "dock-uid", "model_name: dock-uid\n")
    result = push(dplatform, project)
    dep_id, model_id = result["deployment"]["id"], result["model"]["id"]
    dplatform.wait_status(dep_id, "ACTIVE", timeout=300)
    sync = f"/models/{model_id}/environments/production/sync"
    with dplatform.gateway() as gw:
        assert gw.get(f"{sync}/env").json()["uid"] == deployment_uid(dep_id)
        for folder in ("/app", "/home/app", "/workspace", "/packages", "/tmp"):
            assert gw.get(f"{sync}/files?dir={folder}").json()["writable"] is True, folder
        for folder in ("/etc", "/usr", "/opt"):
            assert gw.get(f"{sync}/files?dir={folder}").json()["writable"] is False, folder


def test_killed_container_is_replaced(
    dplatform: Platform, docker_client: Any, tmp_path: Path
) -> None:
    project = copy_project(tmp_path, "dock-kill", "model_name: dock-kill\n")
    result = push(dplatform, project)
    dep_id, model_id = result["deployment"]["id"], result["model"]["id"]
    dplatform.wait_status(dep_id, "ACTIVE", timeout=300)
    (container,) = containers_of(docker_client, dep_id)
    container.kill()
    url = f"/models/{model_id}/environments/production/predict"
    with dplatform.gateway() as gw:
        wait_for(lambda: gw.post(url, json={"after": "kill"}).status_code == 200, 60, "recovery")
    container.reload()
    assert container.status == "running"
    # Removed from outside, it is created anew.
    container.remove(force=True, v=True)
    with dplatform.gateway() as gw:
        wait_for(
            lambda: (
                containers_of(docker_client, dep_id) and gw.post(url, json={}).status_code == 200
            ),
            60,
            "a new container",
        )


def test_control_plane_restart_adopts_running_containers(
    docker_client: Any, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    platform = Platform(home, engine="docker").start()
    try:
        project = copy_project(tmp_path, "dock-adopt", "model_name: dock-adopt\n")
        dep_id = push(platform, project, min_replicas=2)["deployment"]["id"]
        platform.wait_status(dep_id, "ACTIVE", timeout=300)
        before = wait_for(
            lambda: (
                sorted(c.id for c in containers_of(docker_client, dep_id))
                if len(containers_of(docker_client, dep_id)) == 2
                else None
            ),
            60,
            "two containers",
        )
        gateway = json.loads((home / "run" / "gateway.json").read_text())["pid"]
        load = Load(platform, "dock-adopt")
        with load.running():  # through the crash: the gateway and the containers serve on
            time.sleep(0.5)
            platform.stop(signal.SIGKILL)  # a crash: nothing is cleaned up
            answered = len(load.answers)
            time.sleep(2)
            assert len(load.answers) > answered + 10, load.failed()[-3:]
            assert sorted(c.id for c in containers_of(docker_client, dep_id)) == before
            platform.start()
            platform.wait_status(dep_id, "ACTIVE", timeout=120)
            time.sleep(1)
        assert load.failed() == []
        assert json.loads((home / "run" / "gateway.json").read_text())["pid"] == gateway
        with platform.gateway() as gw:
            r = gw.post("/models/dock-adopt/environments/production/predict", json={"x": 2})
            assert r.status_code == 200 and r.json()["echo"] == {"x": 2}
        assert sorted(c.id for c in containers_of(docker_client, dep_id)) == before
    finally:
        platform.stop()
        _remove_containers(docker_client, home)


def test_no_build_runs_the_image_as_is_with_data(
    dplatform: Platform, docker_client: Any, tmp_path: Path
) -> None:
    from kingpost.images import base_image_tag

    project = tmp_path / "dock-nobuild"
    (project / "data").mkdir(parents=True)
    (project / "data" / "hello.txt").write_text("hello from data\n")
    (project / "config.yaml").write_text(
        "model_name: dock-nobuild\n"
        f"base_image:\n  image: {base_image_tag()}\n"
        "docker_server:\n"
        "  no_build: true\n"
        "  start_command: python3 -m http.server 8000 --directory /app\n"
        "  server_port: 8000\n"
        "  predict_endpoint: /\n"
        "  readiness_endpoint: /\n"
        "  liveness_endpoint: /\n"
        "system_packages: [curl]\n"
    )
    result = push(dplatform, project)
    assert any("system_packages" in w for w in result["warnings"]), result["warnings"]
    dep_id, model_id = result["deployment"]["id"], result["model"]["id"]
    dplatform.wait_status(dep_id, "ACTIVE", timeout=300)
    with dplatform.gateway() as gw:
        r = gw.get(f"/models/{model_id}/environments/production/sync/data/hello.txt")
        assert r.status_code == 200 and r.text == "hello from data\n"


def test_image_build_cli_builds_once(docker_client: Any, tmp_path: Path) -> None:
    project = copy_project(tmp_path, "dock-cli", "model_name: dock-cli\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KINGPOST_")}

    def build() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "kingpost.cli", "image", "build", str(project)],
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
        )

    first = build()
    assert first.returncode == 0, first.stderr
    tag = first.stdout.strip()
    assert tag.startswith("kingpost/dock-cli:")
    docker_client.images.get(tag)
    second = build()
    assert second.stdout.strip() == tag
    assert "up to date" in second.stderr and "Step" not in second.stderr
    (project / "server.py").write_text((project / "server.py").read_text() + "\n# changed\n")
    third = build()
    assert third.returncode == 0 and third.stdout.strip() != tag
    docker_client.images.remove(third.stdout.strip(), force=True)
    assert json.loads(json.dumps(docker_client.images.get(tag).labels))["kingpost.image"] == "1"


def test_the_build_context_carries_modes_nested_and_large_files(
    docker_client: Any, tmp_path: Path
) -> None:
    """The context is a tar streamed from the project's files, not a copy then a tar file:
    what reaches the image must be the same files, modes and bytes."""
    project = copy_project(tmp_path, "dock-ctx", "model_name: dock-ctx\n")
    script = project / "data" / "bin" / "run.sh"
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/sh\necho ran\n")
    script.chmod(0o750)
    blob = project / "data" / "deep" / "er" / "blob.bin"
    blob.parent.mkdir(parents=True)
    blob.write_bytes(os.urandom(3 * 1024 * 1024 + 123))  # several chunks, and a new image
    out = subprocess.run(
        [sys.executable, "-m", "kingpost.cli", "image", "build", str(project)],
        capture_output=True, text=True, timeout=600,
        env={k: v for k, v in os.environ.items() if not k.startswith("KINGPOST_")},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    tag = out.stdout.strip()
    try:
        listing = docker_client.containers.run(
            tag,
            ["sh", "-c", "data/bin/run.sh; stat -c '%a %s' data/bin/run.sh data/deep/er/blob.bin;"
             " sha256sum data/deep/er/blob.bin"],
            entrypoint=[], remove=True,
        ).decode()  # fmt: skip
    finally:
        docker_client.images.remove(tag, force=True)
    ran, script_stat, blob_stat, blob_sum = listing.strip().splitlines()
    assert ran == "ran"
    assert script_stat == f"754 {len(script.read_bytes())}"  # its mode, readable by all
    assert blob_stat == f"644 {blob.stat().st_size}"
    assert blob_sum.split()[0] == hashlib.sha256(blob.read_bytes()).hexdigest()


# -- the engine on its own (no control plane, no image build: the base image runs) ------------
ENGINE_CONFIG = (
    "model_name: eng\n"
    "docker_server:\n"
    "  start_command: python3 -m http.server 8000\n"
    "  server_port: 8000\n"
    "  predict_endpoint: /\n"
    "  readiness_endpoint: /\n"
    "  liveness_endpoint: /\n"
)


def _engine_spec(home: Path, replica_id: str, extra: str = "", config: str = "") -> Any:
    from kingpost.config import parse_config
    from kingpost.controller.specs import replica_spec
    from kingpost.images import base_image_tag

    return replica_spec(
        replica_id=replica_id,
        deployment_id=replica_id.split("-")[0],
        model_id="m1",
        model_name="eng",
        app_dir=home,
        config=parse_config((config or ENGINE_CONFIG) + extra).config,
        env={},
        secrets={"tok": "v"},
        image=base_image_tag(),
    )


def _wait_phases(engine: Any, want: dict[str, str]) -> None:
    wait_for(
        lambda: {s.replica_id: str(s.phase) for s in engine.poll()} == want,
        60,
        f"phases {want}",
    )


def _crash(engine: Any) -> None:
    """What SIGKILL leaves: the monitor stops, nothing is cleaned up."""
    engine._closing.set()
    engine._thread.join()
    engine._pool.shutdown(wait=True)


@pytest.fixture
def engine_home(docker_client: Any, tmp_path: Path) -> Iterator[Path]:
    home = tmp_path / "home"
    home.mkdir()
    try:
        yield home
    finally:
        _remove_containers(docker_client, home)


def test_adopted_serving_container_is_ready_at_once(engine_home: Path) -> None:
    # The controller's first pass after a restart publishes the table: a replica that
    # serves must be in it, not STARTING until the monitor's first probe.
    from kingpost.engines.docker import DockerEngine
    from kingpost.settings import Settings

    settings = Settings(home=engine_home)
    first = DockerEngine(settings)
    first.start(_engine_spec(engine_home, "dep1-aaaaa"))
    _wait_phases(first, {"dep1-aaaaa": "ready"})
    _crash(first)
    second = DockerEngine(settings)
    try:
        assert [(s.replica_id, str(s.phase)) for s in second.poll()] == [("dep1-aaaaa", "ready")]
    finally:
        second.close()


def test_secrets_of_containers_gone_while_down_are_removed(
    engine_home: Path, docker_client: Any
) -> None:
    from kingpost.engines.docker import DockerEngine, _secrets_root, scope_of
    from kingpost.settings import Settings

    settings = Settings(home=engine_home)
    root = _secrets_root(scope_of(engine_home))
    first = DockerEngine(settings)
    for replica_id in ("dep1-aaaaa", "dep1-bbbbb"):
        first.start(_engine_spec(engine_home, replica_id))
    _wait_phases(first, {"dep1-aaaaa": "ready", "dep1-bbbbb": "ready"})
    _crash(first)
    docker_client.containers.get("kingpost-dep1-bbbbb").kill()  # exits while nothing watches
    assert sorted(p.name for p in root.iterdir()) == ["dep1-aaaaa", "dep1-bbbbb"]
    second = DockerEngine(settings)
    try:
        assert [s.replica_id for s in second.poll()] == ["dep1-aaaaa"]
        # The exited container is removed and replaced by a new replica: its secret
        # files must not stay on tmpfs for good.
        assert sorted(p.name for p in root.iterdir()) == ["dep1-aaaaa"]
    finally:
        second.close()


def test_a_container_that_cannot_start_is_not_left_behind(
    engine_home: Path, docker_client: Any
) -> None:
    # No GPU runtime here: the container is created, and starting it fails.
    from kingpost.engines.docker import DockerEngine
    from kingpost.settings import Settings

    engine = DockerEngine(Settings(home=engine_home))
    try:
        spec = _engine_spec(engine_home, "dep1-ggggg", "resources:\n  accelerator: T4\n")
        # As placed on a GPU host: a device request for that device's id.
        engine.start(replace(spec, gpus=("GPU-00000000-0000-0000-0000-000000000000",)))
        _wait_phases(engine, {"dep1-ggggg": "failed"})
        (status,) = engine.poll()
        assert "GPU" in status.message
        engine.stop("dep1-ggggg")
        wait_for(lambda: not engine.poll() and not engine._replicas, 30, "the replica stopped")
        left = docker_client.containers.list(all=True, filters={"name": "kingpost-dep1-ggggg"})
        assert [(c.name, c.status) for c in left] == []
    finally:
        engine.close()


def test_a_secrets_directory_someone_else_made_is_refused(engine_home: Path) -> None:
    # /dev/shm is world-writable and the directory's name is predictable (the scope is a
    # hash of the home path): whoever made it could read or swap the secret files in it.
    from kingpost.engines.docker import DockerEngine, _secrets_root, scope_of
    from kingpost.errors import EngineError
    from kingpost.settings import Settings

    if os.geteuid() != 0:
        pytest.skip("needs root to make a directory owned by another user")
    root = _secrets_root(scope_of(engine_home))
    root.mkdir(mode=0o777)
    root.chmod(0o777)
    os.chown(root, 65534, 65534)
    with pytest.raises(EngineError, match="not owned"):
        DockerEngine(Settings(home=engine_home)).close()


PROBE = """
import ctypes, json, os, socket, sys
def attempt(f):
    try:
        f()
        return "ok"
    except OSError as exc:
        return type(exc).__name__
def write(path):
    return lambda: open(path, "w").write("x")
status = dict(line.split(":\\t", 1) for line in open("/proc/self/status").read().splitlines())
print(json.dumps({
    "uid": os.getuid(),
    "caps": status["CapEff"].strip(),
    "bounding": status["CapBnd"].strip(),
    "no_new_privs": status["NoNewPrivs"].strip(),
    "raw": attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)),
    "etc": attempt(write("/etc/kingpost-probe")),
    "tmp": attempt(write("/tmp/probe")),
    "home": attempt(write(os.environ["HOME"] + "/probe")),
    "workspace": attempt(write("/workspace/probe")),
    "tmp_16m": attempt(lambda: open("/tmp/big", "wb").write(b"x" * (16 << 20))),
    "peer": attempt(lambda: socket.create_connection((sys.argv[1], 8000), timeout=3)),
    "inotify": ctypes.CDLL(None, use_errno=True).inotify_init1(0) >= 0,
}))
"""

HOLD_INOTIFY = """
import ctypes, time
libc, held = ctypes.CDLL(None), 0
while libc.inotify_init1(0) >= 0:
    held += 1
open("/tmp/held", "w").write(str(held))
time.sleep(120)
"""

FORK = """
import threading
stop, n = threading.Event(), 0
try:
    while n < 10000:
        threading.Thread(target=stop.wait, daemon=True).start()
        n += 1
except RuntimeError:
    pass
print(n)
stop.set()
"""


def test_replicas_are_unprivileged_bounded_and_reach_no_other_replica(
    engine_home: Path, docker_client: Any
) -> None:
    # What the docker probe of issue 23 did from inside a replica: connect straight to
    # another model's server (skipping the gateway's keys), open a raw socket, write /etc,
    # fork without end, fill the disk. A no_build image used to run as root with caps.
    from kingpost.engines.docker import (
        ICC_OPTION,
        DockerEngine,
        deployment_uid,
        network_name,
        scope_of,
    )
    from kingpost.images import base_image_tag
    from kingpost.settings import Settings

    no_build = (
        f"model_name: raw\nbase_image:\n  image: {base_image_tag()}\n"
        "docker_server:\n  no_build: true\n"
        "  start_command: python3 -m http.server 8000\n  server_port: 8000\n"
        "  predict_endpoint: /\n  readiness_endpoint: /\n  liveness_endpoint: /\n"
    )
    settings = Settings(home=engine_home, docker_pids_limit=64, docker_tmp_size_mb=8)
    engine = DockerEngine(settings)
    try:
        engine.start(_engine_spec(engine_home, "depa-aaaaa"))
        engine.start(_engine_spec(engine_home, "depb-bbbbb", config=no_build))
        # READY: the host (where the gateway runs) reaches both through their probes.
        _wait_phases(engine, {"depa-aaaaa": "ready", "depb-bbbbb": "ready"})
        ips = {s.replica_id: s.endpoint.host for s in engine.poll() if s.endpoint}

        def probe(replica_id: str, peer: str) -> dict[str, str]:
            container = docker_client.containers.get(f"kingpost-{replica_id}")
            code, out = container.exec_run(["python3", "-c", PROBE, peer])
            assert code == 0, out
            result: dict[str, str] = json.loads(out)
            return result

        for replica_id, peer in (("depb-bbbbb", "depa-aaaaa"), ("depa-aaaaa", "depb-bbbbb")):
            seen = probe(replica_id, ips[peer])
            assert seen["peer"] in ("TimeoutError", "ConnectionRefusedError"), seen
            assert seen["uid"] == deployment_uid(replica_id.split("-")[0]), seen
            assert seen["caps"] == "0000000000000000", seen
            assert seen["bounding"] == "0000000000000000", seen  # cap_drop: ALL
            assert seen["no_new_privs"] == "1" and seen["raw"] == "PermissionError", seen
            assert seen["etc"] == "OSError" and seen["tmp"] == "ok", seen
            assert seen["tmp_16m"] == "OSError", seen  # /tmp is 8 MiB
        assert probe("depb-bbbbb", ips["depa-aaaaa"])["home"] == "ok"  # no_build: own tmpfs
        assert probe("depb-bbbbb", ips["depa-aaaaa"])["workspace"] == "ok"
        net = docker_client.networks.get(network_name(scope_of(engine_home)))
        assert net.attrs["Options"][ICC_OPTION] == "false"

        # Per-user kernel limits: A takes every inotify instance its UID may hold; B,
        # another deployment with a UID of its own, still gets one.
        container = docker_client.containers.get("kingpost-depa-aaaaa")
        container.exec_run(["python3", "-c", HOLD_INOTIFY], detach=True)
        wait_for(lambda: container.exec_run(["cat", "/tmp/held"]).exit_code == 0, 30, "held")
        assert probe("depa-aaaaa", ips["depb-bbbbb"])["inotify"] is False
        assert probe("depb-bbbbb", ips["depa-aaaaa"])["inotify"] is True

        container = docker_client.containers.get("kingpost-depa-aaaaa")
        code, out = container.exec_run(["python3", "-c", FORK])
        assert code == 0 and 10 < int(out) < 64, out  # stopped at the limit, not at 10000
        assert subprocess.run(["true"], check=False).returncode == 0  # the host is fine
        assert {s.replica_id: str(s.phase) for s in engine.poll()}["depa-aaaaa"] == "ready"

        engine.stop("depa-aaaaa")
        engine.stop("depb-bbbbb")
        wait_for(lambda: not engine._replicas, 60, "the replicas removed")
        # The last replica gone, so is this installation's network: removed just after
        # the replica is forgotten (the wait above can see that first; a CI run did).
        name = network_name(scope_of(engine_home))
        wait_for(
            lambda: name not in [n.name for n in docker_client.networks.list()],
            30,
            "the installation's network removed",
        )
    finally:
        engine.close()


def test_a_named_network_that_lets_containers_talk_is_refused(
    engine_home: Path, docker_client: Any
) -> None:
    from kingpost.engines.docker import DockerEngine
    from kingpost.errors import EngineError
    from kingpost.settings import Settings

    name = f"kingpost-test-open-{engine_home.parent.name[-12:]}"
    docker_client.networks.create(name, driver="bridge")
    try:
        with pytest.raises(EngineError, match="enable_icc"):
            DockerEngine(Settings(home=engine_home, docker_network=name)).close()
    finally:
        docker_client.networks.get(name).remove()


def test_a_container_of_an_older_kingpost_is_replaced_not_adopted(
    engine_home: Path, docker_client: Any
) -> None:
    # Before issue 23, containers shared one open network and no_build ones ran as root:
    # adopting such a container would keep it exposed for as long as it runs.
    from kingpost.engines.docker import LABEL_RUNTIME, DockerEngine, scope_of
    from kingpost.images import base_image_tag
    from kingpost.settings import Settings

    runtime = json.dumps({"port": 8000, "readiness": "/", "liveness": "/", "period": 1,
                          "timeout": 1, "ready_threshold": 1, "live_threshold": 3,
                          "initial_delay": 0})  # fmt: skip
    docker_client.containers.run(
        base_image_tag(),
        ["python3", "-m", "http.server", "8000"],
        name="kingpost-depold-aaaaa",
        detach=True,
        labels={
            "kingpost.scope": scope_of(engine_home),
            "kingpost.replica": "depold-aaaaa",
            "kingpost.deployment": "depold",
            LABEL_RUNTIME: runtime,
        },
    )
    engine = DockerEngine(Settings(home=engine_home))
    try:
        assert engine.poll() == []  # the controller starts a hardened replica instead
        assert not docker_client.containers.list(all=True, filters={"name": "depold"})
    finally:
        engine.close()


def test_gc_removes_the_image_of_a_deleted_deployment_and_keeps_a_live_ones(
    dplatform: Platform, docker_client: Any, tmp_path: Path
) -> None:
    """Images stayed after their deployments were deleted. `kingpost gc` removes the ones
    this installation built that no deployment needs and no container uses."""
    import uuid

    tags = {}
    for name in ("gc-kept", "gc-gone"):  # content of their own: images of their own
        project = copy_project(tmp_path, name, f"model_name: {name}\n")
        (project / "nonce.txt").write_text(uuid.uuid4().hex)
        dep = push(dplatform, project)["deployment"]
        dplatform.wait_status(dep["id"], "ACTIVE", timeout=300)
        (image,) = {c.attrs["Config"]["Image"] for c in containers_of(docker_client, dep["id"])}
        tags[name] = (dep["id"], image)
    with dplatform.client() as c:
        c.delete_model("gc-gone")
    gone_dep, gone_image = tags["gc-gone"]
    wait_for(lambda: not containers_of(docker_client, gone_dep), 60, "its container removed")
    # Another installation on this Docker Engine claims the same (content-addressed) image.
    from kingpost.engines.docker import CLAIM_PREFIX, scope_of

    repo, _, version = gone_image.rpartition(":")
    mine = f"{CLAIM_PREFIX}{scope_of(dplatform.home)}/{repo.rpartition('/')[2]}:{version}"
    assert mine in docker_client.images.get(gone_image).tags  # this installation's claim
    other = f"kingpost-claim-elsewhere/{repo.rpartition('/')[2]}:{version}"
    docker_client.images.get(gone_image).tag(other)
    held = json.loads(dplatform.cli("gc", "-o", "json").stdout)["images"]
    present = {t for i in docker_client.images.list() for t in i.tags}
    assert gone_image in present and gone_image not in held["removed"], held
    docker_client.images.remove(other)  # the other installation let it go
    out = dplatform.cli("gc", "-o", "json")
    assert out.returncode == 0, out.stderr
    images = json.loads(out.stdout)["images"]
    assert gone_image in images["removed"] and images["removed_bytes"] > 0, images
    present = {t for i in docker_client.images.list() for t in i.tags}
    assert gone_image not in present and tags["gc-kept"][1] in present
    again = json.loads(dplatform.cli("gc", "-o", "json").stdout)["images"]
    assert again["removed"] == []
