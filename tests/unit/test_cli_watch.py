"""`kingpost watch`'s polling: what counts as a change of the project."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from kingpost.cli.watch import apply_once, snapshot, watch_loop


def project(tmp_path: Path) -> Path:
    (tmp_path / "model").mkdir()
    (tmp_path / "config.yaml").write_text("model_name: m\n")
    (tmp_path / "model" / "model.py").write_text("A = 1\n")
    (tmp_path / ".gitignore").write_text("scratch/\n*.log\n")
    (tmp_path / "scratch").mkdir()
    return tmp_path


def test_snapshot_leaves_out_what_a_push_ignores(tmp_path: Path) -> None:
    root = project(tmp_path)
    (root / "scratch" / "big.bin").write_bytes(b"x")
    (root / "run.log").write_text("x")
    assert sorted(snapshot(root)) == [".gitignore", "config.yaml", "model/model.py"]


def test_watch_loop_calls_back_for_project_files_only(tmp_path: Path) -> None:
    root = project(tmp_path)
    calls: list[float] = []
    done = threading.Event()

    edited: list[float] = []

    def edit() -> None:
        time.sleep(0.1)
        (root / "run.log").write_text("ignored")
        (root / "scratch" / "x").write_text("ignored")
        time.sleep(0.3)
        edited.append(time.monotonic())
        (root / "model" / "model.py").write_text("A = 22\n")

    threading.Thread(target=edit, daemon=True).start()
    watch_loop(
        root,
        lambda: (calls.append(time.monotonic()), done.set()),
        stop=done.is_set,
        poll_s=0.02,
    )
    # One call, for the project file: the ignored ones before it changed nothing.
    assert len(calls) == 1 and calls[0] >= edited[0]


class _UnreadableProject:
    """A client whose upload meets a project file it cannot read."""

    def upload(self, project_dir: Path) -> str:
        raise PermissionError(13, "Permission denied", str(project_dir / "model" / "model.py"))


def test_a_change_that_cannot_be_read_is_not_applied_and_watching_goes_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = project(tmp_path)
    assert apply_once(_UnreadableProject(), root, "m") is None  # type: ignore[arg-type]
    err = capsys.readouterr().err
    assert "not applied" in err and "Permission denied" in err and "model.py" in err
