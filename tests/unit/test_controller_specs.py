"""From a parsed config to the server shape engines and the gateway use."""

from __future__ import annotations

from kingpost.config import parse_config
from kingpost.controller.specs import missing_secrets, replica_secrets, server_shape
from kingpost.engines.base import ServerKind

CUSTOM = """\
docker_server:
  start_command: python server.py
  server_port: 9001
  predict_endpoint: /v1/chat/completions
  readiness_endpoint: /ready
  liveness_endpoint: /alive
runtime:
  predict_concurrency: 4
  health_checks:
    restart_check_delay_seconds: 5
    restart_threshold_seconds: 60
    stop_traffic_threshold_seconds: 10
    startup_threshold_seconds: 240
secrets:
  hf_token: null
  inline: some-default
"""


def test_custom_server_shape() -> None:
    shape = server_shape(parse_config(CUSTOM).config)
    assert shape.kind == ServerKind.CUSTOM_SERVER
    assert (shape.server_port, shape.predict_path, shape.command) == (
        9001,
        "/v1/chat/completions",
        "python server.py",
    )
    assert (shape.probes.readiness_path, shape.probes.liveness_path) == ("/ready", "/alive")
    assert shape.probes.initial_delay_s == 5
    assert shape.probes.liveness_failure_threshold == 60
    assert shape.probes.readiness_failure_threshold == 10
    assert shape.probes.startup_timeout_s == 240  # never ready by then: restarted
    assert shape.concurrency == 4


def test_model_class_shape() -> None:
    shape = server_shape(parse_config("model_name: m\n").config)
    assert shape.kind == ServerKind.MODEL_CLASS
    assert shape.predict_path == "/v1/models/model:predict"
    assert shape.probes.readiness_path == "/v1/models/model"
    assert shape.command is None and shape.concurrency == 1
    assert shape.probes.startup_timeout_s == 1800  # the platform's default


def test_secrets_needed_and_given() -> None:
    config = parse_config(CUSTOM).config
    assert missing_secrets(config, set()) == ["hf_token"]
    assert missing_secrets(config, {"hf_token"}) == []
    assert replica_secrets(config, {"hf_token": "t"}) == {"hf_token": "t", "inline": "some-default"}
    assert replica_secrets(config, {"hf_token": "t", "inline": "stored"})["inline"] == "stored"
    model_class = parse_config("model_name: m\nsecrets:\n  inline: some-default\n").config
    # The model server applies the default itself, after a TRUSS_SECRET_ variable.
    assert replica_secrets(model_class, {}) == {}
    assert replica_secrets(model_class, {"inline": "stored"}) == {"inline": "stored"}


def test_custom_server_without_explicit_concurrency_is_not_serialised() -> None:
    text = CUSTOM.replace("  predict_concurrency: 4\n", "")
    assert server_shape(parse_config(text).config).concurrency == 256
