"""How the model server reads the environment it serves (``kingpost.server.environment``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kingpost.server.environment import EnvironmentWatch, poll_interval


def _replace(directory: Path, text: str) -> None:
    """As the control plane does: a new file renamed over the old one."""
    tmp = directory / ".environment.tmp"
    tmp.write_text(text)
    os.replace(tmp, directory / "environment")


def test_the_file_wins_over_the_variable_and_changes_are_seen_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("KINGPOST_ENVIRONMENT", json.dumps({"name": "at-start"}))
    _replace(tmp_path, json.dumps({"name": "staging"}))
    watch = EnvironmentWatch(str(tmp_path))
    assert watch.initial() == {"name": "staging"}
    assert watch.poll() is None  # nothing new since
    _replace(tmp_path, json.dumps({"name": "production"}))
    assert watch.poll() == {"name": "production"}
    assert watch.poll() is None
    _replace(tmp_path, "")  # left every environment: nothing to tell
    assert watch.poll() is None
    _replace(tmp_path, "{not json")
    assert watch.poll() is None
    assert "not JSON" in caplog.text
    _replace(tmp_path, json.dumps({"name": "production"}))  # replaced again, same text
    assert watch.poll() == {"name": "production"}  # the caller compares with what it told


def test_without_the_file_the_variable_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KINGPOST_ENVIRONMENT", json.dumps({"name": "at-start"}))
    assert EnvironmentWatch(str(tmp_path)).initial() == {"name": "at-start"}
    _replace(tmp_path, "")
    assert EnvironmentWatch(str(tmp_path)).initial() == {"name": "at-start"}
    monkeypatch.delenv("KINGPOST_ENVIRONMENT")
    monkeypatch.delenv("KINGPOST_DYNAMIC_CONFIG_DIR", raising=False)
    none = EnvironmentWatch()
    assert none.path is None and none.initial() is None and none.poll() is None


def test_poll_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KINGPOST_ENVIRONMENT_POLL_S", raising=False)
    assert poll_interval() == 5.0
    monkeypatch.setenv("KINGPOST_ENVIRONMENT_POLL_S", "0.25")
    assert poll_interval() == 0.25
    for bad in ("soon", "0", "-1"):
        monkeypatch.setenv("KINGPOST_ENVIRONMENT_POLL_S", bad)
        assert poll_interval() == 5.0
