"""Warnings, Truss quirks, helpers and file loading of kingpost.config."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pydantic
import pytest

from kingpost.config import (
    NO_BUILD_IGNORED,
    RESERVED_ENV_HINT,
    Accelerator,
    Runtime,
    TransportKind,
    TrussConfig,
    is_reserved_env,
    load_config,
    parse_config,
    runtime_environment,
)
from kingpost.errors import ConfigError

NO_BUILD = """\
base_image:
  image: ghcr.io/acme/server:1
docker_server:
  no_build: true
  server_port: 8080
  predict_endpoint: /predict
  readiness_endpoint: /health
  liveness_endpoint: /health
"""


def warnings_of(text: str) -> list[str]:
    return list(parse_config(text, filename="c.yaml").warnings)


def test_unknown_keys_warn_with_path_line_and_suggestion() -> None:
    text = "model_name: m\nmodel_nmae: x\nruntime:\n  predict_concurency: 4\nfrobnicate: 1\n"
    loaded = parse_config(text, filename="c.yaml")
    assert loaded.warnings == (
        "c.yaml:2: model_nmae: unknown key `model_nmae`; did you mean `model_name`?",
        "c.yaml:5: frobnicate: unknown key `frobnicate`; it is ignored",
        "c.yaml:4: runtime.predict_concurency: unknown key `predict_concurency`; "
        "did you mean `predict_concurrency`?",
    )
    assert loaded.config.runtime.predict_concurrency == 1
    assert loaded.raw["frobnicate"] == 1


def test_unknown_keys_inside_list_entries() -> None:
    text = "weights:\n  - source: hf://a/b\n    mount_location: /models/m\n    revison: main\n"
    (warning,) = warnings_of(text)
    assert warning.startswith("c.yaml:4: weights[0].revison: unknown key `revison`")


@pytest.mark.parametrize(
    ("name", "reserved"),
    [
        ("PORT", True),
        ("HOST", True),
        ("HOSTNAME", True),
        ("REDIS_SERVICE_HOST", True),
        ("REDIS_SERVICE_PORT", True),
        ("PATH", True),
        ("PYTHONPATH", True),
        ("LD_LIBRARY_PATH", True),
        ("MODEL_PATH", True),
        ("PORT_NUMBER", False),
        ("HOSTS", False),
        ("PATHS", False),
        ("MY_SERVICE_HOSTNAME", False),
        ("path", False),
        ("HF_HOME", False),
    ],
)
def test_reserved_environment_names(name: str, reserved: bool) -> None:
    assert is_reserved_env(name) is reserved


def test_reserved_environment_variables_are_dropped_and_named() -> None:
    text = "environment_variables:\n  PORT: 9000\n  LD_LIBRARY_PATH: /x\n  KEEP: y\n"
    loaded = parse_config(text, filename="c.yaml")
    env, dropped = runtime_environment(loaded.config)
    assert env == {"KEEP": "y"}
    assert dropped == ["PORT", "LD_LIBRARY_PATH"]
    assert loaded.warnings[0].startswith("c.yaml:2: environment_variables.PORT:")
    assert "`LD_LIBRARY_PATH` is dropped" in loaded.warnings[1]
    assert RESERVED_ENV_HINT in loaded.warnings[1]
    assert loaded.config.environment_variables["PORT"] == "9000"  # kept in the config itself


def test_environment_values_become_strings_as_in_truss() -> None:
    text = "environment_variables:\n  A: true\n  B: 1.5\n  C: 7\n  D: null\n  E: 'x'\n"
    loaded = parse_config(text)
    assert loaded.config.environment_variables == {
        "A": "true",
        "B": "1.5",
        "C": "7",
        "D": "None",
        "E": "x",
    }
    (warning,) = loaded.warnings
    assert "environment_variables.D" in warning and "string `None`" in warning


def test_secret_with_a_value_warns_without_leaking_it() -> None:
    loaded = parse_config("secrets:\n  hf_access_token: hf_abcdef\n  other: null\n")
    (warning,) = loaded.warnings
    assert "`kingpost secrets set hf_access_token` and set it to null here" in warning
    assert "hf_abcdef" not in warning
    assert loaded.config.secrets == {"hf_access_token": "hf_abcdef", "other": None}


def test_no_build_warns_for_every_ignored_key() -> None:
    extra = {
        "requirements": "[a]",
        "requirements_file": "r.txt",
        "system_packages": "[ffmpeg]",
        "build_commands": "[echo]",
        "build": "{}",
        "external_package_dirs": "[x]",
        "bundled_packages_dir": "pk",
        "external_data": "[]",
        "model_cache": "[]",
        "cache_internal": "[]",
        "python_version": "py311",
        "apply_library_patches": "false",
        "live_reload": "true",
        "model_module_dir": "m",
        "model_class_filename": "m.py",
        "model_class_name": "M",
        "use_local_src": "false",
        "trt_llm": "{}",
    }
    assert set(extra) == set(NO_BUILD_IGNORED)
    text = NO_BUILD + "".join(f"{key}: {value}\n" for key, value in extra.items())
    text = text.replace("requirements: [a]\n", "")  # exclusive with requirements_file
    text += "environment_variables: {A: b}\nsecrets: {s: null}\nresources: {cpu: '2'}\n"
    text += "data_dir: data\nweights: []\nruntime: {predict_concurrency: 4}\n"
    warned = {w.split(": ")[1] for w in warnings_of(text)}
    assert warned == set(NO_BUILD_IGNORED) - {"requirements"}


def test_no_build_allows_port_8080_but_a_build_warns() -> None:
    assert warnings_of(NO_BUILD) == []
    built = NO_BUILD.replace("  no_build: true\n", "  start_command: serve\n")
    (warning,) = warnings_of(built)
    assert "docker_server.server_port" in warning and "reserved by Baseten" in warning


@pytest.mark.parametrize(
    ("resources", "accelerator", "use_gpu"),
    [
        ("accelerator: A10G", Accelerator("A10G", 1), True),
        ("accelerator: 'H100:8'", Accelerator("H100", 8), True),
        ("accelerator: {accelerator: L4, count: 4}", Accelerator("L4", 4), True),
        ("accelerator: {kind: T4}", Accelerator("T4", 1), True),
        ("accelerator: {accelerator: A10G, count: 0}", None, False),  # Truss: no GPU
        ("accelerator: null", None, False),
        ("cpu: '2'", None, False),
    ],
)
def test_use_gpu_is_derived_from_accelerator(
    resources: str, accelerator: Accelerator | None, use_gpu: bool
) -> None:
    config = parse_config(f"resources:\n  {resources}\n").config
    assert config.resources.accelerator == accelerator
    assert config.resources.use_gpu is use_gpu


def test_use_gpu_given_against_the_accelerator_warns() -> None:
    loaded = parse_config("resources:\n  use_gpu: true\n")
    assert loaded.config.resources.use_gpu is False
    (warning,) = loaded.warnings
    assert "resources.use_gpu" in warning and "no `accelerator` is set" in warning


def test_unknown_accelerator_kind_parses_with_a_warning() -> None:
    loaded = parse_config("resources:\n  accelerator: a10g:2\n")
    assert loaded.config.resources.accelerator == Accelerator("a10g", 2)
    (warning,) = loaded.warnings
    assert "unknown to Truss" in warning and "did you mean `A10G`?" in warning


@pytest.mark.parametrize(
    ("cpu", "millicores"),
    [("1", 1000), ("500m", 500), ("0.5", 500), ("2.5", 2500), ("4", 4000), ("1500m", 1500)],
)
def test_cpu_millicores(cpu: str, millicores: int) -> None:
    config = parse_config(f"resources:\n  cpu: {cpu}\n").config
    assert config.resources.cpu_millicores == millicores


@pytest.mark.parametrize(
    ("memory", "size"),
    [("2Gi", 2 * 1024**3), ("512Mi", 512 * 1024**2), ("1G", 10**9), ("1.5Gi", 1610612736),
     ("1000", 1000), ("64k", 64000)],
)  # fmt: skip
def test_memory_bytes(memory: str, size: int) -> None:
    config = parse_config(f"resources:\n  memory: {memory}\n").config
    assert config.resources.memory_bytes == size


def test_cpu_given_as_a_number_is_accepted() -> None:
    config = parse_config("resources:\n  cpu: 4\n  memory: 1024\n").config
    assert (config.resources.cpu, config.resources.memory) == ("4", "1024")


def test_legacy_websocket_flag_sets_the_transport() -> None:
    runtime = parse_config("runtime:\n  is_websocket_endpoint: true\n").config.runtime
    assert runtime.transport.kind == TransportKind.WEBSOCKET
    runtime = parse_config("runtime:\n  transport: {kind: websocket}\n").config.runtime
    assert runtime.is_websocket_endpoint is True
    runtime = Runtime.model_validate({"transport": {"kind": "grpc"}})  # refused at push
    assert (runtime.transport.kind, runtime.is_websocket_endpoint) == ("grpc", False)


@pytest.mark.parametrize(
    "source",
    ["hf://gpt2", "hf://a/b@v1.0", "bt://my-project@job123/ckpt-4", "https://x.org/m.bin",
     "file:///srv/models/a", "/srv/models/a", "azure://acct/container/p", "r2://acct.bucket/p"],
)  # fmt: skip
def test_weights_sources_accepted(source: str) -> None:
    text = f"weights:\n  - source: {source}\n    mount_location: /models/x\n"
    assert parse_config(text).config.weights[0].source == source


def test_hf_cache_is_read_as_model_cache() -> None:
    loaded = parse_config("hf_cache:\n  - repo_id: a/b\n    use_volume: false\n")
    assert loaded.config.model_cache[0].repo_id == "a/b"
    assert "hf_cache` is deprecated" in loaded.warnings[0]


def test_empty_file_gives_truss_defaults() -> None:
    loaded = parse_config("# nothing yet\n")
    config = loaded.config
    assert loaded.warnings == () and loaded.raw == {}
    assert (config.model_module_dir, config.model_class_filename) == ("model", "model.py")
    assert (config.model_class_name, config.data_dir) == ("Model", "data")
    assert (config.bundled_packages_dir, config.python_version) == ("packages", "py313")
    assert (config.resources.cpu, config.resources.memory) == ("1", "2Gi")
    assert config.runtime.predict_concurrency == 1 and config.runtime.streaming_read_timeout == 60
    assert config.docker_server is None and not config.is_custom_server
    assert config.weights == [] and config.model_cache == []


def test_configs_are_immutable() -> None:
    loaded = parse_config("model_name: a\n")
    with pytest.raises(dataclasses.FrozenInstanceError):
        loaded.path = "x"  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        loaded.config.model_name = "b"  # type: ignore[misc]
    assert isinstance(loaded.config, TrussConfig)


def test_load_config_reads_the_project(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("model_name: from-disk\n")
    loaded = load_config(tmp_path)
    assert loaded.config.model_name == "from-disk"
    assert loaded.path == str(tmp_path / "config.yaml")


def test_load_config_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert str(tmp_path / "config.yaml") in info.value.message
    (tmp_path / "config.yml").write_text("model_name: a\n")
    with pytest.raises(ConfigError, match=r"found config\.yml; rename it to config\.yaml"):
        load_config(tmp_path)
    (tmp_path / "config.yaml").write_text("resources:\n  cpu: none\n")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert info.value.message.startswith(f"{tmp_path / 'config.yaml'}: 1 error")
    (tmp_path / "config.yaml").write_bytes(b"model_name: \xff\xfe\n")
    with pytest.raises(ConfigError, match="UTF-8"):
        load_config(tmp_path)


@pytest.mark.parametrize(
    ("memory", "expected"), [("1e9", 10**9), ("2.5e3", 2500), ("2Gi", 2 * 1024**3), ("512", 512)]
)
def test_memory_as_truss_reads_it(memory: str, expected: int) -> None:
    config = parse_config(f"resources:\n  memory: '{memory}'\n").config
    assert config.resources.memory_bytes == expected


IMAGE_KEYS = """\
model_name: m
base_image:
  image: nvcr.io/nvidia/pytorch:24.01-py3
