"""Pure parts of the docker engine: the build plan, image tags, container options."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from kingpost.config import parse_config
from kingpost.controller.specs import replica_spec
from kingpost.engines.base import WeightMount
from kingpost.engines.docker import (
    ContainerLimits,
    _packages_linked,
    container_options,
    deployment_uid,
    device_requests,
    docker_mounts,
    network_name,
    requirements_fingerprint,
    scope_of,
)
from kingpost.errors import BuildError, ConfigError, EngineError
from kingpost.images.build import _command, _failure_message, _follow, image_tag
from kingpost.images.dockerfile import DEFAULT_UID, HostBuildEnv, plan_build

HOST = HostBuildEnv(ca_bundle=b"CA", pip={"PIP_INDEX_URL": "https://pypi.example/simple"})
CUSTOM = """
model_name: demo
docker_server:
  start_command: python3 server.py
  server_port: 8000
  predict_endpoint: /predict
  readiness_endpoint: /health
  liveness_endpoint: /health
"""


def cfg(text: str):  # type: ignore[no-untyped-def]
    return parse_config(text).config


def files(tmp_path: Path, **content: str) -> dict[str, Path]:
    out = {}
    for rel, text in content.items():
        path = tmp_path / rel.replace("__", "/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        out[rel.replace("__", "/")] = path
    return out


def test_layers_follow_truss_order_and_each_build_command_is_a_layer(tmp_path: Path) -> None:
    config = cfg(
        CUSTOM
        + "system_packages: [curl, git]\nrequirements: [httpx==0.27.0]\n"
        + "build_commands:\n  - echo one\n  - echo two && echo three\n"
    )
    plan = plan_build(config, files(tmp_path, **{"server.py": "x"}), "base:1", HOST)
    lines = plan.dockerfile.splitlines()
    assert lines[0] == "FROM base:1"
    runs = [ln for ln in lines if ln.startswith("RUN ")]
    assert "apt-get install" in runs[0] and "curl git" in runs[0]
    assert f"useradd --uid {DEFAULT_UID}" in runs[1]
    assert "pip install" in runs[2] and "-r /tmp/kingpost-build/requirements.txt" in runs[2]
    assert [json.loads(r[4:])[2] for r in runs[3:]] == ["echo one", "echo two && echo three"]
    # as in Truss, build commands run where the project already is, so they may patch it
    copy_app = lines.index(f"COPY --chown={DEFAULT_UID}:{DEFAULT_UID} app/ /app/")
    assert copy_app < lines.index("WORKDIR /app") < lines.index(runs[3])
    assert lines[-2:] == [f"USER {DEFAULT_UID}", 'CMD ["/bin/sh", "-c", "python3 server.py"]']
    assert plan.files["kingpost-build/requirements.txt"] == b"httpx==0.27.0\n"
    assert plan.buildargs["PIP_INDEX_URL"] == "https://pypi.example/simple"
    assert plan.buildargs["PIP_CERT"].endswith("host-ca.crt")
    assert plan.package_dir is None  # custom servers carry no model server


@pytest.mark.parametrize("bundled", ["packages", "vendor"])
def test_bundled_packages_are_also_at_slash_packages_as_in_truss(
    tmp_path: Path, bundled: str
) -> None:
    extra = "" if bundled == "packages" else f"bundled_packages_dir: {bundled}\n"
    config = cfg(CUSTOM + extra + "build_commands: [sed -i s/A/B/ /packages/c/v.py]\n")
    plan = plan_build(config, files(tmp_path, **{f"{bundled}__c__v.py": "A"}), "b:1", HOST)
    lines = plan.dockerfile.splitlines()
    link = lines.index(
        f'RUN ["/bin/sh", "-c", "rm -rf /packages && ln -s /app/{bundled} /packages"]'
    )
    assert lines.index(f"COPY --chown={DEFAULT_UID}:{DEFAULT_UID} app/ /app/") < link
    assert link < next(i for i, ln in enumerate(lines) if "sed -i" in ln)
    without = plan_build(cfg(CUSTOM), files(tmp_path, **{"server.py": "x"}), "b:1", HOST)
    assert "ln -s" not in without.dockerfile  # /packages stays an empty writable directory


def test_bundled_packages_out_of_the_project_are_never_looked_at_on_the_host(
    tmp_path: Path,
) -> None:
    """The check runs as root on this machine: a `bundled_packages_dir` out of the project
    must not read a host folder (the image copies only the project)."""
    host = tmp_path / "host"
    (host / "secret").mkdir(parents=True)
    app = tmp_path / "replicas" / "r1" / "app"
    app.mkdir(parents=True)
    for name, linked in (("../../../host", False), ("../app/../../../host", False)):
        config = cfg(CUSTOM + f"bundled_packages_dir: {name}\n")
        spec = replica_spec(replica_id="r1", deployment_id="d1", model_id="m1", model_name="m",
                            app_dir=app, config=config, env={}, secrets={})  # fmt: skip
        assert _packages_linked(spec) is linked
    (app / "vendor" / "c").mkdir(parents=True)
    spec = replica_spec(replica_id="r1", deployment_id="d1", model_id="m1", model_name="m",
                        app_dir=app, config=cfg(CUSTOM + "bundled_packages_dir: vendor\n"),
                        env={}, secrets={})  # fmt: skip
    assert _packages_linked(spec)


def test_a_failed_steps_output_loses_colour_codes_and_builder_chatter() -> None:
    stream = [
        {"stream": 'Step 7/9 : RUN ["/bin/sh", "-c", "haha lol"]\n'},
        {"stream": " ---> Running in 8ca66ceced89\n"},
        {"stream": "\x1b[91m/bin/sh: 1: haha: not found\n\x1b[0m"},
        {"stream": "Removing intermediate container 8ca66ceced89\n"},
        {"error": "The command '/bin/sh -c haha lol' returned a non-zero code: 127"},
    ]
    logged: list[str] = []
    with pytest.raises(BuildError) as info:
        _follow(stream, plan_build(cfg(CUSTOM), {}, "b", HOST), logged.append)
    assert str(info.value).endswith("last output:\n/bin/sh: 1: haha: not found")
    assert "/bin/sh: 1: haha: not found" in logged and not any("\x1b" in ln for ln in logged)


def test_run_as_user_id_owns_the_writable_paths(tmp_path: Path) -> None:
    config = cfg(
        CUSTOM.replace("  server_port: 8000\n", "  server_port: 8000\n  run_as_user_id: 4321\n")
    )
    plan = plan_build(config, files(tmp_path, **{"server.py": "x"}), "base:1", HOST)
    user = next(ln for ln in plan.dockerfile.splitlines() if "useradd" in ln)
    assert "--uid 4321" in user and "chown 4321:4321 /app /workspace /packages /home/app" in user
    assert "USER 4321" in plan.dockerfile


def test_model_class_gets_the_server_without_the_control_plane(tmp_path: Path) -> None:
    from kingpost.envs.baseset import base_set_for

    config = cfg("model_name: m\nsystem_packages: [curl]\nrequirements: [numpy==2.0.0]\n")
    app = files(tmp_path, **{"model__model.py": "class Model: ..."})
    with pytest.raises(ValueError, match="Truss server packages"):
        plan_build(config, app, "b", HOST, tmp_path)
    base_set = base_set_for("0.9.1", None, print)
    plan = plan_build(config, app, "b", HOST, tmp_path, base_set)
    # Truss's server packages of that version, and the model server's own, in one layer
    # before anything of the project (so every model image of the set shares it), then
    # the project's requirements over them.
    wanted = plan.files["kingpost-build/base-requirements.txt"]
    assert isinstance(wanted, bytes)
    assert b"fastapi==0.114.1" in wanted and b"httptools" in wanted and b"requests" in wanted
    lines = plan.dockerfile.splitlines()
    base = next(i for i, ln in enumerate(lines) if "-r /tmp/kingpost-base/requirements.txt" in ln)
    apt = next(i for i, ln in enumerate(lines) if "apt-get" in ln)
    user = next(i for i, ln in enumerate(lines) if "-r /tmp/kingpost-build/requirements.txt" in ln)
    assert base < apt < user
    assert plan.files["kingpost-build/requirements.txt"] == b"numpy==2.0.0\n"
    assert "COPY kingpost-build/kingpost/ /opt/kingpost/lib/kingpost/" in plan.dockerfile
    assert '"kingpost.server"' in plan.dockerfile.splitlines()[-1]
    assert plan.package_dir == tmp_path


def test_paths_with_spaces_stay_whole_in_the_dockerfile(tmp_path: Path) -> None:
    config = cfg(
        CUSTOM + 'data_dir: "my data"\n'
        'base_image:\n  image: "x:1"\n  python_executable_path: "/opt/my py/bin/$py"\n'
    )
    app = files(tmp_path, **{"server.py": "x", "my data__a.txt": "a"})
    lines = plan_build(config, app, "x:1", HOST).dockerfile.splitlines()
    assert 'COPY --chown=60000:60000 ["app/my data/", "/app/data/"]' in lines
    env = next(ln for ln in lines if ln.startswith("ENV APP_HOME="))
    assert env.endswith('PYTHON_EXECUTABLE="/opt/my py/bin/\\$py"')


@pytest.mark.parametrize("no_build", [False, True])
def test_a_base_image_cannot_add_dockerfile_lines(tmp_path: Path, no_build: bool) -> None:
    config = cfg(
        CUSTOM.replace("  server_port: 8000\n", f"  server_port: 8000\n  no_build: {no_build}\n")
        + 'base_image:\n  image: "x:1\\nRUN touch /pwned"\n'
    )
    with pytest.raises(ConfigError, match=r"base_image\.image"):
        plan_build(config, files(tmp_path, **{"server.py": "x"}), "x:1\nRUN touch /pwned", HOST)


def test_missing_requirements_file_is_a_config_error(tmp_path: Path) -> None:
    config = cfg(CUSTOM + "requirements_file: ./reqs.txt\n")
    with pytest.raises(ConfigError, match=r"requirements_file `\./reqs\.txt` is not in"):
        plan_build(config, files(tmp_path, **{"server.py": "x"}), "b", HOST)


def test_no_build_adds_only_data_and_names_ignored_keys(tmp_path: Path) -> None:
    config = cfg(
        "model_name: nb\nbase_image:\n  image: vllm/vllm-openai:v0.6\n"
        "docker_server:\n  no_build: true\n  server_port: 8000\n"
        "  predict_endpoint: /v1/completions\n  readiness_endpoint: /health\n"
        "  liveness_endpoint: /health\n"
        "requirements: [torch]\nsystem_packages: [curl]\n"
    )
    app = files(tmp_path, **{"data__a.txt": "a", "model__model.py": "x"})
    plan = plan_build(config, app, "vllm/vllm-openai:v0.6", HOST)
    assert plan.dockerfile == (
        "FROM vllm/vllm-openai:v0.6\nCOPY --chown=60000:60000 data/ /app/data/\n"
    )
    assert list(plan.files) == ["data/a.txt"]
    assert "requirements" in plan.warnings[0] and "system_packages" in plan.warnings[0]


def test_image_tag_changes_with_content_only(tmp_path: Path) -> None:
    config = cfg(CUSTOM)
    app = files(tmp_path, **{"server.py": "print(1)"})
    tag = image_tag(config, plan_build(config, app, "b", HOST), "sha256:base")
    assert tag.startswith("kingpost/demo:")
    assert tag == image_tag(config, plan_build(config, app, "b", HOST), "sha256:base")
    assert tag != image_tag(config, plan_build(config, app, "b", HOST), "sha256:other")
    app["server.py"].write_text("print(2)")
    assert tag != image_tag(config, plan_build(config, app, "b", HOST), "sha256:base")


def test_image_tag_changes_with_a_files_mode(tmp_path: Path) -> None:
    # The context keeps each file's mode, so `chmod +x start.sh` changes the image: an
    # image built while the script was not executable must not be reused.
    config = cfg(CUSTOM.replace("python3 server.py", "./start.sh"))
    app = files(tmp_path, **{"start.sh": "#!/bin/sh\nexec python3 -m http.server\n"})
    app["start.sh"].chmod(0o644)
    before = image_tag(config, plan_build(config, app, "b", HOST), "sha256:base")
    app["start.sh"].chmod(0o755)
    assert before != image_tag(config, plan_build(config, app, "b", HOST), "sha256:base")


def test_build_failures_name_the_users_command() -> None:
    step = 'RUN ["/bin/sh", "-c", "echo about && exit 3"]'
    assert _command(step) == "echo about && exit 3"
    plan = plan_build(cfg(CUSTOM), {}, "b", HOST)
    msg = _failure_message(step, "returned a non-zero code: 3", ["about"], plan)
    assert msg.startswith("image build failed at `echo about && exit 3`")
    assert msg.endswith("last output:\nabout")
    assert "base_image.image `b`" in _failure_message("FROM b", "pull access denied", [], plan)


def _spec(config_text: str, **kw):  # type: ignore[no-untyped-def]
    return replica_spec(
        replica_id="dep1-abcde",
        deployment_id="dep1",
        model_id="m1",
        model_name="demo",
        app_dir=Path("/nowhere"),
        config=cfg(config_text),
        env={"GREETING": "hi"},
        secrets={"tok": "v"},
        **kw,
    )


def test_container_options_carry_the_replica_contract() -> None:
    spec = _spec(
        CUSTOM + "resources:\n  cpu: 500m\n  memory: 1Gi\n",
        weights=(WeightMount("/models/llama", Path("/w/tree")),),
        image="kingpost/demo:1",
    )
    opts = container_options(
        spec, name="kingpost-dep1-abcde", network="kingpost", scope="s", secrets_dir=Path("/shm/x")
    )
    assert opts["image"] == "kingpost/demo:1"
    assert opts["command"] == ["/bin/sh", "-c", "python3 server.py"]
    assert opts["environment"]["GREETING"] == "hi"
    assert opts["environment"]["BT_MODEL_DEPLOYMENT_ID"] == "dep1"
    assert opts["environment"]["KINGPOST_SECRETS_DIR"] == "/secrets"
    assert "tok" not in json.dumps(opts["environment"])  # secrets only as files
    assert opts["mounts"][:2] == [
        {"Type": "bind", "Source": "/shm/x", "Target": "/secrets", "ReadOnly": True},
        {"Type": "bind", "Source": "/w/tree", "Target": "/models/llama", "ReadOnly": True},
    ]
    assert opts["nano_cpus"] == 500_000_000 and opts["mem_limit"] == 1024**3
    # The memory limit is the whole budget: without memswap_limit Docker lets the
    # container use as much swap again (MemorySwap = 2 x Memory).
    assert opts["memswap_limit"] == 1024**3
    assert "device_requests" not in opts and opts["user"] == OWN
    assert opts["labels"]["kingpost.replica"] == "dep1-abcde"
    assert opts["labels"]["kingpost.isolation"] == "1"  # adopted after a restart
    assert json.loads(opts["labels"]["kingpost.runtime"])["readiness"] == "/health"
    assert "ports" not in opts  # reached on the network: no host port to collide


def test_the_dynamic_config_directory_is_mounted_where_truss_reads_it() -> None:
    spec = _spec(CUSTOM, image="i", dynamic_config_dir=Path("/home/k/dynamic/dep1"))
    opts = container_options(spec, name="n", network="k", scope="s", secrets_dir=Path("/x"))
    assert opts["environment"]["KINGPOST_DYNAMIC_CONFIG_DIR"] == "/etc/b10_dynamic_config"
    assert next(m for m in opts["mounts"] if m["Target"] == "/etc/b10_dynamic_config") == {
        "Type": "bind",
        "Source": "/home/k/dynamic/dep1",
        "Target": "/etc/b10_dynamic_config",
        "ReadOnly": True,
    }
    bare = container_options(_spec(CUSTOM, image="i"), name="n", network="k", scope="s",
                             secrets_dir=Path("/x"))  # fmt: skip
    assert "KINGPOST_DYNAMIC_CONFIG_DIR" not in bare["environment"]


def test_only_a_development_replica_gets_a_reload_token() -> None:
    spec = _spec("model_name: demo\n", image="i")
    opts = container_options(spec, name="n", network="k", scope="s", secrets_dir=Path("/x"),
                             reload_token="t0ken")  # fmt: skip
    assert opts["environment"]["KINGPOST_RELOAD_TOKEN"] == "t0ken"
    bare = container_options(spec, name="n", network="k", scope="s", secrets_dir=Path("/x"))
    assert "KINGPOST_RELOAD_TOKEN" not in bare["environment"]


def test_a_requirements_file_change_is_a_swap_and_model_code_is_not(tmp_path: Path) -> None:
    """The docker engine reloads what only sits in /app; the requirements file is
    installed into the image, so its change must swap."""
    (tmp_path / "requirements.txt").write_text("six\n")
    config = cfg("model_name: m\nrequirements_file: ./requirements.txt\n")
    before = requirements_fingerprint(config, tmp_path)
    (tmp_path / "model.py").write_text("x = 1\n")
    assert requirements_fingerprint(config, tmp_path) == before
    (tmp_path / "requirements.txt").write_text("six==1.16.0\n")
    assert requirements_fingerprint(config, tmp_path) != before
    assert requirements_fingerprint(cfg("model_name: m\n"), tmp_path) is None


def test_placed_devices_become_a_device_request_for_those_ids() -> None:
    h100 = _spec(CUSTOM + "resources:\n  accelerator: H100:2\n", image="i")
    spec = replace(h100, gpus=("GPU-a", "GPU-b"))
    opts = container_options(spec, name="n", network="k", scope="s", secrets_dir=Path("/x"))
    assert opts["device_requests"] == [
        {"Driver": "nvidia", "DeviceIDs": ["GPU-a", "GPU-b"], "Capabilities": [["gpu"]]}
    ]
    assert opts["labels"]["kingpost.gpus"] == "GPU-a,GPU-b"
    # No devices placed (none asked for, or KINGPOST_ACCELERATORS=ignore): no request at all,
    # never the "all GPUs" one.
    for gpus in (None, ()):
        spec = replace(h100, gpus=gpus)
        opts = container_options(spec, name="n", network="k", scope="s", secrets_dir=Path("/x"))
        assert "device_requests" not in opts and "kingpost.gpus" not in opts["labels"]
    assert device_requests(None) == [] and device_requests(()) == []


def test_the_engine_hands_docker_a_device_request_with_the_ids() -> None:
    from docker.types import DeviceRequest

    from kingpost.engines.docker import DockerEngine

    created: list[dict[str, Any]] = []

    class Containers:
        def create(self, **kwargs: Any) -> str:
            created.append(kwargs)
            return "container"

    engine = object.__new__(DockerEngine)  # only the seam to the Docker SDK is exercised
    engine.client = SimpleNamespace(containers=Containers())  # type: ignore[assignment]
    spec = replace(_spec(CUSTOM, image="i"), gpus=("GPU-a",))
    opts = container_options(spec, name="n", network="k", scope="s", secrets_dir=Path("/x"))
    assert engine._create(opts) == "container"
    (request,) = created[0]["device_requests"]
    assert isinstance(request, DeviceRequest)
    assert request["DeviceIDs"] == ["GPU-a"] and request["Driver"] == "nvidia"
    assert request["Capabilities"] == [["gpu"]] and request["Count"] == 0


def test_model_class_command_and_missing_image() -> None:
    spec = _spec("model_name: m\n", image="kingpost/m:1")
    opts = container_options(spec, name="n", network="k", scope="s", secrets_dir=Path("/x"))
    assert opts["command"][1:5] == ["-P", "-m", "kingpost.server", "--app-dir"]
    assert opts["command"][opts["command"].index("--secrets-dir") + 1] == "/secrets"
    with pytest.raises(EngineError, match="no image"):
        container_options(
            _spec("model_name: m\n"), name="n", network="k", scope="s", secrets_dir=Path("/x")
        )
    no_cmd = _spec(
        "model_name: v\nbase_image:\n  image: x\ndocker_server:\n  no_build: true\n"
        "  server_port: 8000\n  predict_endpoint: /\n  readiness_endpoint: /\n"
        "  liveness_endpoint: /\n",
        image="x",
    )
    assert (
        container_options(no_cmd, name="n", network="k", scope="s", secrets_dir=Path("/x"))[
            "command"
        ]
        is None
    )


def test_the_context_tar_is_read_as_the_files_it_was_made_from(tmp_path: Path) -> None:
    import io
    import tarfile

    from kingpost._cancel import Cancel
    from kingpost.images.build import _context_tar

    config = cfg(CUSTOM)
    app = files(tmp_path, **{"server.py": "print(1)", "data__deep__x.bin": "x" * 3_000_001})
    app["server.py"].chmod(0o700)
    plan = plan_build(config, app, "b", HOST)
    stream = b"".join(_context_tar(plan, Cancel()))
    with tarfile.open(fileobj=io.BytesIO(stream)) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert tar.extractfile("Dockerfile").read().decode() == plan.dockerfile  # type: ignore[union-attr]
        assert tar.extractfile("app/data/deep/x.bin").read() == b"x" * 3_000_001  # type: ignore[union-attr]
    assert members["app/server.py"].mode == 0o744 and members["app/data/deep/x.bin"].mode == 0o644
    assert {"app", "app/data", "app/data/deep"} <= {n for n, m in members.items() if m.isdir()}


def test_a_cancelled_build_stops_sending_its_context(tmp_path: Path) -> None:
    from kingpost._cancel import Cancel
    from kingpost.images.build import _context_tar

    config = cfg(CUSTOM)
    app = files(tmp_path, **{"server.py": "print(1)", "data__big.bin": "x" * 5_000_000})
    switch = Cancel()
    stream = _context_tar(plan_build(config, app, "b", HOST), switch)
    sent = next(stream)
    switch.cancel("the deployment was deleted")
    with pytest.raises(BuildError, match="the image build was stopped: the deployment was deleted"):
        for chunk in stream:
            sent += chunk
    assert len(sent) < 5_000_000  # it stopped within a chunk, not at the end


NO_BUILD = (
    "model_name: v\nbase_image:\n  image: x\ndocker_server:\n  no_build: true\n"
    "  server_port: 8000\n  predict_endpoint: /\n  readiness_endpoint: /\n"
    "  liveness_endpoint: /\n"
)


OWN = f"{deployment_uid('dep1')}:{deployment_uid('dep1')}"


def test_each_deployment_runs_as_a_uid_of_its_own() -> None:
    # Per-user kernel limits (inotify instances, RLIMIT_NPROC) must not be shared
    # between models, as they were when every model ran as 60000.
    uids = {deployment_uid(f"dep{i}") for i in range(2000)}
    assert len(uids) == 2000
    assert all(1_000_000_000 <= uid < 2**31 - 1 for uid in uids)
    assert deployment_uid("dep7") == deployment_uid("dep7")  # the same after a restart


def _volumes(opts: dict[str, Any]) -> dict[str, Any]:
    return {m["Target"]: m["Size"] for m in opts["mounts"] if m["Type"] == "volume"}


@pytest.mark.parametrize(
    ("config_text", "user"),
    [
        (CUSTOM, OWN),
        (NO_BUILD, OWN),  # not the image's own user, which is often root
        (NO_BUILD.replace("no_build: true\n", "no_build: true\n  run_as_user_id: 1000\n"),
         "1000:1000"),
        ("model_name: m\n", OWN),
    ],
)  # fmt: skip
def test_every_container_is_unprivileged_and_bounded(config_text: str, user: str) -> None:
    limits = ContainerLimits(pids=777, tmpfs_bytes=5 * 1024**2, volume_bytes=None)
    opts = container_options(
        _spec(config_text, image="i"),
        name="n",
        network="k",
        scope="s",
        secrets_dir=Path("/x"),
        limits=limits,
    )
    assert opts["user"] == user
    assert opts["cap_drop"] == ["ALL"] and "cap_add" not in opts
    assert opts["security_opt"] == ["no-new-privileges"]
    assert opts["read_only"] is True
    assert opts["pids_limit"] == 777
    assert opts["tmpfs"]["/tmp"] == f"size={5 * 1024**2},mode=1777,exec"
    assert "privileged" not in opts and "network_mode" not in opts
    assert opts["environment"]["HOME"] == "/home/app"


def test_built_images_keep_their_writable_dirs_as_volumes(tmp_path: Path) -> None:
    # Build commands may fill /workspace and $HOME, and /app holds the project: copies of
    # the image's directories (volumes), each bounded when the engine has quotas.
    project = tmp_path / "p"
    project.mkdir()
    spec = _spec(CUSTOM, image="i")
    spec = replace(spec, app_dir=project)
    limits = ContainerLimits(volume_bytes=3 * 1024**3)
    opts = container_options(
        spec, name="n", network="k", scope="s", secrets_dir=Path("/x"), limits=limits
    )
    size = 3 * 1024**3
    assert _volumes(opts) == {"/app": size, "/workspace": size, "/home/app": size,
                              "/packages": size}  # fmt: skip
    assert list(opts["tmpfs"]) == ["/tmp"]
    # Bundled packages: /packages links into /app, whose volume already holds them.
    (project / "packages" / "lib").mkdir(parents=True)
    linked = container_options(
        spec, name="n", network="k", scope="s", secrets_dir=Path("/x"), limits=limits
    )
    assert "/packages" not in _volumes(linked)


def test_volumes_are_anonymous_and_sized_only_when_quotas_exist() -> None:
    sized, unbounded, secrets = docker_mounts(
        [
            {"Type": "volume", "Target": "/app", "ReadOnly": False, "Size": 5 * 1024**3},
            {"Type": "volume", "Target": "/workspace", "ReadOnly": False, "Size": None},
            {"Type": "bind", "Source": "/shm/x", "Target": "/secrets", "ReadOnly": True},
        ]
    )
    assert sized["Source"] is None and sized["Type"] == "volume"  # removed with the container
    assert sized["VolumeOptions"]["DriverConfig"] == {
        "Name": "local",
        "Options": {"size": str(5 * 1024**3)},
    }
    assert "VolumeOptions" not in unbounded  # Docker refuses `size` without quota support
    assert secrets["Type"] == "bind" and secrets["ReadOnly"] is True


def test_no_build_images_get_their_writable_dirs_as_owned_tmpfs() -> None:
    spec = _spec(NO_BUILD.replace("no_build: true\n", "no_build: true\n  run_as_user_id: 1000\n"),
                 image="i")  # fmt: skip
    opts = container_options(spec, name="n", network="k", scope="s", secrets_dir=Path("/x"))
    assert _volumes(opts) == {"/app": None}  # the image's own /app (and data/) kept
    size = ContainerLimits().tmpfs_bytes
    assert opts["tmpfs"] == {
        "/tmp": f"size={size},mode=1777,exec",
        "/workspace": f"size={size},mode=0755,uid=1000,gid=1000,exec",
        "/packages": f"size={size},mode=0755,uid=1000,gid=1000,exec",
        "/home/app": f"size={size},mode=0700,uid=1000,gid=1000,exec",
    }


def test_each_installation_has_its_own_network() -> None:
    assert network_name(scope_of(Path("/a"))) != network_name(scope_of(Path("/b")))
    assert network_name("0123456789ab") == "kingpost-0123456789ab"
