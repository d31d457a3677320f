from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from kingpost.errors import ValidationError
from kingpost.packaging import pack_project, project_files, unpack_project


def make_project(root: Path) -> None:
    (root / "data").mkdir(parents=True)
    (root / "config.yaml").write_text("model_name: x\n")
    (root / "server.py").write_text("print('hi')\n")
    (root / "data" / "a.bin").write_bytes(b"\x00" * 10)
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref")
    (root / "secret.env").write_text("X=1")
    (root / "logs").mkdir()
    (root / "logs" / "x.log").write_text("...")
    (root / ".gitignore").write_text("*.env\n")
    (root / ".truss_ignore").write_text("logs/\n")


def test_ignores_git_gitignore_and_truss_ignore(tmp_path: Path) -> None:
    make_project(tmp_path)
    names = [p.as_posix() for p in project_files(tmp_path)]
    assert names == [".gitignore", ".truss_ignore", "config.yaml", "data/a.bin", "server.py"]


def test_archive_is_deterministic_and_round_trips(tmp_path: Path) -> None:
    make_project(tmp_path / "p")
    a, b = pack_project(tmp_path / "p"), pack_project(tmp_path / "p")
    assert a.sha256 == b.sha256 and len(a.sha256) == 64
    (tmp_path / "p" / "server.py").write_text("print('changed')\n")
    assert pack_project(tmp_path / "p").sha256 != a.sha256
    unpack_project(a.data, tmp_path / "out")
    assert (tmp_path / "out" / "server.py").read_text() == "print('hi')\n"
    assert not (tmp_path / "out" / ".git").exists()


def test_refuses_dir_without_config(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=r"no config\.yaml"):
        pack_project(tmp_path)


def test_unpack_refuses_path_traversal(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(ValidationError, match="cannot unpack"):
        unpack_project(buf.getvalue(), tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()
