"""What a change to a development deployment's project calls for: a reload in place, or
a new replica (``kingpost.controller.devloop``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kingpost.controller.devloop import diff_projects, swap_reason


def test_diff_names_changed_added_and_removed_files(tmp_path: Path) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    for root in (old, new):
        (root / "model").mkdir(parents=True)
        (root / "config.yaml").write_text("model_name: m\n")
    (old / "model" / "model.py").write_text("A = 1\n")
    (new / "model" / "model.py").write_text("A = 2\n")
    (old / "gone.txt").write_text("x")
    (new / "data").mkdir()
    (new / "data" / "new.bin").write_bytes(b"\0")
    assert diff_projects(old, new) == (["data/new.bin", "model/model.py"], ["gone.txt"])
    assert diff_projects(old, old) == ([], [])


@pytest.mark.parametrize(
    ("old", "new", "env", "reason"),
    [
        ({"model_name": "m"}, {"model_name": "m"}, ("e", "e"), ""),
        ({"model_metadata": {"a": 1}}, {"model_metadata": {"a": 2}}, ("e", "e"), ""),
        ({"description": "x"}, {}, ("e", "e"), ""),
        ({}, {"requirements": ["six"]}, ("e", "e"), "config.yaml changed: requirements"),
        (
            {"system_packages": ["a"], "base_image": {"image": "x"}},
            {"system_packages": ["b"], "base_image": {"image": "y"}},
            ("e", "e"),
            "config.yaml changed: base_image, system_packages",
        ),
        ({"docker_server": {"a": 1}}, {}, ("e", "e"), "config.yaml changed: docker_server"),
        (
            {"weights": []},
            {"weights": [{"source": "s"}]},
            ("e", "e"),
            "config.yaml changed: weights",
        ),
        ({}, {}, ("e", "f"), "the Python environment changed (requirements)"),
    ],
)
def test_swap_reason(
    old: dict[str, object], new: dict[str, object], env: tuple[str, str], reason: str
) -> None:
    assert swap_reason(old, new, *env) == reason
