"""The disk collector's decisions, table-tested; then its effect on a real directory tree."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kingpost.housekeeping import DiskEntry, collect_disk, plan_collection

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
    ],
    ids=["in-use", "unused-old", "unused-fresh", "uploads", "deleted-old", "deleted-fresh",
         "running-stray", "keep-newest"],
)  # fmt: skip
def test_what_is_removed(entries: list[DiskEntry], removed: set[str]) -> None:
    decided = plan_collection(
        entries,
        projects_in_use={"aaa"},
        live_deployments={"live"},
        running_replicas={"gone-run01", "live-run02"},
        now=NOW,
    )
    assert _names(decided) == removed


def test_a_replica_directory_belongs_to_the_deployment_before_its_last_dash() -> None:
    """Deployment ids are prefixes of replica ids: `live` must not claim `liver-xxxxx`."""
    entries = [DiskEntry("replica", "liver-abcde", OLD)]
    decided = plan_collection(
        entries, projects_in_use=(), live_deployments={"live"}, running_replicas=(), now=NOW
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
