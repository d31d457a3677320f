"""Patching a replica's project in place (``engines/_reload.Patch``): undoable, and
confined to the project even when the replica's user planted links in it."""

from __future__ import annotations

from pathlib import Path

import pytest

from kingpost.engines._reload import Patch


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_a_patch_writes_removes_and_undoes(tmp_path: Path) -> None:
    app = _tree(tmp_path / "app", {"model/model.py": "v1", "data/old.txt": "old",
                                   "model/__pycache__/model.cpython-311.pyc": "stale"})  # fmt: skip
    new = _tree(tmp_path / "new", {"model/model.py": "v2", "sub/dir/new.txt": "n"})
    patch = Patch(app, None)
    patch.apply(new, ["model/model.py", "sub/dir/new.txt"], ["data/old.txt"])
    assert (app / "model/model.py").read_text() == "v2"
    assert (app / "sub/dir/new.txt").read_text() == "n"
    assert not (app / "data/old.txt").exists()
    assert not list((app / "model/__pycache__").iterdir())  # the next import compiles
    patch.undo()
    assert (app / "model/model.py").read_text() == "v1"
    assert (app / "data/old.txt").read_text() == "old"
    assert not (app / "sub/dir/new.txt").exists()


@pytest.mark.parametrize("link", ["model", "model/model.py"])
def test_a_link_planted_in_the_project_is_never_followed(tmp_path: Path, link: str) -> None:
    """The server's user can change its project; root patching it must not read or write
    through a link it put there (``model`` -> a host directory, or the file itself ->
    a host file)."""
    outside = _tree(tmp_path / "host", {"model.py": "host file"})
    app = _tree(tmp_path / "app", {"config.yaml": "x"})
    if link != "model":
        (app / "model").mkdir()
    target = outside if link == "model" else outside / "model.py"
    (app / link).symlink_to(target)
    new = _tree(tmp_path / "new", {"model/model.py": "from the user"})
    with pytest.raises(OSError, match="model"):
        Patch(app, None).apply(new, ["model/model.py"], [])
    assert (outside / "model.py").read_text() == "host file"
    with pytest.raises(OSError, match="not a path inside"):
        Patch(app, None).apply(new, ["../host/model.py"], [])
    assert (outside / "model.py").read_text() == "host file"
