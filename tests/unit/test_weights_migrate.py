from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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


def test_nothing_to_migrate(tmp_path: Path) -> None:
    plan = plan_migration(project(tmp_path, "model_name: plain\n"))
    assert not plan.changed
