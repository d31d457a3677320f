"""Every validation rule of config.yaml: path, line, rule and value in the error."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from kingpost.config import _yaml, load_config, parse_config
from kingpost.config._yaml import MAX_DEPTH
from kingpost.errors import ConfigError

SERVER = """\
base_image:
  image: vllm/vllm-openai:latest
docker_server:
  start_command: vllm serve model
  server_port: {port}
  predict_endpoint: {predict}
  readiness_endpoint: /health
  liveness_endpoint: {liveness}
  run_as_user_id: {uid}
"""


def server(
    port: object = 8000, predict: str = "/predict", liveness: str = "/health", uid: object = 1000
) -> str:
    return SERVER.format(port=port, predict=predict, liveness=liveness, uid=uid)


def weights(*entries: tuple[str, str]) -> str:
    lines = ["weights:"]
    for source, mount in entries:
        lines += [f"  - source: {source}", f"    mount_location: {mount}"]
    return "\n".join(lines) + "\n"


def errors_of(text: str) -> list[dict[str, Any]]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, filename="proj/config.yaml")
    errors: list[dict[str, Any]] = info.value.details["errors"]
    for error in errors:  # every error is also in the message, one per line
        assert f"{error['path']} (line {error['line']})" in info.value.message
    return errors


# (id, config text, key path, line, words of the rule, value found)
CASES: list[tuple[str, str, str, int, str, object]] = [
    ("uid-root", server(uid=0), "docker_server.run_as_user_id", 9,
     "set `run_as_user_id` to another UID, e.g. 1000", 0),
    ("uid-app", server(uid=60000), "docker_server.run_as_user_id", 9,
     "may not be 60000", 60000),
    ("uid-negative", server(uid=-5), "docker_server.run_as_user_id", 9, "non-negative", -5),
    ("port-high", server(port=70000), "docker_server.server_port", 5, "1 to 65535", 70000),
    ("port-zero", server(port=0), "docker_server.server_port", 5, "1 to 65535", 0),
    ("port-text", server(port="http"), "docker_server.server_port", 5, "integer", "http"),
    ("port-float", server(port=80.5), "docker_server.server_port", 5, "integer", 80.5),
    ("port-bool", server(port="true"), "docker_server.server_port", 5, "integer", True),
    ("predict-slash", server(predict="v1/chat"), "docker_server.predict_endpoint", 6,
     "must start with `/`", "v1/chat"),
    ("liveness-slash", server(liveness="healthz"), "docker_server.liveness_endpoint", 8,
     "must start with `/`", "healthz"),
    ("metrics-slash", server() + "  kingpost_metrics_endpoint: metrics\n",
     "docker_server.kingpost_metrics_endpoint", 10, "must start with `/`", "metrics"),
    ("metrics-space", server() + "  kingpost_metrics_endpoint: '/m x'\n",
     "docker_server.kingpost_metrics_endpoint", 10, "without spaces or control characters",
     "/m x"),
    ("mount-relative", weights(("hf://a/b", "models/x")), "weights[0].mount_location", 3,
     "absolute path", "models/x"),
    ("mount-root", weights(("hf://a/b", "/")), "weights[0].mount_location", 3, "must lie below",
     "/"),
    ("mount-app", weights(("hf://a/b", "/app/")), "weights[0].mount_location", 3,
     "replica's own tree), not `/app`", "/app/"),
    ("mount-secrets", weights(("hf://a/b", "/secrets/x")), "weights[0].mount_location", 3,
     "must lie below one of /models", "/secrets/x"),
    ("mount-etc", weights(("hf://a/b", "/etc/foo")), "weights[0].mount_location", 3,
     "not `/etc/foo`", "/etc/foo"),
    ("mount-ssh", weights(("hf://a/b", "/root/.ssh")), "weights[0].mount_location", 3,
     "must lie below", "/root/.ssh"),
    ("mount-bin", weights(("hf://a/b", "/usr/local/bin")), "weights[0].mount_location", 3,
     "must lie below", "/usr/local/bin"),
    ("mount-home", weights(("hf://a/b", "/home/app")), "weights[0].mount_location", 3,
     "not `/home/app`", "/home/app"),
    ("mount-dotdot", weights(("hf://a/b", "/models/../etc")), "weights[0].mount_location", 3,
     "`..`", "/models/../etc"),
    ("mount-duplicate", weights(("hf://a/b", "/models/a"), ("s3://b/c", "/models/a/")),
     "weights[1].mount_location", 5, "unique, but weights[0]", "/models/a/"),
    ("revision-s3", weights(("s3://bucket/path@v2", "/models/m")), "weights[0].source", 2,
     "only allowed on hf://", "s3://bucket/path@v2"),
    ("revision-gs", weights(("gs://bucket/p@main", "/models/m")), "weights[0].source", 2,
     "only allowed on hf://", "gs://bucket/p@main"),
    ("scheme-ftp", weights(("ftp://host/x", "/models/m")), "weights[0].source", 2,
     "hf://, s3://, gs://, r2://, bt://, https://", "ftp://host/x"),
    ("scheme-missing", weights(("owner/repo", "/models/m")), "weights[0].source", 2,
     "absolute local path", "owner/repo"),
    ("hf-empty", weights(("hf://", "/models/m")), "weights[0].source", 2, "repository after", "hf://"),
    ("hf-empty-revision", weights(("hf://a/b@", "/models/m")), "weights[0].source", 2,
     "followed by a revision", "hf://a/b@"),
    ("requirements-both", "requirements: [torch]\nrequirements_file: requirements.txt\n",
     "requirements_file", 2, "mutually exclusive", "requirements.txt"),
    ("weights-and-cache",
     weights(("hf://a/b", "/models/m")) + "model_cache:\n  - repo_id: a/b\n    use_volume: false\n",
     "model_cache", 4, "mutually exclusive", "1 entries"),
    ("concurrency-zero", "runtime:\n  predict_concurrency: 0\n", "runtime.predict_concurrency",
     2, "at least 1", 0),
    ("num-workers", "runtime:\n  num_workers: 2\n", "runtime.num_workers", 2,
     "only 1 worker", 2),
    ("transport-kind", "runtime:\n  transport:\n    kind: carrier\n", "runtime.transport.kind",
     3, "'http', 'websocket' or 'grpc'", "carrier"),
    ("secret-name", 'secrets:\n  "hf token": null\n', "secrets.hf token", 2,
     "letters, digits", "hf token"),
    ("secret-dot", 'secrets:\n  "..": null\n', "secrets...", 2, "not `.` or `..`", ".."),
    ("secret-bool", "secrets:\n  tok: true\n", "secrets.tok", 2, "not a boolean", True),
    ("secret-bool-false", "secrets:\n  tok: false\n", "secrets.tok", 2, "quote it", False),
    ("python-dotted", 'python_version: "3.11"\n', "python_version", 1, "write it like `py311`",
     "3.11"),
    ("python-old", "python_version: py37\n", "python_version", 1, "one of py38", "py37"),
    ("requirements-absolute", "requirements_file: /etc/passwd\n", "requirements_file", 1,
     "inside the project", "/etc/passwd"),
    ("requirements-escapes", "requirements_file: sub/../../r.txt\n", "requirements_file", 1,
     "inside the project", "sub/../../r.txt"),
    ("data-dir-escapes", "data_dir: ../../etc\n", "data_dir", 1, "inside the project",
     "../../etc"),
    ("data-dir-inner-dotdot", "data_dir: data/../../x\n", "data_dir", 1, "no `..`",
     "data/../../x"),
    ("data-dir-absolute", "data_dir: /etc\n", "data_dir", 1, "no leading `/`", "/etc"),
    ("data-dir-empty", 'data_dir: ""\n', "data_dir", 1, "not empty", ""),
    ("cpu", "resources:\n  cpu: lots\n", "resources.cpu", 2, "millicores", "lots"),
    ("cpu-m-only", "resources:\n  cpu: m\n", "resources.cpu", 2, "millicores", "m"),
    ("memory-unit", "resources:\n  memory: 2GB\n", "resources.memory", 2, "Gi", "2GB"),
    ("memory-inf", "resources:\n  memory: inf\n", "resources.memory", 2, "Gi", "inf"),
    ("memory-negative", "resources:\n  memory: '-1e9'\n", "resources.memory", 2, "Gi", "-1e9"),
    ("cpu-inf", "resources:\n  cpu: .inf\n", "resources.cpu", 2, "finite", "inf"),
    ("cpu-infinity", "resources:\n  cpu: Infinity\n", "resources.cpu", 2, "finite", "Infinity"),
    ("cpu-milli-inf", "resources:\n  cpu: 1e999m\n", "resources.cpu", 2, "finite", "1e999m"),
    ("cpu-too-many", "resources:\n  cpu: 1e12\n", "resources.cpu", 2, "at most 1024 cores",
     "1e12"),
    ("memory-overflow", f"resources:\n  memory: '{'9' * 400}'\n", "resources.memory", 2,
     "finite", "9" * 400),
    ("memory-too-much", "resources:\n  memory: 2Pi\n", "resources.memory", 2, "at most 1Pi",
     "2Pi"),
    ("accelerator-count", "resources:\n  accelerator: H100:0\n", "resources.accelerator", 2,
     "positive integer", "H100:0"),
    ("accelerator-junk", "resources:\n  accelerator: H100:two\n", "resources.accelerator", 2,
     "positive integer", "H100:two"),
    ("node-count", "resources:\n  node_count: 0\n", "resources.node_count", 2,
     "greater than or equal to 1", 0),
    ("env-list", "environment_variables:\n  A: [1, 2]\n", "environment_variables.A", 2,
     "valid string, not a list", [1, 2]),
    ("env-name", 'environment_variables:\n  "A=B": x\n', "environment_variables.A=B", 2,
     "contain no `=`", "A=B"),
    ("auth-missing-secret",
     "weights:\n  - source: s3://b/p\n    mount_location: /models/m\n    auth:\n"
     "      auth_method: CUSTOM_SECRET\n", "weights[0].auth", 4,
     "needs auth_secret_name", None),
    ("auth-method", "weights:\n  - source: s3://b/p\n    mount_location: /models/m\n    auth:\n"
     "      auth_method: PASSWORD\n", "weights[0].auth.auth_method", 5,
     "'CUSTOM_SECRET', 'AWS_OIDC' or 'GCP_OIDC'", "PASSWORD"),
    ("docker-auth", "base_image:\n  image: x\n  docker_auth:\n    auth_method: AWS_OIDC\n",
     "base_image.docker_auth", 3, "needs aws_oidc_role_arn, aws_oidc_region", None),
    ("python-exe", "base_image:\n  image: x\n  python_executable_path: python3\n",
     "base_image.python_executable_path", 3, "must be absolute", "python3"),
    ("cache-revision", "model_cache:\n  - repo_id: a/b\n    use_volume: true\n"
     "    volume_folder: ab\n", "model_cache[0]", 2, "pinned `revision`", None),
    ("cache-use-volume", "model_cache:\n  - repo_id: a/b\n", "model_cache[0].use_volume", 2,
     "required key `use_volume`", None),
    ("cache-folder-dotdot", "model_cache:\n  - repo_id: a/b\n    revision: main\n"
     "    use_volume: true\n    volume_folder: ../../../etc/kp\n",
     "model_cache[0].volume_folder", 5, "inside /app/model_cache", "../../../etc/kp"),
    ("cache-folder-absolute", "model_cache:\n  - repo_id: a/b\n    revision: main\n"
     "    use_volume: true\n    volume_folder: /etc\n",
     "model_cache[0].volume_folder", 5, "no leading `/`", "/etc"),
    ("cache-bucket-dotdot", "model_cache:\n  - repo_id: gs://bucket/../../../../usr\n"
     "    kind: gcs\n    use_volume: false\n", "model_cache[0].repo_id", 2,
     "may not contain `..`", "gs://bucket/../../../../usr"),
    ("external-abs", "external_data:\n  - url: https://x/y\n    local_data_path: /etc/x\n",
     "external_data[0].local_data_path", 3, "relative to the data directory", "/etc/x"),
    ("build-no-cache", "build:\n  no_cache: true\n", "build.no_cache", 2,
     "cannot be set in config.yaml", True),
    ("no-build-image", "docker_server:\n  no_build: true\n  server_port: 80\n"
     "  predict_endpoint: /p\n  readiness_endpoint: /r\n  liveness_endpoint: /l\n",
     "docker_server.no_build", 2, "needs one", True),
    ("top-level-list", "- a\n- b\n", "<root>", 1, "must be a mapping", "list"),
    ("trt-llm", "model_name: m\ntrt_llm:\n  build:\n    base_model: decoder\n", "trt_llm", 2,
     "serve the model with `docker_server` instead", {"build": {"base_model": "decoder"}}),
    ("bis-llm", "bis_llm:\n  version: '1'\n", "bis_llm", 1, "Baseten's own serving stack",
     {"version": "1"}),
    ("training-checkpoints", "training_checkpoints:\n  artifact_references:\n"
     "    - training_job_id: j1\n", "training_checkpoints", 1, "list them under `weights`",
     {"artifact_references": [{"training_job_id": "j1"}]}),
    ("transport-grpc", "runtime:\n  transport:\n    kind: grpc\n", "runtime.transport.kind", 3,
     "Kingpost's gateway speaks HTTP/1.1 to replicas", "grpc"),
    ("bdn-mounts", "bdn:\n  mounts:\n    - source: bdn:weights/llama:prod\n"
     "      path: /models/llama\n", "bdn", 1, "list where their files come from",
     {"mounts": [{"source": "bdn:weights/llama:prod", "path": "/models/llama"}]}),
]  # fmt: skip


@pytest.mark.parametrize(("text", "path", "line", "rule", "value"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])  # fmt: skip
def test_rule_reports_path_line_rule_and_value(
    text: str, path: str, line: int, rule: str, value: object
) -> None:
    errors = errors_of(text)
    matching = [e for e in errors if e["path"] == path]
    assert matching, errors
    error = matching[0]
    assert error["line"] == line
    assert rule in error["message"]
    assert error["value"] == value


def test_baseten_only_keys_left_empty_ask_for_nothing() -> None:
    for key in ("trt_llm", "bis_llm", "training_checkpoints", "bdn"):
        assert parse_config(f"{key}: {{}}\n").config is not None
        assert parse_config(f"{key}: null\n").config is not None
    # Truss's own dump of a config with its defaults (`to_dict(verbose=True)`).
    dumped = "bdn:\n  access: []\n  hotload:\n    enabled: false\n  mounts: []\n"
    assert parse_config(dumped).config is not None
    errors = errors_of(dumped.replace("enabled: false", "enabled: true"))
    assert [e["path"] for e in errors] == ["bdn"]
    # Truss dumps `training_checkpoints` with a default download folder, and no checkpoints.
    dumped = (
        "training_checkpoints:\n  artifact_references: []\n"
        "  download_folder: /tmp/training_checkpoints\n  loops_checkpoint_ids: []\n"
    )
    assert parse_config(dumped).config is not None
    errors = errors_of(dumped.replace("loops_checkpoint_ids: []", "loops_checkpoint_ids: [c1]"))
    assert [e["path"] for e in errors] == ["training_checkpoints"]


def test_start_command_required_unless_no_build() -> None:
    text = server().replace("  start_command: vllm serve model\n", "")
    (error,) = errors_of(text)
    assert error["path"] == "docker_server.start_command"
    assert error["line"] == 3  # the docker_server line: the key itself is absent
    assert "unless `no_build: true`" in error["message"]
    no_build = text.replace("docker_server:\n", "docker_server:\n  no_build: true\n")
    assert parse_config(no_build).config.no_build


def test_missing_key_names_the_misspelt_sibling() -> None:
    text = server().replace("predict_endpoint", "predict_endpiont")
    (error,) = errors_of(text)
    assert error["path"] == "docker_server.predict_endpoint"
    assert error["line"] == 6  # the line of the misspelt key
    assert "did you mean `predict_endpoint`" in error["message"]


@pytest.mark.parametrize("missing", ["liveness_endpoint", "readiness_endpoint"])
def test_a_correctly_named_sibling_is_not_offered_for_a_missing_key(missing: str) -> None:
    """`liveness_endpoint` is close to `readiness_endpoint`: one missing was offered the
    other, a field of the same section that is spelt right, and its line."""
    text = server().replace(f"  {missing}: /health\n", "")
    (error,) = errors_of(text)
    assert error["path"] == f"docker_server.{missing}"
    assert error["line"] == 3  # the docker_server line, not the sibling's
    assert error["message"] == f"required key `{missing}` is missing; add `{missing}:` here"


@pytest.mark.parametrize(
    ("text", "path", "typo", "line"),
    [
        ("model_cache:\n  - repo_id: a/b\n    use_volum: true\n", "model_cache[0].use_volume",
         "use_volum", 3),
        ("weights:\n  - source: s3://a/b\n    mount_location: /models/x\n    auth:\n"
         "      auth_secret_name: x\n      auth_methd: CUSTOM_SECRET\n",
         "weights[0].auth.auth_method", "auth_methd", 6),
    ],
)  # fmt: skip
def test_misspelt_keys_in_nested_sections_are_still_offered(
    text: str, path: str, typo: str, line: int
) -> None:
    (error,) = errors_of(text)
    assert (error["path"], error["line"]) == (path, line)
    assert f"found `{typo}`, did you mean" in error["message"]


def test_all_errors_of_a_file_come_together_in_line_order() -> None:
    text = server(port=0, uid=0) + "requirements: [a]\nrequirements_file: r.txt\n"
    text += "runtime:\n  predict_concurrency: -1\n"
    with pytest.raises(ConfigError) as info:
        parse_config(text, filename="proj/config.yaml")
    paths = [e["path"] for e in info.value.details["errors"]]
    assert paths == [
        "docker_server.server_port",
        "docker_server.run_as_user_id",
        "requirements_file",
        "runtime.predict_concurrency",
    ]
    message = info.value.message
    assert message.startswith("proj/config.yaml: 4 errors in the Truss config")
    assert len(message.splitlines()) == 5
    assert info.value.details["file"] == "proj/config.yaml"
    assert info.value.to_dict()["code"] == "invalid_config"


@pytest.mark.parametrize(
    ("text", "line", "column"),
    [
        ("model_name: a\n  bad: indent\n", 2, 6),
        ("secrets: {a: null\n", 2, 1),
        ("a: [1, 2\nb: 3\n", 2, 2),
        ("model_name: x\n---\nmodel_name: y\n", 2, 1),
        ("model_name: x\ndescription: 2024-02-30\n", 2, 14),
        ("model_metadata:\n  seed: 1" + "0" * 5000 + "\n", 2, 9),
    ],
    ids=["indent", "flow-mapping", "flow-sequence", "two-documents", "date", "huge-int"],
)
def test_invalid_yaml_names_line_and_column(text: str, line: int, column: int) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, filename="c.yaml")
    assert (info.value.details["line"], info.value.details["column"]) == (line, column)
    assert f"c.yaml: invalid YAML at line {line}, column {column}" in info.value.message


def test_duplicate_keys_are_errors() -> None:
    text = "model_name: a\nresources:\n  cpu: '1'\n  cpu: '2'\nmodel_name: b\n"
    errors = errors_of(text)
    assert [(e["path"], e["line"]) for e in errors] == [("model_name", 1), ("resources.cpu", 3)]
    assert "duplicate key `model_name` (line 5)" in errors[0]["message"]
    assert "duplicate key `cpu` (line 4)" in errors[1]["message"]


def test_long_values_are_shortened_in_the_message() -> None:
    text = f"python_version: {'x' * 200}\n"
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    line = info.value.message.splitlines()[1]
    assert len(line) < 300 and line.endswith("...)")
    assert info.value.details["errors"][0]["value"] == "x" * 200


def _laughs(levels: int) -> str:
    lines = ["model_metadata:", "  a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        lines.append(f"  a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    ("text", "path", "line", "rule"),
    [
        ("model_name: x\nmodel_metadata: &a\n  b: *a\n", "model_metadata.b", 2,
         "refers to an anchor that contains it"),
        ("model_name: x\nrequirements: &a [*a]\n", "requirements[0]", 2,
         "refers to an anchor that contains it"),
        (_laughs(9), "model_metadata.a5", 7, "more than 1000000 values"),
        ("model_metadata: " + "[" * 5000 + "]" * 5000 + "\n", "<root>", 1,
         "nested more than 100 levels"),
        ("model_metadata: " + "[" * 200_000 + "]" * 200_000 + "\n", "<root>", 1,
         "nested more than 100 levels"),
    ],
    ids=["alias-in-own-mapping", "alias-in-own-list", "billion-laughs", "deep", "deeper-than-c"],
)  # fmt: skip
def test_aliases_and_nesting_get_a_clean_error_at_once(
    text: str, path: str, line: int, rule: str
) -> None:
    """Each of these used to recurse or expand: RecursionError, a segfault of the C
    composer (taking the API server with it) or minutes of CPU."""
    started = time.monotonic()
    with pytest.raises(ConfigError) as info:
        parse_config(text, filename="c.yaml")
    assert time.monotonic() - started < 5
    (error,) = info.value.details["errors"]
    assert (error["path"], error["line"]) == (path, line)
    assert rule in error["message"] and rule in info.value.message


def _nested(depth: int, flow: bool) -> str:
    if flow:
        return "model_metadata: " + "[" * depth + "]" * depth + "\n"
    return (
        "model_metadata:\n"
        + "".join(f"{'  ' * (i + 1)}k{i}:\n" for i in range(depth))
        + ("  " * (depth + 1) + "v: 1\n")
    )


@pytest.mark.parametrize("loader", [yaml.SafeLoader, _yaml._Loader], ids=["python", "libyaml"])
@pytest.mark.parametrize(
    ("depth", "flow"),
    [(101, True), (150, False), (999, True), (1000, True), (5000, True), (2000, False)],
)
def test_the_depth_rule_is_kingposts_whichever_parser_refuses_first(
    loader: type[yaml.SafeLoader], depth: int, flow: bool
) -> None:
    """PyYAML 6.0.3+ ships a libyaml whose scanner refuses 1000 levels with its own
    message before Kingpost's walk sees an event; the pure-Python parser has no limit.
    Either way the user reads Kingpost's rule, on the config's own line."""
    with pytest.raises(ConfigError) as info:
        _yaml._check_depth(_nested(depth, flow), "c.yaml", loader)
    (error,) = info.value.details["errors"]
    assert "nested more than 100 levels" in error["message"]
    assert error["path"] == "<root>" and error["line"] == (1 if flow else 101)


def test_libyamls_own_depth_error_is_recognised() -> None:
    """The translation above keys on libyaml's wording: fail here, not for users, if a
    new PyYAML words it differently."""
    if not yaml.__with_libyaml__:
        pytest.skip("PyYAML built without libyaml")
    try:
        for _ in yaml.parse(_nested(5000, True), Loader=yaml.CSafeLoader):
            pass
    except yaml.MarkedYAMLError as exc:
        assert _yaml._libyaml_depth_limit(exc), exc
    else:
        pytest.skip(f"this libyaml (PyYAML {yaml.__version__}) has no nesting limit")


def test_nesting_at_the_limit_is_fine() -> None:
    """`_nested(n, False)` holds n + 2 levels: the root, model_metadata's and n keys'."""
    metadata = parse_config(_nested(MAX_DEPTH - 2, False)).config.model_metadata
    for i in range(MAX_DEPTH - 2):
        metadata = metadata[f"k{i}"]
    assert metadata == {"v": 1}


def _copies(levels: int, string_bytes: int = 10_000) -> str:
    """A small config whose aliases make 10**levels copies of one long string."""
    lines = ["model_name: x", "model_metadata:", f"  s0: &s0 {'x' * string_bytes}"]
    for i in range(1, levels + 1):
        lines.append(f"  s{i}: &s{i} [{', '.join([f'*s{i - 1}'] * 10)}]")
    return "\n".join(lines) + "\n"


def test_aliases_that_expand_past_the_byte_limit_are_refused_with_path_line_and_limit() -> None:
    """A 10 KB config whose aliases made 10**4 copies of a 10 KB string was accepted: the
    value count was small (11,111) but the store kept 100 MB of JSON for it."""
    text = _copies(4)
    assert len(text) < 11_000
    with pytest.raises(ConfigError) as info:
        parse_config(text, filename="c.yaml")
    (error,) = info.value.details["errors"]
    # 10**3 copies (10 MB) already pass the 8 MiB limit, at s3 on line 6
    assert (error["path"], error["line"]) == ("model_metadata.s3", 6)
    message = info.value.message
    assert message.startswith("c.yaml: model_metadata.s3 (line 6): ")
    assert "once its aliases (`*name`) are expanded" in message
    assert "more than the limit of 8.0 MiB" in message and "9.5 MiB (10000111 bytes)" in message


def test_a_config_just_under_the_byte_limit_is_fine() -> None:
    metadata = parse_config(_copies(2, string_bytes=70_000)).config.model_metadata
    assert len(metadata["s2"]) == 10 and metadata["s2"][0][0] == "x" * 70_000


def test_a_long_value_without_aliases_counts_too() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(f"model_name: x\ndescription: {'y' * (9 * 1024**2)}\n")
    assert info.value.details["errors"][0]["path"] == "description"
    assert "9.0 MiB" in info.value.message


def test_shared_aliases_are_fine() -> None:
    text = _laughs(4) + "  base: &b {lr: 1}\n  runs: [*b, *b, *b]\n"
    metadata = parse_config(text).config.model_metadata
    assert metadata["runs"] == [{"lr": 1}] * 3 and len(metadata["a3"][0][0]) == 10


def test_a_scalar_that_cannot_be_what_it_looks_like_is_named() -> None:
    """`2024-02-30` resolves to a date PyYAML cannot build: a ValueError, not YAML's own."""
    with pytest.raises(ConfigError) as info:
        parse_config("model_name: x\ndescription: 2024-02-30\n")
    assert "cannot read `2024-02-30` as a timestamp" in info.value.message
    assert "quote it" in info.value.message


def test_a_config_file_past_the_byte_limit_is_refused_before_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    with path.open("w") as fh:  # sparse: nothing to parse would ever get this far
        fh.truncate(9 * 1024**2)
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert f"the file is {9 * 1024**2} bytes, more than the limit of" in info.value.message
    assert info.value.details["errors"][0]["value"] == 9 * 1024**2
