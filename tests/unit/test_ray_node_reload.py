"""A Ray node's side of an in-place reload (``ReplicaHost.reload``): the changed files
reach the replica's process engine as a directory on the node; a path that leaves the
project is refused before anything is written. The engine is a recording stand-in (this
tests the seam between the actor and its engine; the whole path runs on a real cluster
in tests/integration/test_ray_engine.py)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from kingpost.engines._ray_node import ReplicaHost
from kingpost.engines.base import Reload


class _Engine:
    def __init__(self, answer: Reload | None) -> None:
        self.answer = answer
        self.seen: list[tuple[str, dict[str, bytes], list[str]]] = []

    def reload(
        self, replica_id: str, source: Path, changed: Sequence[str], removed: Sequence[str]
    ) -> Reload | None:
        files = {rel: (source / rel).read_bytes() for rel in changed}
        self.seen.append((replica_id, files, list(removed)))
        return self.answer


def _host(tmp_path: Path, engine: Any) -> ReplicaHost:
    host = ReplicaHost.__new__(ReplicaHost)  # no Ray runtime: only what reload uses
    host._engine = engine
    host._node_home = tmp_path
    host._plan = type("Plan", (), {"spec": type("Spec", (), {"replica_id": "r1"})()})()  # type: ignore[assignment]
    return host


def test_the_files_reach_the_engine_and_its_answer_comes_back(tmp_path: Path) -> None:
    engine = _Engine(Reload(False, "boom", "Traceback ..."))
    host = _host(tmp_path, engine)
    files = {"model/model.py": b"VALUE = 2\n", "data/new.txt": b"x"}

    answer = host.reload(files, ["old.txt"])

    assert answer == {"ok": False, "error": "boom", "traceback": "Traceback ..."}
    assert engine.seen == [("r1", files, ["old.txt"])]
    assert [p.name for p in tmp_path.iterdir()] == []  # the files' directory is gone


@pytest.mark.parametrize("bad", ["/etc/passwd", "../escape.py", "model/../../x", ""])
def test_a_path_outside_the_project_is_refused(tmp_path: Path, bad: str) -> None:
    engine = _Engine(Reload(True))
    with pytest.raises(ValueError, match="not a path inside the project"):
        _host(tmp_path, engine).reload({bad: b"x"}, [])
    with pytest.raises(ValueError, match="not a path inside the project"):
        _host(tmp_path, engine).reload({}, [bad])
    assert engine.seen == []


def test_no_replica_yet_means_no_reload(tmp_path: Path) -> None:
    assert _host(tmp_path, None).reload({"model/model.py": b""}, []) is None
