"""Golden parses of whole Truss configs (fixtures in tests/fixtures/configs/)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kingpost.config import (
    Accelerator,
    LoadedConfig,
    ModelCacheKind,
    TransportKind,
    WeightsAuthMethod,
    load_config,
    parse_config,
    runtime_environment,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "configs"


def _load(name: str, tmp_path: Path) -> LoadedConfig:
    shutil.copy(FIXTURES / f"{name}.yaml", tmp_path / "config.yaml")
    return load_config(tmp_path)


def test_vllm_custom_server(tmp_path: Path) -> None:
    loaded = _load("vllm_custom_server", tmp_path)
    config = loaded.config
    assert loaded.path == str(tmp_path / "config.yaml")
    assert loaded.warnings == ()
    assert config.is_custom_server and not config.no_build
    assert config.base_image is not None
    assert config.base_image.image == "vllm/vllm-openai:v0.6.3"
    server = config.docker_server
    assert server is not None
    assert server.start_command is not None and "vllm serve" in server.start_command
    assert (server.server_port, server.predict_endpoint) == (8000, "/v1/chat/completions")
    assert server.readiness_endpoint == server.liveness_endpoint == "/health"
    assert server.run_as_user_id is None
    assert config.resources.accelerator == Accelerator("H100", 2)
    assert config.resources.use_gpu is True
    assert config.secrets == {"hf_access_token": None}
    assert config.runtime.predict_concurrency == 128
    checks = config.runtime.health_checks
    assert checks.restart_check_delay_seconds == 600
    assert checks.restart_threshold_seconds == 300
    assert checks.stop_traffic_threshold_seconds == 120
    assert config.environment_variables == {
        "VLLM_LOGGING_LEVEL": "WARNING",
        "HF_HUB_ENABLE_HF_TRANSFER": "1",
    }
    assert config.model_class_name == "Model" and config.python_version == "py313"


def test_tei_no_build(tmp_path: Path) -> None:
    loaded = _load("tei_no_build", tmp_path)
    config = loaded.config
    assert config.no_build
    server = config.docker_server
    assert server is not None
    assert server.start_command is None and server.run_as_user_id == 1000
    assert config.base_image is not None and config.base_image.docker_auth is not None
    assert config.base_image.docker_auth.auth_method == "REGISTRY_SECRET"
    assert config.resources.cpu_millicores == 4000
    assert config.resources.memory_bytes == 8 * 1024**3
    assert config.resources.use_gpu is False
    env, dropped = runtime_environment(config)
    assert dropped == ["PORT"]
    assert env == {"MODEL_ID": "BAAI/bge-small-en-v1.5", "MAX_BATCH_TOKENS": "16384"}
    joined = "\n".join(loaded.warnings)
    assert len(loaded.warnings) == 3, joined
    assert "environment_variables.PORT" in joined and "dropped" in joined
    assert ":25: requirements:" in joined and "no_build" in joined
    assert ":5: base_image.docker_auth: not used" in joined and "docker login" in joined


def test_model_class_with_requirements(tmp_path: Path) -> None:
    config = _load("model_class_requirements", tmp_path).config
    assert not config.is_custom_server
    assert config.requirements == ["torch==2.4.0", "transformers==4.44.2", "accelerate>=0.33"]
    assert config.requirements_file is None
    assert config.system_packages == ["ffmpeg"]
    assert config.secrets == {"hf_access_token": None}
    assert config.resources.accelerator == Accelerator("A10G", 1)
    assert config.resources.use_gpu is True
    assert config.resources.memory_bytes == 14 * 1024**3
    assert config.environment_variables == {"TOKENIZERS_PARALLELISM": "false"}
    assert config.model_metadata["tags"] == ["audio", "asr"]
    assert config.python_version == "py311" and config.spec_version == "2.0"
    assert config.apply_library_patches is False
    assert config.external_package_dirs == ["../shared"]
    assert (config.model_module_dir, config.model_class_filename) == ("model", "model.py")
    assert (config.data_dir, config.bundled_packages_dir) == ("data", "packages")


def test_weights_sources(tmp_path: Path) -> None:
    loaded = _load("weights_sources", tmp_path)
    assert loaded.warnings == ()
    weights = loaded.config.weights
    assert [w.scheme for w in weights] == ["hf", "s3", "gs", "r2"]
    assert [w.mount_location for w in weights] == [
        "/models/llama",
        "/app/model_cache/adapter",
        "/models/encoder",
        "/models/lora",
    ]
    assert weights[0].allow_patterns == ["*.safetensors", "config.json", "tokenizer*"]
    assert weights[0].ignore_patterns == ["original/*"]
    assert weights[0].secret_name == "hf_access_token"
    assert weights[1].auth is not None and weights[1].auth.auth_method == WeightsAuthMethod.AWS_OIDC
    assert weights[1].auth.aws_oidc_region == "us-east-1"
    assert weights[2].auth is not None and weights[2].auth.auth_method == "GCP_OIDC"
    assert weights[3].auth is None and weights[3].secret_name == "r2_credentials"


def test_model_cache(tmp_path: Path) -> None:
    loaded = _load("model_cache", tmp_path)
    entries = loaded.config.model_cache
    assert [e.kind for e in entries] == [ModelCacheKind.HF, ModelCacheKind.GCS]
    assert entries[0].revision.startswith("0a67737") and entries[0].volume_folder == "phi3"
    assert entries[1].runtime_secret_name == "gcs_service_account"
    assert entries[0].runtime_secret_name == "hf_access_token"
    assert all(e.use_volume for e in entries)
    assert any("model_cache is deprecated" in w for w in loaded.warnings)


def test_external_data(tmp_path: Path) -> None:
    config = _load("external_data", tmp_path).config
    items = config.external_data
    assert items is not None and len(items) == 2
    assert items[0].name == "resnet" and items[0].local_data_path == "weights/resnet50.pth"
    assert items[1].backend == "http_public" and items[1].name is None
    assert config.requirements_file == "requirements.txt" and config.requirements == []


def test_streaming_llm(tmp_path: Path) -> None:
    config = _load("streaming_llm", tmp_path).config
    runtime = config.runtime
    assert runtime.predict_concurrency == 32 and runtime.streaming_read_timeout == 120
    assert runtime.enable_tracing_data is True and runtime.enable_debug_logs is False
    assert runtime.transport.kind == TransportKind.HTTP
    assert runtime.is_websocket_endpoint is False
    assert config.resources.cpu_millicores == 7500
    assert config.resources.accelerator == Accelerator("A100", 1)
    assert (config.model_class_name, config.model_module_dir) == ("StreamingModel", "src")
    assert config.live_reload is True and config.python_version == "py312"


@pytest.mark.parametrize("path", sorted(FIXTURES.glob("*.yaml")), ids=lambda p: p.stem)
def test_json_dump_parses_back_to_the_same_config(path: Path) -> None:
    loaded = parse_config(path.read_text(), filename=path.name)
    for exclude_unset in (True, False):
        dumped = loaded.config.model_dump(mode="json", exclude_unset=exclude_unset)
        again = parse_config(json.dumps(dumped), filename="stored.json")
        assert again.config == loaded.config
