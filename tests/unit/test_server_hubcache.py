"""A ``use_volume: false`` Hub repository is found in the Hub cache, as in Truss's image."""

from __future__ import annotations

from pathlib import Path

import pytest

from kingpost.server.hubcache import hub_cache_dir, link_hub_snapshots

COMMIT = "4c7798256a4a6d577738150840c8f728361496d6"
V1 = {"model_cache": [{"repo_id": "julien-c/EsperBERTo-small", "use_volume": False}]}


def mounted(app: Path) -> Path:
    """The mirrored snapshot as the engines mount it (here a plain directory)."""
    snapshot = app / "model_cache/.hub/models--julien-c--EsperBERTo-small/snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text('{"model_type": "roberta"}')
    return snapshot


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"HOME": "/h"}, "/h/.cache/huggingface/hub"),
        ({"HOME": "/h", "XDG_CACHE_HOME": "/x"}, "/x/huggingface/hub"),
        ({"HOME": "/h", "HF_HOME": "/hf"}, "/hf/hub"),
        ({"HOME": "/h", "HF_HOME": "/hf", "HF_HUB_CACHE": "/c"}, "/c"),
    ],
)
def test_the_cache_is_where_a_hub_client_looks(env: dict[str, str], expected: str) -> None:
    assert hub_cache_dir(env) == Path(expected)


def test_the_real_client_finds_the_files_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hf = pytest.importorskip("huggingface_hub")
    mounted(tmp_path / "app")
    cache = tmp_path / "hub-cache"
    assert link_hub_snapshots(tmp_path / "app", V1, {"HF_HUB_CACHE": str(cache)}) == 1
    assert link_hub_snapshots(tmp_path / "app", V1, {"HF_HUB_CACHE": str(cache)}) == 1  # again
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = hf.hf_hub_download("julien-c/EsperBERTo-small", "config.json", cache_dir=str(cache))
    assert Path(path).read_text() == '{"model_type": "roberta"}'
    assert (cache / "models--julien-c--EsperBERTo-small/refs/main").read_text() == COMMIT


def test_volumes_and_missing_snapshots_link_nothing(tmp_path: Path) -> None:
    env = {"HF_HUB_CACHE": str(tmp_path / "c")}
    assert link_hub_snapshots(tmp_path / "app", V1, env) == 0  # not mounted: logged
    v2 = {"model_cache": [{"repo_id": "a/b", "use_volume": True, "volume_folder": "b"}]}
    mounted(tmp_path / "app")
    assert link_hub_snapshots(tmp_path / "app", v2, env) == 0
    assert link_hub_snapshots(tmp_path / "app", {}, env) == 0
