from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kingpost.config import load_config
from kingpost.weights.migrate import plan_migration

CONFIG = """\
# my model
model_name: cached
model_cache:
  - repo_id: meta-llama/Llama-3.1-8B
    revision: main
    volume_folder: llama
    runtime_secret_name: hf_access_token
    allow_patterns: ["*.safetensors", "*.json"]
    use_volume: true
  - repo_id: my-bucket/models/emb
    kind: s3
    runtime_secret_name: aws_creds
resources:
  cpu: "1"  # keep me
"""


def project(tmp_path: Path, text: str = CONFIG) -> Path:
    (tmp_path / "model").mkdir()
    (tmp_path / "config.yaml").write_text(text)
    (tmp_path / "model" / "model.py").write_text(
        "from huggingface_hub import snapshot_download\nPATH = '/app/model_cache/llama'\n"
    )
    return tmp_path


def test_model_cache_becomes_weights_as_the_table_says(tmp_path: Path) -> None:
    plan = plan_migration(project(tmp_path))
    migrated = yaml.safe_load(plan.migrated)
    assert "model_cache" not in migrated
    assert migrated["weights"] == [
        {
            "source": "hf://meta-llama/Llama-3.1-8B@main",
            "mount_location": "/app/model_cache/llama",
            "allow_patterns": ["*.safetensors", "*.json"],
            "auth": {"auth_method": "CUSTOM_SECRET", "auth_secret_name": "hf_access_token"},
        },
        {
            "source": "s3://my-bucket/models/emb",
            "mount_location": "/app/model_cache/emb",
            "auth": {"auth_method": "CUSTOM_SECRET", "auth_secret_name": "aws_creds"},
        },
    ]
    assert plan.migrated.startswith("# my model\nmodel_name: cached\n")
    assert 'cpu: "1"  # keep me' in plan.migrated
    assert "+- source: hf://meta-llama/Llama-3.1-8B@main" in plan.diff()
    assert any("/app/model_cache" in w for w in plan.warnings)
    assert any("snapshot_download" in w or "Hub" in w for w in plan.warnings)


def test_cli_applies_with_a_backup_and_the_result_loads(tmp_path: Path) -> None:
    root = project(tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "kingpost.cli", "migrate", str(root), "--yes"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    backups = list(root.glob("config.yaml.bak-*"))
    assert len(backups) == 1 and backups[0].read_text() == CONFIG
    loaded = load_config(root).config
    assert loaded.model_cache in (None, []) and loaded.weights and len(loaded.weights) == 2
    # The backup stays beside config.yaml but is not uploaded by the next push.
    from kingpost.packaging import project_files

    assert Path("config.yaml") in project_files(root)
    assert not [p for p in project_files(root) if p.name.startswith("config.yaml.bak-")]


def test_code_hints_match_code_not_comments(tmp_path: Path) -> None:
    """`kingpost init`'s template names lazy_data_resolver in a comment: migrate warned
    about it in a project that never used the resolver."""
    root = project(tmp_path)
    (root / "model" / "model.py").write_text(
        "class Model:\n"
        "    # kwargs may hold config, data_dir, secrets, environment, lazy_data_resolver.\n"
        "    def __init__(self, **kwargs):\n        pass\n"
    )
    assert not [w for w in plan_migration(root).warnings if "lazy_data_resolver" in w]
    (root / "model" / "model.py").write_text(
        "class Model:\n    def __init__(self, **kwargs):\n"
        "        self._r = kwargs['lazy_data_resolver']  # needed\n"
    )
    assert [w for w in plan_migration(root).warnings if "lazy_data_resolver" in w]


def test_nothing_to_migrate(tmp_path: Path) -> None:
    plan = plan_migration(project(tmp_path, "model_name: plain\n"))
    assert not plan.changed


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("model_name: [unclosed\n", "invalid YAML at line 2"),
        ("- just\n- a list\n", "top level must be a mapping"),
        ("model_cache: meta-llama/Llama-3.1-8B\n", "model_cache: must be a list of mappings"),
        ("external_data: [1, 2]\n", "external_data: must be a list of mappings"),
    ],
)
def test_a_config_that_cannot_be_migrated_is_an_error_not_a_traceback(
    tmp_path: Path, text: str, says: str
) -> None:
    root = project(tmp_path, text)
    out = subprocess.run(
        [sys.executable, "-m", "kingpost.cli", "migrate", str(root), "--yes"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode != 0
    assert says in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert (root / "config.yaml").read_text() == text  # untouched


EXTERNAL = """\
model_name: ext
external_data:
  - url: https://example.com/files/model.bin
    local_data_path: weights/model.bin
  - url: https://example.com/files/tok.json
    local_data_path: weights/tokenizer.json
  - url: https://example.com/files/vocab.txt
    local_data_path: vocab.txt
  - url: https://cdn.example.com/emb/encoder.onnx
    local_data_path: encoder/encoder.onnx
"""


def test_external_data_becomes_weights_where_it_maps(tmp_path: Path) -> None:
    root = project(tmp_path, EXTERNAL)
    plan = plan_migration(root)
    migrated = yaml.safe_load(plan.migrated)
    assert migrated["weights"] == [
        {"source": "https://example.com/files/model.bin", "mount_location": "/app/data/weights"},
        {
            "source": "https://cdn.example.com/emb/encoder.onnx",
            "mount_location": "/app/data/encoder",
        },
    ]
    assert [x["local_data_path"] for x in migrated["external_data"]] == [
        "weights/tokenizer.json",  # named differently from the URL's file
        "vocab.txt",  # at the top of data/
    ]
    text = "\n".join(plan.warnings)
    assert "external_data[1]" in text and "'tok.json', not 'tokenizer.json'" in text
    assert "external_data[2]" in text and "top of data/" in text
    assert "/app/data/weights, /app/data/encoder" in text
    (root / "data" / "encoder").mkdir(parents=True)
    (root / "data" / "encoder" / "mine.txt").write_text("x")
    again = yaml.safe_load(plan_migration(root).migrated)
    assert [w["mount_location"] for w in again["weights"]] == ["/app/data/weights"]


def test_model_cache_and_external_data_merge_into_one_weights_block(tmp_path: Path) -> None:
    text = CONFIG + "external_data:\n  - url: https://h/x/a.bin\n    local_data_path: a/a.bin\n"
    plan = plan_migration(project(tmp_path, text))
    migrated = yaml.safe_load(plan.migrated)
    assert [w["mount_location"] for w in migrated["weights"]] == [
        "/app/model_cache/llama", "/app/model_cache/emb", "/app/data/a",
    ]  # fmt: skip
    assert "external_data" not in migrated and "model_cache" not in migrated
    (tmp_path / "config.yaml").write_text(plan.migrated)
    assert len(load_config(tmp_path).config.weights or []) == 3
