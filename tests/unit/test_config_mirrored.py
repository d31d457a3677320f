"""``model_cache`` and ``external_data`` become ``weights`` entries at Truss's paths."""

from __future__ import annotations

import json

import pytest

from kingpost.config import mirrored, parse_config
from kingpost.config.mirrored import DerivedWeights
from kingpost.errors import ConfigError
from kingpost.weights import validate_weights

V2 = (
    "model_cache:\n"
    "  - repo_id: julien-c/EsperBERTo-small\n"
    "    revision: 4c7798256a4a6d577738150840c8f728361496d6\n"
    "    volume_folder: julien_c_esper\n"
    "    use_volume: true\n"
    "    ignore_patterns: ['*.bin', '*.msgpack']\n"
)


def derived(text: str) -> list[tuple[str, str, str | None, bool]]:
    return [
        (w.source, w.mount_location, w.secret_name, w.single_file)
        for w in parse_config(text).config.weights
        if isinstance(w, DerivedWeights)
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # Truss's test_truss_server_model_cache_v2: the volume folder under /app/model_cache.
        (V2, [("hf://julien-c/EsperBERTo-small@4c7798256a4a6d577738150840c8f728361496d6",
               "/app/model_cache/julien_c_esper", "hf_access_token", False)]),
        # ...and _v1: no revision means main; a snapshot of the Hub cache, named by commit.
        ("model_cache:\n  - repo_id: julien-c/EsperBERTo-small\n    use_volume: false\n",
         [("hf://julien-c/EsperBERTo-small@main",
           "/app/model_cache/.hub/models--julien-c--EsperBERTo-small/snapshots/{revision}",
           "hf_access_token", False)]),
        # A bucket without a volume: its keys under /app/model_cache/{bucket}, as Truss's build.
        ("model_cache:\n  - repo_id: gs://models/llama/v1\n    kind: gcs\n    use_volume: false\n"
         "    runtime_secret_name: gcs_key\n",
         [("gs://models/llama/v1", "/app/model_cache/models/llama/v1", "gcs_key", False)]),
        ("model_cache:\n  - repo_id: weights/llama\n    kind: s3\n    use_volume: true\n"
         "    volume_folder: llama\n    runtime_secret_name: aws\n",
         [("s3://weights/llama", "/app/model_cache/llama", "aws", False)]),
        ("external_data:\n  - url: https://example.com/x/model.bin\n"
         "    local_data_path: weights/model.bin\n"
         "  - url: http://127.0.0.1:9/top.txt\n    local_data_path: top.txt\n",
         [("https://example.com/x/model.bin", "/app/data/weights/model.bin", None, True),
          ("http://127.0.0.1:9/top.txt", "/app/data/top.txt", None, True)]),
        # The legacy name is read as model_cache, and mirrored the same way.
        (V2.replace("model_cache:", "hf_cache:"),
         [("hf://julien-c/EsperBERTo-small@4c7798256a4a6d577738150840c8f728361496d6",
           "/app/model_cache/julien_c_esper", "hf_access_token", False)]),
    ],
    ids=["v2-hf", "v1-hf", "v1-gcs", "v2-s3", "external-data", "hf-cache"],
)  # fmt: skip
def test_each_item_becomes_a_weights_entry_at_truss_path(
    text: str, expected: list[tuple[str, str, str | None, bool]]
) -> None:
    assert derived(text) == expected


def test_written_weights_come_first_and_external_data_joins_them() -> None:
    text = (
        "weights:\n  - source: hf://org/m@main\n    mount_location: /models/m\n"
        "external_data:\n  - url: https://e.com/a.txt\n    local_data_path: a.txt\n"
    )
    weights = parse_config(text).config.weights
    assert [w.mount_location for w in weights] == ["/models/m", "/app/data/a.txt"]
    assert not isinstance(weights[0], DerivedWeights)


def test_a_dump_leaves_derived_entries_out_and_parses_back_the_same() -> None:
    loaded = parse_config(V2)
    dumped = loaded.config.model_dump(mode="json")
    assert dumped["weights"] == []
    assert parse_config(json.dumps(dumped)).config == loaded.config


def test_no_build_images_get_neither() -> None:
    text = (
        V2 + "base_image:\n  image: vllm/vllm-openai:latest\n"
        "docker_server:\n  no_build: true\n  server_port: 8000\n  predict_endpoint: /p\n"
        "  readiness_endpoint: /h\n  liveness_endpoint: /h\n"
    )
    assert derived(text) == []


def test_push_checks_name_the_item_not_a_weights_entry() -> None:
    text = (
        "model_cache:\n  - repo_id: account/container\n    kind: azure\n"
        "    use_volume: true\n    volume_folder: c\n"
    )
    errors = validate_weights(parse_config(text).config.weights)
    assert [path for path, _ in errors] == ["model_cache[0].source"]


@pytest.mark.parametrize(
    ("text", "path", "rule"),
    [
        ("external_data:\n  - url: s3://bucket/a\n    local_data_path: a\n",
         "external_data[0].url", "http:// or https://"),
        ("external_data:\n  - url: https://e/a\n    local_data_path: x/a\n"
         "  - url: https://e/b\n    local_data_path: x//a\n",
         "external_data[1].local_data_path", "must be unique"),
        (V2 + V2.replace("model_cache:\n", "").replace("EsperBERTo-small", "other"),
         "model_cache[1].volume_folder", "must be unique"),
    ],
    ids=["external-url-scheme", "external-same-file", "same-volume-folder"],
)  # fmt: skip
def test_items_that_cannot_be_mirrored_are_refused(text: str, path: str, rule: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    errors = info.value.details["errors"]
    matching = [e for e in errors if e["path"] == path]
    assert matching and rule in matching[0]["message"], errors


def test_a_derived_mount_outside_the_weights_roots_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Derived entries skip WeightsSource's validation; the mount-root rule still holds,
    whatever the translation to Truss's paths produces."""
    monkeypatch.setattr(mirrored, "MODEL_CACHE_ROOT", "/srv/model_cache")
    with pytest.raises(ConfigError) as info:
        parse_config(V2)
    (error,) = info.value.details["errors"]
    assert error["path"] == "model_cache[0]"
    assert "must lie below one of /models" in error["message"]
    assert error["value"] == "/srv/model_cache/julien_c_esper"
