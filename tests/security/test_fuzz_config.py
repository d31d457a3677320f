"""Property-based fuzzing of the config parser (hypothesis).

Whatever a client uploads as config.yaml, `parse_config` either returns a config or raises
`ConfigError` whose every error names a path, a line and a message; nothing else escapes
(no KeyError, RecursionError or pydantic error reaching the API as a 500). A config that
parses is stored as JSON, so `document()` must be JSON data and must parse again to the
same document.

Examples per test: `KINGPOST_FUZZ_EXAMPLES` (default 200); a failure prints the seed and the
shrunk input to reproduce it.
"""

from __future__ import annotations

import json
import os
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kingpost.config import parse_config
from kingpost.errors import ConfigError

EXAMPLES = int(os.environ.get("KINGPOST_FUZZ_EXAMPLES", "200"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)

# Truss's keys, with a few nested ones, so that generated documents reach the validators
# and cross-key rules rather than stopping at "unknown key".
TOP_KEYS = [
    "model_name", "python_version", "requirements", "requirements_file", "resources",
    "runtime", "secrets", "environment_variables", "weights", "model_cache", "external_data",
    "docker_server", "base_image", "system_packages", "model_metadata", "build_commands",
    "apply_library_patches", "model_class_name", "model_module_dir", "data_dir",
    "bundled_packages_dir", "external_package_dirs", "spec_version", "description",
    "build", "live_reload", "trt_llm", "training_checkpoints", "bdn", "use_local_src",
]  # fmt: skip
NESTED_KEYS = [
    "cpu", "memory", "accelerator", "use_gpu", "predict_concurrency", "streaming_read_timeout",
    "transport", "kind", "start_command", "server_port", "predict_endpoint",
    "readiness_endpoint", "liveness_endpoint", "no_build", "run_as_user_id", "source",
    "mount_location", "allow_patterns", "ignore_patterns", "auth", "repo_id", "revision",
    "use_volume", "volume_folder", "url", "local_data_path", "image", "python_executable_path",
]  # fmt: skip

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.sampled_from(["H100:2", "A10G", "1Gi", "512Mi", "hf://a/b@main", "/app/x", "py311",
                     "s3://bucket/key", "../etc", "", "0", "-1", "3.5"]),
)  # fmt: skip
keys = st.one_of(st.sampled_from(NESTED_KEYS), st.text(max_size=12))
values: st.SearchStrategy[Any] = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)),
    max_leaves=20,
)
documents = st.dictionaries(st.sampled_from(TOP_KEYS), values, max_size=8)


def _check(text: str) -> None:
    try:
        loaded = parse_config(text, filename="config.yaml")
    except ConfigError as exc:
        assert exc.message.startswith("config.yaml"), exc.message
        errors = exc.details.get("errors") or []
        for error in errors:
            assert error["path"] and error["message"], error
        return
    document = loaded.document()
    json.dumps(document)  # what the store keeps must be JSON
    # The stored form (keys made strings, dates ISO text) is a fixed point: what the
    # store gives back parses to the same document.
    again = parse_config(yaml.safe_dump(document), filename="config.yaml")
    assert again.document() == document


@FUZZ
@given(documents)
def test_generated_truss_documents_parse_or_fail_cleanly(doc: dict[str, Any]) -> None:
    _check(yaml.safe_dump(doc, allow_unicode=True))


@FUZZ
@given(st.text(max_size=400))
def test_arbitrary_text_parses_or_fails_cleanly(text: str) -> None:
    _check(text)


yaml_tokens = st.sampled_from(
    ["\n", "  ", "- ", ": ", "[", "]", "{", "}", ",", "&a ", "*a", "!!python/object ", "? ",
     "'", '"', "#", "|", ">", "---", "...", "model_name", "weights", "source", "x", "1",
     "<<: *a", "!!binary ", "%YAML 1.1\n", "\t", "\ufeff", "null", "~", "2024-02-30"]
)  # fmt: skip


@FUZZ
@given(st.lists(yaml_tokens, max_size=60).map("".join))
def test_yaml_shaped_noise_parses_or_fails_cleanly(text: str) -> None:
    """Anchors, tags, merges and flow brackets in random order: the node checks (aliases
    inside their anchor, depth, duplicate keys) run on all of them."""
    _check(text)
