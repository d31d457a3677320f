"""A Ray node's cache: claims by live processes keep what they name; what nobody claims
goes once unused for the keep period (``engines/_node_cache.py``), on real files and
real processes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from helpers.records import recorded_sleeper
from kingpost.engines._node_cache import Claim, NodeCache
from kingpost.engines._records import records_dir
from kingpost.envs.builder import READY_MARKER
from kingpost.gateway_process import start_ticks
from kingpost.weights.blobs import BlobStore, Manifest

OLD = time.time() - 7200


def _age(path: Path, when: float = OLD) -> Path:
    os.utime(path, (when, when))
    return path


def _project(cache: NodeCache, name: str) -> Path:
    path = cache.projects / name
    (path / "model").mkdir(parents=True)
    (path / "model" / "model.py").write_text("class Model: ...\n")
    return _age(path)


def _environment(cache: NodeCache, name: str) -> Path:
    path = cache.envs / name
    path.mkdir(parents=True)
    (path / READY_MARKER).write_text("{}")
    _age(path / READY_MARKER)
    return path


def _weights(cache: NodeCache, name: str, content: bytes) -> tuple[Manifest, str]:
    store = BlobStore(cache.weights)
    digest = hashlib.sha256(content).hexdigest()
    with store.writer() as (fh, tmp):
        fh.write(content)
        fh.close()
        store.commit(tmp, len(content), digest)
    _age(store.blob_path(digest))
    manifest = Manifest(name, "file:///w", "", {"w.bin": (digest, len(content))})
    _age(store.tree(manifest))
    return manifest, digest


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _claim_as(
    cache: NodeCache, replica_id: str, pid: int, started: int | None, **what: object
) -> None:
    cache.uses.mkdir(parents=True, exist_ok=True)
    record = {"pid": pid, "started": started, "project": "", "environment": None,
              "manifests": [], "blobs": [], **what}  # fmt: skip
    (cache.uses / f"{replica_id}.json").write_text(json.dumps(record))


def test_what_a_live_replica_claims_stays_and_the_rest_goes(tmp_path: Path) -> None:
    cache = NodeCache(tmp_path)
    _project(cache, "p-used")
    _project(cache, "p-old")
    _environment(cache, "a" * 24)
    _environment(cache, "b" * 24)
    used, used_blob = _weights(cache, "m-used", b"used weights")
    _, old_blob = _weights(cache, "m-old", b"old weights")
    for rid in ("r-live", "r-gone"):
        (cache.replicas / rid).mkdir(parents=True)
    cache.claim("r-live", Claim("p-used", "a" * 24, (used.id,), (used_blob,)))

    report = cache.collect(keep_s=60)

    assert sorted(report.removed) == sorted([
        "project/p-old", f"environment/{'b' * 24}", "weights/m-old", f"blob/{old_blob}",
        "replica/r-gone",
    ])  # fmt: skip
    assert (cache.projects / "p-used").is_dir()
    assert (cache.envs / ("a" * 24)).is_dir()
    assert (cache.weights / "trees" / "m-used" / "w.bin").read_bytes() == b"used weights"
    assert (cache.replicas / "r-live").is_dir()
    assert report.removed_bytes >= len(b"old weights")
    assert "1 project" in report.summary() and "1 blob" in report.summary()


def test_a_claim_marks_its_things_used_and_recent_things_are_kept(tmp_path: Path) -> None:
    cache = NodeCache(tmp_path)
    _project(cache, "p")
    _weights(cache, "m", b"w")
    cache.claim("r", Claim("p", None, ("m",)))
    cache.release("r")  # no live claim now, but used just now

    assert cache.collect(keep_s=60).removed == []
    assert (cache.projects / "p").is_dir() and (cache.weights / "trees" / "m").is_dir()
    # Once the keep period is over they go, the blob with its last tree.
    later = cache.collect(keep_s=60, now=time.time() + 120)
    assert sorted(r.split("/")[0] for r in later.removed) == ["blob", "project", "weights"]


def test_claims_of_dead_processes_are_stale_and_keep_things_only_for_the_keep_period(
    tmp_path: Path,
) -> None:
    cache = NodeCache(tmp_path)
    _project(cache, "p-dead")
    _project(cache, "p-reused")
    _claim_as(cache, "r-dead", _dead_pid(), 1, project="p-dead")
    # A live pid whose start time is not the claimer's: the pid was reused.
    me = os.getpid()
    _claim_as(cache, "r-reused", me, (start_ticks(me) or 0) + 1, project="p-reused")
    (cache.uses / "r-garbled.json").write_text('{"pid": "x"}')

    assert cache.live_claims() == {}
    report = cache.collect(keep_s=60)

    # Their replicas ended, as far as the node knows, now: the keep period starts.
    assert sorted(report.removed) == ["claim/r-dead", "claim/r-garbled", "claim/r-reused"]
    assert list(cache.uses.iterdir()) == []
    later = cache.collect(keep_s=60, now=time.time() + 120)
    assert sorted(later.removed) == ["project/p-dead", "project/p-reused"]


def test_the_keep_period_counts_from_the_release(tmp_path: Path) -> None:
    """A replica that ran longer than the keep period: what it used is kept for the keep
    period after it stops, not removed at once."""
    cache = NodeCache(tmp_path)
    _project(cache, "p")
    cache.claim("r", Claim("p"))
    _age(cache.projects / "p")  # claimed two hours ago, say
    cache.release("r")

    assert cache.collect(keep_s=60).removed == []
    assert cache.collect(keep_s=60, now=time.time() + 120).removed == ["project/p"]


def test_a_claim_by_another_live_process_keeps_its_things(tmp_path: Path) -> None:
    cache = NodeCache(tmp_path)
    _project(cache, "p")
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _claim_as(cache, "r", proc.pid, start_ticks(proc.pid), project="p")
        assert set(cache.live_claims()) == {"r"}
        assert cache.collect(keep_s=0).removed == []  # claimed: kept however old
    finally:
        proc.kill()
        proc.wait()
    assert cache.collect(keep_s=60).removed == ["claim/r"]  # its end, marked now
    assert cache.collect(keep_s=60, now=time.time() + 120).removed == ["project/p"]


def test_a_blob_another_tree_links_stays_when_one_tree_goes(tmp_path: Path) -> None:
    cache = NodeCache(tmp_path)
    _, digest = _weights(cache, "m-a", b"shared")
    b = Manifest("m-b", "file:///w", "", {"other.bin": (digest, len(b"shared"))})
    _age(BlobStore(cache.weights).tree(b))
    cache.claim("r", Claim(manifests=("m-b",)))

    report = cache.collect(keep_s=0)

    assert report.removed == ["weights/m-a"]
    assert (cache.weights / "trees" / "m-b" / "other.bin").read_bytes() == b"shared"


def test_a_half_made_project_goes_only_when_old(tmp_path: Path) -> None:
    cache = NodeCache(tmp_path)
    fresh = cache.projects / ".p.123.456"
    stale = cache.projects / ".q.789.1"
    fresh.mkdir(parents=True)
    stale.mkdir()
    _age(stale, time.time() - 2 * 3600)

    assert cache.collect(keep_s=0).removed == ["project/.q.789.1"]
    assert fresh.is_dir()


def test_an_empty_node_directory_collects_nothing(tmp_path: Path) -> None:
    report = NodeCache(tmp_path / "never-used").collect(keep_s=0)
    assert report.removed == [] and report.summary() == "node cache: removed nothing (0 bytes)"


def test_a_replica_left_running_by_a_dead_actor_is_stopped_with_its_home(
    tmp_path: Path,
) -> None:
    """A Ray worker killed leaves the replica it ran (its own session): the node stops it,
    from the process engine's record in the replica's home, and removes the home."""
    cache = NodeCache(tmp_path)
    home = cache.replicas / "r-orphan"
    orphan = recorded_sleeper(records_dir(home / "run"), "r-orphan")
    try:
        _claim_as(cache, "r-orphan", _dead_pid(), 1)

        report = cache.collect(keep_s=3600)

        assert sorted(report.removed) == ["claim/r-orphan", "process/r-orphan",
                                          "replica/r-orphan"]  # fmt: skip
        assert orphan.wait(timeout=10) == -15  # SIGTERM, within the grace
        assert not home.exists()
    finally:
        orphan.kill()
        orphan.wait()


def test_directories_of_nodes_gone_from_the_cluster_are_swept(tmp_path: Path) -> None:
    """Ray gives a restarted node a new id: its earlier directory is removed (a replica
    still recorded there stopped first); live nodes' directories stay."""
    here, live, gone = (NodeCache(tmp_path / name) for name in ("n-here", "n-live", "n-gone"))
    for cache in (here, live, gone):
        _project(cache, "p")
    (tmp_path / ".trash-n-older-1a2b3c4d" / "projects").mkdir(parents=True)  # cut short
    (tmp_path / ".not-a-node").mkdir()
    orphan = recorded_sleeper(records_dir(gone.replicas / "r-old" / "run"), "r-old")
    try:
        report = here.sweep_dead(alive={"n-here", "n-live"})

        assert sorted(report.removed) == ["node/.trash-n-older-1a2b3c4d", "node/n-gone",
                                          "process/r-old"]  # fmt: skip
        assert orphan.wait(timeout=10) == -15
        assert sorted(p.name for p in tmp_path.iterdir()) == [".not-a-node", "n-here", "n-live"]
    finally:
        orphan.kill()
        orphan.wait()


