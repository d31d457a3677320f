"""The disk collector's decisions, table-tested; then its effect on a real directory tree."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from kingpost.housekeeping import (
    REPLICA_GRACE_S,
    UPLOAD_GRACE_S,
    DiskEntry,
    collect_disk,
    plan_collection,
    scan,
)

NOW = 100_000.0
OLD = NOW - 7200  # older than every grace
FRESH = NOW - 10


def _names(removed: list[DiskEntry]) -> set[str]:
    return {f"{e.kind}/{e.name}" for e in removed}


@pytest.mark.parametrize(
    ("entries", "removed"),
    [
        # a project a live deployment uses stays, however old
        ([DiskEntry("project", "aaa", OLD)], set()),
        # one nothing uses goes once past the upload grace, not before
        ([DiskEntry("project", "bbb", OLD)], {"project/bbb"}),
        ([DiskEntry("project", "bbb", FRESH)], set()),
        # a dead upload's spool file and unpack temp dir
        ([DiskEntry("upload", ".upload-x", OLD), DiskEntry("upload", "c.tmp-1", FRESH)],
         {"upload/.upload-x"}),
        # replicas of a deleted deployment go (past the replica grace)
        ([DiskEntry("replica", "gone-abcde", OLD)], {"replica/gone-abcde"}),
        ([DiskEntry("replica", "gone-abcde", FRESH)], set()),
        # a running replica stays even when its deployment is unknown (a stray being stopped)
        ([DiskEntry("replica", "gone-run01", OLD)], set()),
        # a live deployment keeps its 3 newest stopped replicas, and the running one
        ([DiskEntry("replica", f"live-{i:05d}", OLD - i) for i in range(6)]
         + [DiskEntry("replica", "live-run02", OLD - 100)],
         {"replica/live-00003", "replica/live-00004", "replica/live-00005"}),
        # each live deployment keeps its own newest stopped ones
        ([DiskEntry("replica", f"{d}-{i:05d}", OLD - i)
          for d in ("live", "also") for i in range(3)], set()),
        # the graces end after exactly their length, not at it
        ([DiskEntry("project", "bbb", NOW - UPLOAD_GRACE_S)], set()),
        ([DiskEntry("replica", "gone-abcde", NOW - REPLICA_GRACE_S)], set()),
        # an entry that stays does not end the walk: the ones after it are still decided
        ([DiskEntry("replica", "gone-run01", OLD), DiskEntry("replica", "gone-abcde", OLD),
          DiskEntry("project", "bbb", OLD)],
         {"replica/gone-abcde", "project/bbb"}),
    ],
    ids=["in-use", "unused-old", "unused-fresh", "uploads", "deleted-old", "deleted-fresh",
         "running-stray", "keep-newest", "keep-per-deployment", "upload-grace-edge",
         "replica-grace-edge", "walk-goes-on"],
)  # fmt: skip
def test_what_is_removed(entries: list[DiskEntry], removed: set[str]) -> None:
    decided = plan_collection(
        entries,
        projects_in_use={"aaa"},
        live_deployments={"live", "also"},
        running_replicas={"gone-run01", "live-run02"},
        now=NOW,
    )
    assert _names(decided) == removed


def test_a_replica_directory_belongs_to_the_deployment_before_its_last_dash() -> None:
    """Deployment ids are prefixes of replica ids: `live` must not claim `liver-xxxxx`."""
    entries = [DiskEntry("replica", "liver-abcde", OLD), DiskEntry("replica", "live-x-abcde", OLD)]
    decided = plan_collection(
        entries, projects_in_use=(), live_deployments={"live-x"}, running_replicas=(), now=NOW
    )
    assert _names(decided) == {"replica/liver-abcde"}


def _age(path: Path, when: float) -> None:
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.utime(os.path.join(root, name), (when, when))
    os.utime(path, (when, when))


def test_collect_removes_files_and_counts_bytes(tmp_path: Path) -> None:
    projects, replicas = tmp_path / "projects", tmp_path / "replicas"
    for d in (projects / "used", projects / "unused", replicas / "live-aaaaa", replicas / "x-b"):
        d.mkdir(parents=True)
        (d / "output.log").write_bytes(b"x" * 1000)
        _age(d, OLD)
    (replicas / "x-b" / "output.log").touch()  # written just now: still draining
    os.utime(replicas / "x-b" / "output.log", (FRESH, FRESH))
    report = collect_disk(
        projects, replicas,
        projects_in_use={"used"}, live_deployments={"live"}, running_replicas=(), now=NOW,
    )  # fmt: skip
    assert report.removed == ("project/unused",)
    assert report.removed_bytes == 1000 and report.kept == 3 and not report.errors
    assert sorted(p.name for p in projects.iterdir()) == ["used"]
    assert (replicas / "x-b").is_dir()


def _tree(root: Path, files: dict[str, int], when: float = OLD) -> None:
    """Files of the given sizes under root (paths with `/` make directories), all aged."""
    for name, size in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x" * size)
    _age(root, when)


def test_scan_tells_projects_uploads_and_replicas_apart(tmp_path: Path) -> None:
    projects, replicas = tmp_path / "projects", tmp_path / "replicas"
    _tree(projects, {"sha1/config.yaml": 1, ".upload-x": 1, "c.tmp-1/f": 1, "d.TMP-1/f": 1})
    (projects / "dangling").symlink_to(tmp_path / "nowhere")
    os.utime(projects / "dangling", (OLD - 5, OLD - 5), follow_symlinks=False)
    _tree(replicas, {"live-aaaaa/output.log": 1, "live-bbbbb/model.py": 1})
    os.utime(replicas / "live-aaaaa" / "output.log", (FRESH, FRESH))
    found = {(e.kind, e.name): e.mtime for e in scan(projects, replicas)}
    assert found == {
        ("project", "sha1"): OLD,
        ("upload", ".upload-x"): OLD,  # a spool file of an upload under way
        ("upload", "c.tmp-1"): OLD,  # an unpack under way
        ("project", "d.TMP-1"): OLD,
        ("project", "dangling"): OLD - 5,  # the link itself, not what it points to
        ("replica", "live-aaaaa"): FRESH,  # its log's last write, newer than the directory
        ("replica", "live-bbbbb"): OLD,  # no log yet: the directory's own time
    }


def test_scan_of_directories_not_made_yet_finds_nothing(tmp_path: Path) -> None:
    assert scan(tmp_path / "projects", tmp_path / "replicas") == []


def test_collect_removes_each_kind_from_its_own_directory(tmp_path: Path) -> None:
    projects, replicas, outside = tmp_path / "projects", tmp_path / "replicas", tmp_path / "out"
    _tree(projects, {"unused/a": 1000, "unused/sub/b": 500, ".upload-x": 200, "used/a": 7})
    _tree(outside, {"keep": 9})
    (projects / "link").symlink_to(outside)
    os.utime(projects / "link", (OLD, OLD), follow_symlinks=False)
    _tree(replicas, {"gone-abcde/output.log": 300, "live-aaaaa/output.log": 1})
    link_bytes = os.lstat(projects / "link").st_size
    report = collect_disk(
        projects, replicas,
        projects_in_use={"used"}, live_deployments={"live"}, running_replicas=(), now=NOW,
    )  # fmt: skip
    assert sorted(report.removed) == [
        "project/link", "project/unused", "replica/gone-abcde", "upload/.upload-x",
    ]  # fmt: skip
    assert report.removed_bytes == 1000 + 500 + 200 + link_bytes + 300
    assert report.kept == 2 and report.errors == ()
    assert sorted(p.name for p in projects.iterdir()) == ["used"]
    assert sorted(p.name for p in replicas.iterdir()) == ["live-aaaaa"]
    # A link is removed as a link: what it points to is not the home's to collect.
    assert (outside / "keep").read_bytes() == b"x" * 9


def test_a_failed_removal_is_reported_and_the_rest_still_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    projects, replicas = tmp_path / "projects", tmp_path / "replicas"
    _tree(projects, {"stuck/a": 1, "vanished/a": 1})
    _tree(replicas, {"gone-abcde/output.log": 1})
    real_rmtree = shutil.rmtree

    def rmtree(path: Path, *args: Any, **kwargs: Any) -> None:
        # Root may remove anything here, so the two failures the collector meets in the
        # field (no permission; another collector got there first) are made at this seam.
        if path.name == "stuck":
            raise PermissionError(13, "Permission denied", str(path))
        if path.name == "vanished":
            raise FileNotFoundError(2, "No such file or directory", str(path))
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    report = collect_disk(
        projects, replicas,
        projects_in_use=(), live_deployments=(), running_replicas=(), now=NOW,
    )  # fmt: skip
    assert report.removed == ("replica/gone-abcde",)
    assert report.errors == (
        f"project/stuck: [Errno 13] Permission denied: '{projects / 'stuck'}'",
    )
    assert report.kept == 2 and report.removed_bytes == 1


def test_a_path_gone_before_it_is_measured_counts_no_bytes(tmp_path: Path) -> None:
    from kingpost._disk import tree_size

    assert tree_size(tmp_path / "gone") == 0