system_packages: [ffmpeg]
build_commands: ["git clone https://example.com/x /x"]
"""


def test_the_process_engine_says_which_image_keys_it_cannot_honour() -> None:
    got = list(parse_config(IMAGE_KEYS, filename="c.yaml", engine="process").warnings)
    assert len(got) == 3, got
    packages, commands, image = got
    assert packages.startswith("c.yaml:4: system_packages: not installed")
    assert '(found ["ffmpeg"])' in packages and "--engine docker" in packages
    assert (
        commands.startswith("c.yaml:5: build_commands: not run") and "--engine docker" in commands
    )
    assert image.startswith("c.yaml:3: base_image.image: not used")
    assert "nvcr.io/nvidia/pytorch:24.01-py3" in image
    for engine in ("docker", None):
        assert parse_config(IMAGE_KEYS, filename="c.yaml", engine=engine).warnings == ()
    plain = "model_name: m\nsystem_packages: []\nbuild_commands: []\n"
    assert parse_config(plain, engine="process").warnings == ()
    old = parse_config("model_name: m\npython_version: py310\n", "c.yaml", engine="process")
    assert old.warnings == (
        "c.yaml:2: python_version: the model server needs Python 3.11 or newer; on the "
        'process engine the project runs on the platform\'s Python instead (found "py310")',
    )