def test_an_environment_being_built_is_left_for_later_not_waited_for(tmp_path: Path) -> None:
    """The node's claims wait on the collection's lock: the collection must not wait for
    an environment's build (whose lock another holder has) under it."""
    from kingpost._filelock import locked

    cache = NodeCache(tmp_path)
    env = _environment(cache, "c" * 24)
    with locked(cache.envs / f".{env.name}.lock"):  # a build of it in progress
        assert cache.collect(keep_s=60).removed == []
    assert cache.collect(keep_s=60).removed == [f"environment/{env.name}"]


def test_what_a_dead_actor_left_in_the_weights_tmp_goes_when_old(tmp_path: Path) -> None:
    cache = NodeCache(tmp_path)
    _weights(cache, "m", b"w")
    tmp = cache.weights / "tmp"
    old_fetch, fresh_fetch = tmp / "blob-abandoned", tmp / "blob-in-progress"
    old_fetch.write_bytes(b"x" * 10)
    fresh_fetch.write_bytes(b"y")
    old_trash = tmp / ".trash-m2-1a2b3c4d"
    (old_trash / "sub").mkdir(parents=True)
    os.chmod(old_trash / "sub", 0o555)  # as a mount tree's directories are
    _age(old_fetch, time.time() - 2 * 3600)
    _age(old_trash, time.time() - 2 * 3600)
    cache.claim("r", Claim(manifests=("m",)))

    report = cache.collect(keep_s=60)

    assert report.removed == [] and report.removed_bytes == 10
    assert sorted(p.name for p in tmp.iterdir()) == ["blob-in-progress"]
