"""Truss's ``lazy_data_resolver``: what it returns, and the load it fails when not called."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from kingpost.server.config import load_server_config
from kingpost.server.model import ModelHost, Status
from kingpost.server.secrets import LazyDataResolver, Secrets, uses_volume_cache

V2_CACHE = (
    "model_cache:\n  - repo_id: org/model\n    revision: main\n    volume_folder: m\n"
    "    use_volume: true\n"
)
V1_CACHE = "model_cache:\n  - repo_id: org/model\n    use_volume: false\n"


def test_without_a_volume_cache_it_returns_nothing_and_asks_nothing(tmp_path: Path) -> None:
    resolver = LazyDataResolver(tmp_path, volume_cache=False)
    resolver.raise_if_not_collected()
    assert resolver.block_until_download_complete() == ""


def test_with_a_volume_cache_it_must_be_called(tmp_path: Path) -> None:
    resolver = LazyDataResolver(tmp_path / "data", volume_cache=True)
    with pytest.raises(RuntimeError, match="block_until_download_complete"):
        resolver.raise_if_not_collected()
    assert resolver.block_until_download_complete() == str(tmp_path / "data")
    resolver.raise_if_not_collected()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({}, False),
        ({"model_cache": [{"repo_id": "a/b", "use_volume": False}]}, False),
        ({"model_cache": [{"repo_id": "a/b", "use_volume": True}]}, True),
        ({"hf_cache": [{"repo_id": "a/b", "use_volume": True}]}, True),
        ({"model_cache": None}, False),
    ],
)
def test_which_configs_use_a_volume_cache(raw: dict[str, object], expected: bool) -> None:
    assert uses_volume_cache(raw) is expected


def _host(tmp_path: Path, name: str, cache: str, calls: bool) -> ModelHost:
    """A project whose model keeps the resolver and calls it in load() or not."""
    app = tmp_path / name
    (app / name).mkdir(parents=True)
    call = "        self._r.block_until_download_complete()\n" if calls else ""
    (app / name / "model.py").write_text(
        "class Model:\n"
        "    def __init__(self, **kwargs):\n"
        "        self._r = kwargs['lazy_data_resolver']\n"
        "    def load(self):\n"
        f"{call}"
        "        pass\n"
        "    def predict(self, x):\n"
        "        return x\n"
    )
    (app / "config.yaml").write_text(f"model_module_dir: {name}\n{cache}")
    config = load_server_config(app, validate=False)
    return ModelHost(config, Secrets({}, app))


@pytest.mark.parametrize(
    ("name", "cache", "calls", "loads"),
    [
        ("kp_lazy_v2_called", V2_CACHE, True, True),
        ("kp_lazy_v2_not_called", V2_CACHE, False, False),
        ("kp_lazy_v1_not_called", V1_CACHE, False, True),
        ("kp_lazy_none", "", False, True),
    ],
)
def test_a_volume_cache_model_that_never_collects_fails_its_load_as_in_truss(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, cache: str, calls: bool,
    loads: bool,
) -> None:  # fmt: skip
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("NUM_LOAD_RETRIES_TRUSS", "0")
    host = _host(tmp_path, name, cache, calls)
    if loads:
        host.load_blocking(lambda coro: None)
        assert host.status == Status.READY
    else:
        with pytest.raises(RuntimeError, match="block_until_download_complete"):
            host.load_blocking(lambda coro: None)
