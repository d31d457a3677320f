"""Mirroring from real local directories and a real S3-compatible server (moto)."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from helpers.gcsserver import Bucket, Gcs, gcs_server
from helpers.hubserver import Hub, Repo, hub_server
from helpers.platform import wait_for
from kingpost.config import parse_config
from kingpost.config.sources import WeightsSource
from kingpost.errors import WeightsError
from kingpost.weights import MirrorState, MirrorStatus, WeightsManager, validate_weights
from kingpost.weights import manager as manager_module
from kingpost.weights.blobs import BlobStore, Manifest
from kingpost.weights.sources import LocalSource, RemoteFile, S3Source


def entries(text: str) -> list[WeightsSource]:
    return list(parse_config(text).config.weights or [])


def local_repo(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "model.safetensors").write_bytes(os.urandom(300_000))
    (root / "sub" / "shard.safetensors").write_bytes(os.urandom(200_000))
    (root / "README.md").write_text("hello")
    return root


def mirror(mgr: WeightsManager, key: str, text: str, secrets: dict[str, str] | None = None) -> None:
    mgr.start(key, entries(text), secrets or {})
    done = (MirrorState.COMPLETE, MirrorState.FAILED)
    st = wait_for(lambda: (s := mgr.status(key)).state in done and s, 30, f"mirror {key}")
    assert st and st.state == MirrorState.COMPLETE, st


def test_local_mirror_is_a_read_only_hard_link_tree(tmp_path: Path, public_tmp: Path) -> None:
    repo = local_repo(public_tmp / "repo")
    mgr = WeightsManager(tmp_path / "store")
    cfg = f"weights:\n  - source: file://{repo}\n    mount_location: /models/a\n"
    mirror(mgr, "dep1", cfg)
    (mount,) = mgr.mounts("dep1")
    assert mount.mount_location == "/models/a"
    tree = mount.source_dir
    assert sorted(p.relative_to(tree).as_posix() for p in tree.rglob("*") if p.is_file()) == [
        "README.md", "model.safetensors", "sub/shard.safetensors",
    ]  # fmt: skip
    f = tree / "model.safetensors"
    assert f.read_bytes() == (repo / "model.safetensors").read_bytes()
    assert f.stat().st_nlink >= 2 and f.stat().st_mode & 0o777 == 0o444
    assert tree.stat().st_mode & 0o777 == 0o555
    status = mgr.status("dep1")
    assert (status.files_done, status.files_total) == (3, 3)
    assert status.bytes_total == 500_005


def test_patterns_and_dedup_across_models(tmp_path: Path, public_tmp: Path) -> None:
    repo = local_repo(public_tmp / "repo")
    mgr = WeightsManager(tmp_path / "store")
    base = f"weights:\n  - source: file://{repo}\n    mount_location: /models/m\n"
    top = base + "    allow_patterns: ['*.safetensors']\n"
    deep = base + "    allow_patterns: ['**/*.safetensors']\n"
    mirror(mgr, "a", top)
    mirror(mgr, "b", deep)
    (ta,), (tb,) = mgr.mounts("a"), mgr.mounts("b")
    assert [p.name for p in ta.source_dir.rglob("*") if p.is_file()] == ["model.safetensors"]
    assert sorted(p.name for p in tb.source_dir.rglob("*") if p.is_file()) == [
        "model.safetensors", "shard.safetensors",
    ]  # fmt: skip
    blobs = list((tmp_path / "store" / "blobs").glob("*/*"))
    assert len(blobs) == 2  # the shared file is stored once
    assert (ta.source_dir / "model.safetensors").stat().st_ino == (
        tb.source_dir / "model.safetensors"
    ).stat().st_ino
    assert mgr.status("b").bytes_done == 500_000


def test_pins_survive_a_restart_and_new_files_are_not_seen(
    tmp_path: Path, public_tmp: Path
) -> None:
    repo = local_repo(public_tmp / "repo")
    cfg = f"weights:\n  - source: file://{repo}\n    mount_location: /models/m\n"
    mirror(WeightsManager(tmp_path / "store"), "dep", cfg)
    (repo / "late.bin").write_bytes(b"new")
    again = WeightsManager(tmp_path / "store")  # a restarted control plane
    mirror(again, "dep", cfg)
    (mount,) = again.mounts("dep")
    assert not (mount.source_dir / "late.bin").exists()
    mirror(again, "new-deploy", cfg)  # a new deployment resolves again
    (fresh,) = again.mounts("new-deploy")
    assert (fresh.source_dir / "late.bin").read_bytes() == b"new"


def test_a_pin_or_manifest_torn_by_a_crash_is_resolved_again(
    tmp_path: Path, public_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A crash mid-write used to leave a pin that failed every later attempt with a bare
    JSONDecodeError; an unreadable pin or manifest now counts as absent, named in a warning."""
    repo = local_repo(public_tmp / "repo")
    cfg = f"weights:\n  - source: file://{repo}\n    mount_location: /models/m\n"
    store = tmp_path / "store"
    (store / "pins").mkdir(parents=True)
    (store / "pins" / "dep.json").write_text('["ab12')  # torn mid-write
    mirror(WeightsManager(store), "dep", cfg)
    assert "pins/dep.json" in caplog.text
    pinned = BlobStore(store).pinned("dep")
    assert pinned and len(pinned) == 1
    (store / "manifests" / f"{pinned[0]}.json").write_text('{"source": ')  # torn too
    again = WeightsManager(store)  # a restarted control plane
    mirror(again, "dep", cfg)
    (mount,) = again.mounts("dep")
    assert (mount.source_dir / "README.md").read_text() == "hello"
    assert f"manifests/{pinned[0]}.json" in caplog.text
    assert not list((store / "tmp").iterdir())  # no temp file left behind


def test_a_pinned_file_the_source_no_longer_has_fails_the_mirror(
    tmp_path: Path, public_tmp: Path
) -> None:
    """The store lost a blob and the source lost the file: nothing can be mounted."""
    repo = local_repo(public_tmp / "repo")
    cfg = f"weights:\n  - source: file://{repo}\n    mount_location: /models/m\n"
    first = WeightsManager(tmp_path / "store")
    mirror(first, "dep", cfg)
    data = (repo / "README.md").read_bytes()
    first.store.blob_path(hashlib.sha256(data).hexdigest()).unlink()
    (repo / "README.md").unlink()
    again = WeightsManager(tmp_path / "store")  # a restarted control plane
    again.start("dep", entries(cfg), {})
    done = (MirrorState.COMPLETE, MirrorState.FAILED)
    st = wait_for(lambda: (s := again.status("dep")).state in done and s, 30, "the mirror")
    assert st and st.state == MirrorState.FAILED, st
    assert "README.md" in st.error and "no longer lists it" in st.error


def test_gc_keeps_referenced_blobs(tmp_path: Path, public_tmp: Path) -> None:
    repo = local_repo(public_tmp / "repo")
    mgr = WeightsManager(tmp_path / "store")
    mirror(mgr, "dep", f"weights:\n  - source: file://{repo}\n    mount_location: /models/m\n")
    stray = mgr.store.blob_path("f" * 64)
    stray.parent.mkdir(exist_ok=True)
    stray.write_bytes(b"x" * 1000)
    assert mgr.gc(budget_bytes=10**9).removed_blobs == 0
    abandoned = tmp_path / "store" / "tmp" / "old.part"
    abandoned.write_bytes(b"y" * 10)
    fresh = tmp_path / "store" / "tmp" / "new.part"
    fresh.write_bytes(b"z" * 10)
    os.utime(abandoned, (0, 0))  # a partial download nobody touched for decades
    report = mgr.gc()
    assert (report.removed_blobs, report.removed_bytes) == (1, 1010)
    assert report.kept_bytes == 500_005
    assert not abandoned.exists() and fresh.exists()  # a download in progress is kept


def test_a_tree_is_never_a_path_that_was_not_built(tmp_path: Path) -> None:
    """`a` and `a/b` cannot both be files of one tree; that is an error, not a missing tree."""
    store = BlobStore(tmp_path / "store")
    (tmp_path / "x").write_bytes(b"x")
    digest = store.commit(tmp_path / "x", 1)
    clash = Manifest("clash", "s3://b/p", "r", {"a": (digest, 1), "a/b": (digest, 1)})
    with pytest.raises(OSError):
        store.tree(clash)
    assert not (tmp_path / "store" / "trees" / "clash").exists()
    assert not list((tmp_path / "store" / "tmp").iterdir())


def test_concurrent_callers_share_one_tree(tmp_path: Path) -> None:
    """Renaming a tree onto one a concurrent caller built fails with ENOTEMPTY on Linux."""
    store = BlobStore(tmp_path / "store")
    (tmp_path / "x").write_bytes(b"x")
    digest = store.commit(tmp_path / "x", 1)
    m = Manifest("many", "s3://b/p", "r", {f"f{i}": (digest, 1) for i in range(50)})
    barrier = threading.Barrier(4)

    def build() -> Path:
        barrier.wait()
        return store.tree(m)

    with ThreadPoolExecutor(4) as pool:
        trees = list(pool.map(lambda _: build(), range(4)))
    assert trees == [tmp_path / "store" / "trees" / "many"] * 4
    assert len(list(trees[0].iterdir())) == 50
    assert not list((tmp_path / "store" / "tmp").iterdir())


def test_a_file_named_like_a_directory_of_another_fails_the_mirror(
    tmp_path: Path, public_tmp: Path
) -> None:
    class Clashing(LocalSource):
        def files(self) -> list[RemoteFile]:
            return [RemoteFile("a", 1, "e1"), RemoteFile("a/b", 1, "e2")]

        def fetch(self, f: RemoteFile, out: Any, start: int = 0, end: int | None = None) -> None:
            out.write(b"x")

    mgr = WeightsManager(tmp_path / "store")
    cfg = f"weights:\n  - source: file://{public_tmp}\n    mount_location: /models/m\n"
    with mock.patch.object(manager_module, "open_source", lambda *a: Clashing(public_tmp)):
        mgr.start("dep", entries(cfg), {})
        done = (MirrorState.COMPLETE, MirrorState.FAILED)
        st = wait_for(lambda: (s := mgr.status("dep")).state in done and s, 30, "the mirror")
    assert st and st.state == MirrorState.FAILED, st
    assert "'a' is both a file and the directory of 'a/b'" in st.error


def test_validation_names_the_missing_auth() -> None:
    errs = validate_weights(
        entries("weights:\n  - source: s3://bucket/x\n    mount_location: /models/m\n")
    )
    assert errs and errs[0][0] == "weights[0].auth" and "secret_id is required" in errs[0][1]


# -- S3 against moto's real server ------------------------------------------------------------
@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    monkeypatch.setenv("KINGPOST_S3_ENDPOINT_URL", url)
    monkeypatch.setenv("KINGPOST_R2_ENDPOINT_TEMPLATE", url)
    client = boto3.client(
        "s3", endpoint_url=url, aws_access_key_id="AK", aws_secret_access_key="SK",
        region_name="us-east-1",
    )  # fmt: skip
    client.create_bucket(Bucket="weights")
    for key, size in (
        ("llama/model.safetensors", 150_000),
        ("llama/sub/tok.json", 10),
        ("other/x", 5),
    ):
        client.put_object(Bucket="weights", Key=key, Body=os.urandom(size))
    try:
        yield client
    finally:
        server.stop()


def failed(mgr: WeightsManager, key: str) -> MirrorStatus | None:
    st = mgr.status(key)
    return st if st.state == MirrorState.FAILED else None


CREDS = {"creds": json.dumps({"aws_access_key_id": "AK", "aws_secret_access_key": "SK"})}


def s3_cfg(source: str = "s3://weights/llama", secret: str = "creds") -> str:
    return (
        f"weights:\n  - source: {source}\n    mount_location: /models/llama\n"
        f"    auth:\n      auth_method: CUSTOM_SECRET\n      auth_secret_name: {secret}\n"
    )


def test_s3_mirror_and_r2_through_the_same_api(s3: object, tmp_path: Path) -> None:
    mgr = WeightsManager(tmp_path / "store")
    mirror(mgr, "dep", s3_cfg(), CREDS)
    (mount,) = mgr.mounts("dep")
    root = mount.source_dir
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) == [
        "model.safetensors", "sub/tok.json",
    ]  # fmt: skip
    r2 = {"r2": json.dumps({"r2_credentials": json.loads(CREDS["creds"])})}
    mirror(mgr, "dep-r2", s3_cfg("r2://acct.weights/llama", "r2"), r2)
    assert len(list((tmp_path / "store" / "blobs").glob("*/*"))) == 2  # same content, stored once


def test_an_s3_object_replaced_mid_download_is_not_mixed(
    s3: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ranges are asked for with If-Match on the listed ETag: a new version uploaded
    between two ranges answers 412, the partial file is dropped, and the next attempt
    lists the new version. (A multipart object has no MD5 that would catch the mix.)"""
    s3.put_object(Bucket="weights", Key="changing/w.bin", Body=b"O" * 4096)
    fetch, calls = S3Source.fetch, []

    def replaced(self: S3Source, f: RemoteFile, out: Any, start: int = 0, end: Any = None) -> None:
        fetch(self, f, out, start, end)
        calls.append(start)
        if len(calls) == 2:  # a new version is uploaded mid-mirror
            s3.put_object(Bucket="weights", Key="changing/w.bin", Body=b"N" * 4096)

    monkeypatch.setattr(S3Source, "fetch", replaced)
    monkeypatch.setattr(manager_module, "RETRY_DELAYS_S", (0.0, 0.0))
    mgr = WeightsManager(tmp_path / "store", chunk_bytes=1024, max_workers=1)
    mgr.start("dep", entries(s3_cfg("s3://weights/changing")), CREDS)
    st = wait_for(lambda: failed(mgr, "dep"), 20, "the first attempt")
    assert st and "changing/w.bin: changed at the source" in st.error, st
    assert not list((tmp_path / "store" / "tmp").iterdir())  # the mixed partial is gone
    mirror(mgr, "dep", s3_cfg("s3://weights/changing"), CREDS)
    (mount,) = mgr.mounts("dep")
    assert (mount.source_dir / "w.bin").read_bytes() == b"N" * 4096


def test_a_local_file_rewritten_mid_download_is_not_mixed(
    tmp_path: Path, public_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A local file has no hash: each range checks that the file is still the listed
    version (mtime and size), so old and new bytes are never stored as one file."""
    repo = public_tmp / "repo"
    repo.mkdir()
    (repo / "w.bin").write_bytes(b"O" * 4096)
    cfg = f"weights:\n  - source: file://{repo}\n    mount_location: /models/m\n"
    fetch, calls = LocalSource.fetch, []

    def rewritten(
        src: LocalSource, f: RemoteFile, out: Any, start: int = 0, end: Any = None
    ) -> None:
        fetch(src, f, out, start, end)
        calls.append(start)
        if len(calls) == 2:  # rewritten in place mid-mirror
            (repo / "w.bin").write_bytes(b"N" * 4096)
            os.utime(repo / "w.bin", (1_000_000, 1_000_000))

    monkeypatch.setattr(LocalSource, "fetch", rewritten)
    monkeypatch.setattr(manager_module, "RETRY_DELAYS_S", (0.0, 0.0))
    mgr = WeightsManager(tmp_path / "store", chunk_bytes=1024, max_workers=1)
    mgr.start("dep", entries(cfg), {})
    st = wait_for(lambda: failed(mgr, "dep"), 20, "the first attempt")
    assert st and "w.bin: changed at the source" in st.error, st
    mirror(mgr, "dep", cfg)
    (mount,) = mgr.mounts("dep")
    assert (mount.source_dir / "w.bin").read_bytes() == b"N" * 4096


def test_s3_bad_credentials_name_the_secret_not_its_value(s3: object, tmp_path: Path) -> None:
    mgr = WeightsManager(tmp_path / "store")
    bad = {"creds": json.dumps({"access_key_id": "AK", "secret": "TOPSECRET"})}
    mgr.start("dep", entries(s3_cfg()), bad)
    st = wait_for(
        lambda: mgr.status("dep").state == MirrorState.FAILED and mgr.status("dep"), 20, "failure"
    )
    assert st and "aws_access_key_id and aws_secret_access_key are required" in st.error
    assert "'creds'" in st.error and "TOPSECRET" not in st.error
    mgr.start("dep", entries(s3_cfg()), {})  # within the backoff: no new attempt
    assert mgr.status("dep").attempts == 1 and "TOPSECRET" not in mgr.status("dep").error
    mgr.forget("dep")  # as re-activating the deployment does: retrying is safe
    mgr.start("dep", entries(s3_cfg()), {})
    st = wait_for(
        lambda: mgr.status("dep").state == MirrorState.FAILED and mgr.status("dep"), 20, "failure"
    )
    assert st and "kingpost secrets set creds" in st.error


@pytest.mark.parametrize("key", ["llama/../../../escape.bin", "llama//abs-escape.bin"])
def test_listed_names_that_leave_the_mount_fail_the_mirror(
    s3: Any, tmp_path: Path, key: str
) -> None:
    """An object key is a name chosen by whoever writes the bucket: `..` parts or a leading
    `/` after the prefix must never place a file outside the mirror's tree."""
    s3.put_object(Bucket="weights", Key=key, Body=b"outside")
    try:
        mgr = WeightsManager(tmp_path / "store" / "a" / "b")
        mgr.start("dep", entries(s3_cfg()), CREDS)
        done = (MirrorState.COMPLETE, MirrorState.FAILED)
        st = wait_for(lambda: (s := mgr.status("dep")).state in done and s, 30, "the mirror")
    finally:
        s3.delete_object(Bucket="weights", Key=key)  # moto's buckets outlive the server
    assert st and st.state == MirrorState.FAILED, st
    assert "not a relative path inside the source" in st.error, st.error
    assert key.removeprefix("llama/") in st.error
    assert not [p for p in tmp_path.rglob("*escape*")]
    assert not Path("/abs-escape.bin").exists()


# -- the Hub API against a local hub-compatible server ----------------------------------------
@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[Hub]:
    with hub_server() as h:
        monkeypatch.setenv("HF_ENDPOINT", h.url)
        yield h


def hf_cfg(source: str, secret: str | None = None, extra: str = "") -> str:
    auth = (
        f"    auth:\n      auth_method: CUSTOM_SECRET\n      auth_secret_name: {secret}\n"
        if secret
        else ""
    )
    return f"weights:\n  - source: {source}\n    mount_location: /models/x\n{auth}{extra}"


def test_hf_branch_is_pinned_to_a_commit(hub: Hub, tmp_path: Path) -> None:
    repo = hub.repos["org/model"] = Repo()
    repo.commit("main", {"model.safetensors": b"v1" * 1000, "config.json": b"{}"})
    mgr = WeightsManager(tmp_path / "store")
    mirror(mgr, "dep1", hf_cfg("hf://org/model@main"))
    repo.commit("main", {"model.safetensors": b"v2" * 1000, "config.json": b"{}"})
    again = WeightsManager(tmp_path / "store")  # restart: dep1 keeps its commit
    mirror(again, "dep1", hf_cfg("hf://org/model@main"))
    (m1,) = again.mounts("dep1")
    assert (m1.source_dir / "model.safetensors").read_bytes() == b"v1" * 1000
    mirror(again, "dep2", hf_cfg("hf://org/model@main"))  # a new deployment sees the new commit
    (m2,) = again.mounts("dep2")
    assert (m2.source_dir / "model.safetensors").read_bytes() == b"v2" * 1000
    assert hub.downloads["config.json"] == 1  # same content on both commits: fetched once


def test_hf_patterns_and_private_repos(hub: Hub, tmp_path: Path) -> None:
    repo = hub.repos["org/private"] = Repo(token="hf_good")
    repo.commit("main", {"a.safetensors": b"a", "sub/b.safetensors": b"b", "README.md": b"r"})
    mgr = WeightsManager(tmp_path / "store")
    extra = "    allow_patterns: ['**/*.safetensors']\n"
    mgr.start("no-auth", entries(hf_cfg("hf://org/private", extra=extra)), {})
    st = wait_for(lambda: failed(mgr, "no-auth"), 20, "failure without a token")
    assert "401" in st.error and "private" in st.error
    mgr.start("bad", entries(hf_cfg("hf://org/private", "tok", extra)), {"tok": "hf_bad"})
    st = wait_for(lambda: failed(mgr, "bad"), 20, "failure with a bad token")
    assert "refused" in st.error and "hf_bad" not in st.error
    mirror(mgr, "good", hf_cfg("hf://org/private", "tok", extra), {"tok": "hf_good"})
    (mount,) = mgr.mounts("good")
    assert sorted(p.name for p in mount.source_dir.rglob("*") if p.is_file()) == [
        "a.safetensors", "b.safetensors",
    ]  # fmt: skip


def test_model_cache_token_is_its_runtime_secret_and_optional(hub: Hub, tmp_path: Path) -> None:
    """Truss names `hf_access_token` in every model_cache item, private or not: a public
    repository mirrors without that secret, a private one says which secret to store."""
    hub.repos["org/public"] = Repo()
    hub.repos["org/public"].commit("main", {"config.json": b"{}"})
    hub.repos["org/private"] = Repo(token="hf_good")
    hub.repos["org/private"].commit("main", {"config.json": b"{}"})
    cache = "model_cache:\n  - repo_id: {}\n    use_volume: true\n    revision: main\n" \
        "    volume_folder: m\n"  # fmt: skip
    mgr = WeightsManager(tmp_path / "store")
    mirror(mgr, "public", cache.format("org/public"))
    (mount,) = mgr.mounts("public")
    assert mount.mount_location == "/app/model_cache/m"
    assert (mount.source_dir / "config.json").read_bytes() == b"{}"
    mgr.start("private", entries(cache.format("org/private")), {})
    st = wait_for(lambda: failed(mgr, "private"), 20, "failure without the token")
    assert "401" in st.error and "kingpost secrets set hf_access_token" in st.error, st.error
    mirror(mgr, "with-token", cache.format("org/private"), {"hf_access_token": "hf_good"})


def test_interrupted_download_resumes_with_a_range(hub: Hub, tmp_path: Path) -> None:
    data = os.urandom(3_000_000)
    hub.repos["org/big"] = repo = Repo()
    repo.commit("main", {"big.safetensors": data})
    hub.drop_once.add("big.safetensors")
    mgr = WeightsManager(tmp_path / "store")
    mirror(mgr, "dep", hf_cfg("hf://org/big"))
    (mount,) = mgr.mounts("dep")
    assert (mount.source_dir / "big.safetensors").read_bytes() == data
    (resumed,) = hub.ranges  # one resume, from what had been written, not from zero
    first, last = resumed.removeprefix("bytes=").split("-")
    assert 0 < int(first) <= len(data) // 2 and int(last) == len(data) - 1
    assert not list((tmp_path / "store" / "tmp").iterdir())  # nothing partial left behind


def byte_ranges(hub: Hub) -> list[tuple[int, int]]:
    out = []
    for r in hub.ranges:
        a, _, b = r.removeprefix("bytes=").partition("-")
        out.append((int(a), int(b)))
    return sorted(out)


def test_large_files_come_in_parallel_byte_ranges(hub: Hub, tmp_path: Path) -> None:
    mb = 1024 * 1024
    data = os.urandom(5 * mb + 123)
    hub.repos["org/large"] = repo = Repo()
    repo.commit("main", {"large.safetensors": data, "small.json": b"{}"})
    mgr = WeightsManager(tmp_path / "store", chunk_bytes=mb)
    mirror(mgr, "dep", hf_cfg("hf://org/large"))
    (mount,) = mgr.mounts("dep")
    assert (mount.source_dir / "large.safetensors").read_bytes() == data
    expected = [(a, min(a + mb, len(data)) - 1) for a in range(0, len(data), mb)]
    assert byte_ranges(hub) == expected  # six ranges, each fetched once; small.json whole
    assert hub.downloads["small.json"] == 1


def test_a_mirror_restarted_after_a_failure_fetches_only_missing_ranges(
    hub: Hub, tmp_path: Path
) -> None:
    mb = 1024 * 1024
    data = os.urandom(4 * mb)
    hub.repos["org/resume"] = repo = Repo()
    repo.commit("main", {"w.safetensors": data})
    hub.fail.add(("w.safetensors", 2 * mb))  # one range keeps failing
    mgr = WeightsManager(tmp_path / "store", chunk_bytes=mb, max_workers=2)
    mgr.start("dep", entries(hf_cfg("hf://org/resume")), {})
    st = wait_for(lambda: failed(mgr, "dep"), 30, "the mirror to fail")
    assert "w.safetensors" in st.error and "500" in st.error
    hub.fail.clear()
    hub.ranges.clear()
    again = WeightsManager(tmp_path / "store", chunk_bytes=mb)  # a restarted control plane
    mirror(again, "dep", hf_cfg("hf://org/resume"))
    (mount,) = again.mounts("dep")
    assert (mount.source_dir / "w.safetensors").read_bytes() == data
    assert (2 * mb, 3 * mb - 1) in byte_ranges(hub)
    assert len(hub.ranges) < 4  # ranges that landed before the failure were not fetched again
    assert not list((tmp_path / "store" / "tmp").iterdir())


def test_gc_during_a_mirror_keeps_the_files_it_already_stored(hub: Hub, tmp_path: Path) -> None:
    """A mirror saves its manifest when every file is in: until then the blobs it stored
    are referenced by nothing, and a garbage collection must still leave them."""
    hub.repos["org/slow"] = repo = Repo()
    repo.commit("main", {"a.json": b'{"first": 1}', "b.safetensors": os.urandom(50_000)})
    hub.hold["b.safetensors"] = gate = threading.Event()
    mgr = WeightsManager(tmp_path / "store")
    try:
        mgr.start("dep", entries(hf_cfg("hf://org/slow")), {})
        wait_for(lambda: mgr.status("dep").files_done == 1 or None, 20, "a.json stored")
        report = mgr.gc()
        assert report.removed_blobs == 0, report
    finally:
        gate.set()
    wait_for(lambda: mgr.status("dep").state == MirrorState.COMPLETE or None, 20, "complete")
    (mount,) = mgr.mounts("dep")
    assert (mount.source_dir / "a.json").read_bytes() == b'{"first": 1}'
    assert mgr.gc().removed_blobs == 0  # referenced now


def test_gc_keeps_an_older_blob_a_retried_mirror_reuses(
    tmp_path: Path, public_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first attempt stores a.bin and fails on b.bin, saving no manifest; the retry
    reuses a.bin's blob, older than the retry. A gc during the retry used to delete it,
    and the retry then completed with a manifest naming a blob gone for good."""
    repo = public_tmp / "repo"
    repo.mkdir()
    (repo / "a.bin").write_bytes(b"A" * 1000)
    (repo / "b.bin").write_bytes(b"B" * 1000)
    cfg = f"weights:\n  - source: file://{repo}\n    mount_location: /models/m\n"
    fetch = LocalSource.fetch
    b_down, b_reached, b_gate = True, threading.Event(), threading.Event()

    def flaky(self: LocalSource, f: RemoteFile, out: Any, start: int = 0, end: Any = None) -> None:
        if f.path == "b.bin":
            if b_down:
                raise OSError("source down")
            b_reached.set()
            b_gate.wait(20)
        fetch(self, f, out, start, end)

    monkeypatch.setattr(LocalSource, "fetch", flaky)
    monkeypatch.setattr(manager_module, "FETCH_ATTEMPTS", 1)
    monkeypatch.setattr(manager_module, "RETRY_DELAYS_S", (0.0, 0.0))
    mgr = WeightsManager(tmp_path / "store")
    mgr.start("dep", entries(cfg), {})
    wait_for(lambda: mgr.status("dep").state == MirrorState.FAILED or None, 20, "attempt 1")
    (blob,) = (tmp_path / "store" / "blobs").glob("*/*")  # a.bin's
    old = blob.stat().st_mtime - 3600
    os.utime(blob, (old, old))  # stored well before the retry started
    b_down = False
    try:
        mgr.start("dep", entries(cfg), {})
        assert b_reached.wait(20), "attempt 2 never fetched b.bin"
        assert mgr.gc().removed_blobs == 0
    finally:
        b_gate.set()
    wait_for(lambda: mgr.status("dep").state == MirrorState.COMPLETE or None, 20, "attempt 2")
    (mount,) = mgr.mounts("dep")
    assert (mount.source_dir / "a.bin").read_bytes() == b"A" * 1000


def test_a_tree_whose_blob_is_gone_names_the_source_and_path(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "store")
    gone = Manifest("gone", "s3://b/p", "r", {"sub/w.bin": ("ab" * 32, 1)})
    with pytest.raises(WeightsError, match=r"s3://b/p: sub/w.bin: .*abab.* is missing"):
        store.tree(gone)
    assert not (tmp_path / "store" / "trees" / "gone").exists()
    assert not list((tmp_path / "store" / "tmp").iterdir())


def test_a_corrupt_download_is_refused_by_its_hash(hub: Hub, tmp_path: Path) -> None:
    hub.repos["org/bad"] = repo = Repo()
    repo.commit("main", {"w.bin": b"good" * 1000})
    hub.tamper["w.bin"] = b"evil" * 1000  # same size, bytes that do not match the LFS sha256
    mgr = WeightsManager(tmp_path / "store")
    mgr.start("dep", entries(hf_cfg("hf://org/bad")), {})
    st = wait_for(lambda: failed(mgr, "dep"), 30, "the mirror to fail")
    assert "sha256 mismatch" in st.error and "w.bin" in st.error
    assert not list((tmp_path / "store" / "blobs").glob("*/*"))


def test_single_file_over_http_resumes(
    hub: Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kingpost.weights.blobs import BlobStore
    from kingpost.weights.sources import HttpFileSource

    monkeypatch.setenv("KINGPOST_WEIGHTS_ALLOW_PRIVATE_URLS", "1")  # the server is local

    data = os.urandom(2_500_000)
    hub.repos["org/file"] = repo = Repo()
    commit = repo.commit("main", {"weights.bin": data})
    source = HttpFileSource(f"{hub.url}/org/file/resolve/{commit}/weights.bin")
    (f,) = source.files()
    assert (f.path, f.size) == ("weights.bin", len(data))
    hub.drop_once.add("weights.bin")
    store = BlobStore(tmp_path / "store")
    assert source.ranges  # the server says Accept-Ranges: bytes
    with store.writer() as (fh, tmp):
        with pytest.raises(Exception):  # noqa: B017 - the transport error of a dropped connection
            source.fetch(f, fh)
        assert 0 < fh.tell() < len(data)
        source.fetch(f, fh, fh.tell())
    digest = store.commit(tmp, len(data))
    assert store.blob_path(digest).read_bytes() == data


def test_the_local_hub_speaks_the_api_huggingface_hub_uses(hub: Hub, tmp_path: Path) -> None:
    """The real client downloads from the test hub, so the mirror is tested against the
    real protocol, not only against itself."""
    hf = pytest.importorskip("huggingface_hub")
    hub.repos["org/model"] = repo = Repo()
    commit = repo.commit("main", {"config.json": b'{"a": 1}'})
    path = hf.hf_hub_download(
        "org/model", "config.json", revision="main", endpoint=hub.url,
        cache_dir=str(tmp_path / "hf-cache"),
    )  # fmt: skip
    assert Path(path).read_bytes() == b'{"a": 1}' and commit in path


# -- GCS through its JSON API and Google's service-account OAuth flow ---------------------------
@pytest.fixture
def gcs(monkeypatch: pytest.MonkeyPatch) -> Iterator[Gcs]:
    with gcs_server() as g:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", g.url)
        # The test keys' token_uri is this local server: a URL the secret names.
        monkeypatch.setenv("KINGPOST_WEIGHTS_ALLOW_PRIVATE_URLS", "1")
        yield g


def gs_cfg(source: str = "gs://models/llama", secret: str = "gsa") -> str:
    return (
        f"weights:\n  - source: {source}\n    mount_location: /models/llama\n"
        f"    auth:\n      auth_method: CUSTOM_SECRET\n      auth_secret_name: {secret}\n"
    )


def test_gcs_mirror_with_a_service_account(gcs: Gcs, tmp_path: Path) -> None:
    mb = 1024 * 1024
    big = os.urandom(3 * mb + 5)
    gcs.buckets["models"] = Bucket(
        {
            "llama/model.safetensors": big,
            "llama/sub/tokenizer.json": b"{}",
            "llama/config.json": b'{"a": 1}',
            "other/x": b"not mine",
        },
        readers={"mirror@test-project.iam.gserviceaccount.com"},
    )
    key = gcs.service_account("mirror@test-project.iam.gserviceaccount.com")
    mgr = WeightsManager(tmp_path / "store", chunk_bytes=mb)
    mirror(mgr, "dep", gs_cfg(), {"gsa": json.dumps(key)})
    (mount,) = mgr.mounts("dep")
    root = mount.source_dir
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) == [
        "config.json",
        "model.safetensors",
        "sub/tokenizer.json",
    ]  # fmt: skip  (three objects listed over two pages)
    assert (root / "model.safetensors").read_bytes() == big
    assert len(gcs.ranges) == 4 and gcs.token_requests == 1  # one token, reused


def test_gcs_credentials_errors_name_the_secret_never_the_key(gcs: Gcs, tmp_path: Path) -> None:
    gcs.buckets["models"] = Bucket({"llama/w": b"w"}, readers={"ok@p.iam"})
    mgr = WeightsManager(tmp_path / "store")
    untrusted = gcs.service_account("ok@p.iam")
    gcs.service_account("ok@p.iam")  # a new key for the account: the first one is not trusted
    cases = {
        "bad-signature": (json.dumps(untrusted), "refused the service account ok@p.iam"),
        "wrong-keys": (json.dumps({"email": "x", "key": "TOPSECRET"}), "keys found: email, key"),
        "not-json": ("TOPSECRET", "must hold a service-account JSON key"),
    }
    for name, (value, message) in cases.items():
        mgr.start(name, entries(gs_cfg(secret=name)), {name: value})
        st = wait_for(lambda n=name: failed(mgr, n), 20, f"{name} to fail")
        assert message in st.error and f"'{name}'" in st.error, st.error
        assert "TOPSECRET" not in st.error and "PRIVATE KEY" not in st.error
    reader = gcs.service_account("reader@p.iam")  # trusted, but not allowed on the bucket
    mgr.start("forbidden", entries(gs_cfg(secret="r")), {"r": json.dumps(reader)})
    st = wait_for(lambda: failed(mgr, "forbidden"), 20, "a 403")
    assert "403" in st.error and "reader@p.iam may not read gs://models" in st.error


@pytest.mark.parametrize("where", ["auth", "top"])
def test_gcs_weights_through_the_platform(gcs: Gcs, tmp_path: Path, where: str) -> None:
    """push -> WAITING_FOR_WEIGHTS -> mirrored from gs:// with a secret -> served read-only.

    Truss takes the secret's name in `auth` or at the top of the entry; both must reach
    the mirror."""
    from test_platform_push import copy_project

    from helpers.platform import Platform

    gcs.buckets["models"] = Bucket(
        {"enc/model.safetensors": os.urandom(70_000), "enc/sub/config.json": b"{}"},
        readers={"plat@p.iam"},
    )
    platform = Platform(
        tmp_path / "home",
        extra_env={"STORAGE_EMULATOR_HOST": gcs.url, "KINGPOST_WEIGHTS_ALLOW_PRIVATE_URLS": "1"},
    ).start()
    try:
        key = json.dumps(gcs.service_account("plat@p.iam"))
        assert platform.cli("secrets", "set", "gcp_service_account", input=key).returncode == 0
        weights = gs_cfg("gs://models/enc", "gcp_service_account")
        weights = weights.replace("/models/llama", "/models/enc")
        if where == "top":
            weights = weights.replace(
                "    auth:\n      auth_method: CUSTOM_SECRET\n      auth_secret_name:",
                "    auth_secret_name:",
            )
            assert "auth:" not in weights
        project = copy_project(tmp_path, "gcs-weighted", "model_name: gcs-weighted\n" + weights)
        out = platform.cli("push", str(project), "--wait", "--output", "json")
        assert out.returncode == 0, out.stdout + out.stderr
        model_id = json.loads(out.stdout)["model"]["id"]
        with platform.gateway() as gw:
            seen = gw.get(
                f"/models/{model_id}/environments/production/sync/files?dir=/models/enc"
            ).json()
        assert seen == {"files": ["model.safetensors", "sub/config.json"], "writable": False}
        assert "BEGIN PRIVATE KEY" not in platform.output()
    finally:
        platform.stop()


def test_a_failing_mirror_is_retried_with_backoff_then_given_up_until_forgotten(
    tmp_path: Path, public_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The controller calls start() on every pass: a failed mirror used to start again each
    time, so its deployment showed a fresh "0/0 files" forever. Now each failure counts,
    start() waits out the backoff, and after the last attempt the failure stands."""
    repo = public_tmp / "repo"  # missing until the end
    cfg = f"weights:\n  - source: file://{repo}\n    mount_location: /models/m\n"
    mgr = WeightsManager(tmp_path / "store", attempts=3)

    def failed(attempts: int) -> MirrorStatus | None:
        st = mgr.status("dep")
        return st if st.state == MirrorState.FAILED and st.attempts == attempts else None

    mgr.start("dep", entries(cfg), {})
    first = wait_for(lambda: failed(1), 20, "the first failure")
    assert first and first.retry_in_s is not None and 0 < first.retry_in_s <= 5
    assert str(repo) in first.error
    mgr.start("dep", entries(cfg), {})  # inside the backoff: nothing starts
    assert mgr.status("dep").state == MirrorState.FAILED and mgr.status("dep").attempts == 1
    monkeypatch.setattr(manager_module, "RETRY_DELAYS_S", (0.0, 0.0))
    monkeypatch.setattr(mgr, "_failures", {"dep": (1, 0.0)})  # the backoff has passed
    for attempt in (2, 3):
        mgr.start("dep", entries(cfg), {})
        wait_for(lambda a=attempt: failed(a), 20, f"failure {attempt}")  # type: ignore[misc]
    final = mgr.status("dep")
    assert final.attempts == 3 and final.retry_in_s is None  # given up
    local_repo(repo)
    mgr.start("dep", entries(cfg), {})
    assert mgr.status("dep").attempts == 3  # still given up: no new attempt
    mgr.forget("dep")  # re-activation
    mirror(mgr, "dep", cfg)
    assert mgr.status("dep").attempts == 0


def test_a_weights_source_that_fails_fails_the_deployment_and_push_wait(
    tmp_path: Path, public_tmp: Path
) -> None:
    """It used to sit in WAITING_FOR_WEIGHTS "0/0 files" while `push --wait` waited out its
    timeout. The deployment ends FAILED with the source's error, which `kingpost logs`
    shows too; re-activating it after the source is fixed mirrors afresh."""
    from test_platform_push import copy_project

    from helpers.platform import Platform

    repo = public_tmp / "repo"  # missing
    platform = Platform(
        tmp_path / "home", extra_env={"KINGPOST_WEIGHTS_MIRROR_ATTEMPTS": "1"}
    ).start()
    try:
        weights = f"weights:\n  - source: file://{repo}\n    mount_location: /models/w\n"
        project = copy_project(tmp_path, "bad-weights", "model_name: bad-weights\n" + weights)
        out = platform.cli("push", str(project), "--wait", "--timeout", "120", "-o", "json")
        assert out.returncode != 0, out.stdout
        assert "FAILED" in out.stderr and str(repo) in out.stderr, out.stderr
        assert "gave up after 1 attempts" in out.stderr
        dep_id = json.loads(out.stdout)["deployment"]["id"]
        logs = platform.cli("logs", "--deployment", dep_id)
        assert "[weights] mirror attempt 1 failed" in logs.stdout and str(repo) in logs.stdout
        local_repo(repo)
        assert platform.cli("deployments", "activate", "bad-weights", dep_id).returncode == 0
        platform.wait_status(dep_id, "ACTIVE", timeout=120)
    finally:
        platform.stop()


def test_a_local_source_inside_the_home_is_never_mirrored(tmp_path: Path) -> None:
    """A deployment pushed before the push-time rule still gets no copy of the home."""
    home = tmp_path / "home"
    local_repo(home / "projects")
    (home / "secret.key").write_text("key")
    mgr = WeightsManager(home / "weights", home=home)
    cfg = f"weights:\n  - source: file://{home}\n    mount_location: /models/m\n"
    mgr.start("dep", entries(cfg), {})
    done = (MirrorState.COMPLETE, MirrorState.FAILED)
    st = wait_for(lambda: (s := mgr.status("dep")).state in done and s, 30, "the mirror")
    assert st and st.state == MirrorState.FAILED, st
    assert "may not be inside Kingpost's home" in st.error and str(home) in st.error


def test_restart_mirrors_the_new_entries_of_a_key(tmp_path: Path, public_tmp: Path) -> None:
    a, b = local_repo(public_tmp / "a"), public_tmp / "b"
    b.mkdir()
    (b / "other.bin").write_bytes(b"new weights")
    mgr = WeightsManager(tmp_path / "store")
    mirror(mgr, "dev", f"weights:\n  - source: file://{a}\n    mount_location: /models/a\n")
    changed = f"weights:\n  - source: file://{b}\n    mount_location: /models/b\n"
    mgr.start("dev", entries(changed), {})  # a finished mirror stays as it is ...
    assert [m.mount_location for m in mgr.mounts("dev")] == ["/models/a"]
    mgr.restart("dev")  # ... until it is restarted
    mirror(mgr, "dev", changed)
    (mount,) = mgr.mounts("dev")
    assert mount.mount_location == "/models/b"
    assert (mount.source_dir / "other.bin").read_bytes() == b"new weights"


# -- what the root control plane may fetch for a replica ----------------------------------------
def failed_mirror(mgr: WeightsManager, key: str, text: str) -> MirrorStatus:
    mgr.start(key, entries(text), {})
    done = (MirrorState.COMPLETE, MirrorState.FAILED)
    st = wait_for(lambda: (s := mgr.status(key)).state in done and s, 30, f"mirror {key}")
    assert st and st.state == MirrorState.FAILED, st
    return st


def test_a_local_source_only_root_may_read_is_refused_at_push_and_by_the_mirror(
    tmp_path: Path, public_tmp: Path
) -> None:
    """The control plane mirrors as root into a tree every replica may read: a 0700
    directory (/root/.ssh, another model's secrets under /dev/shm) must not be copied."""
    private = local_repo(public_tmp / "private")
    private.chmod(0o700)
    below = local_repo(tmp_path / "below-0700")  # pytest's base directory is 0700
    cfg = (
        f"weights:\n  - source: file://{private}\n    mount_location: /models/a\n"
        f"  - source: {below}\n    mount_location: /models/b\n"
    )
    errors = dict(validate_weights(entries(cfg), tmp_path / "home"))
    assert f"{private} is not listable by others (o+rx) (mode 0700)" in errors["weights[0].source"]
    assert "searchable by others (o+x)" in errors["weights[1].source"]
    mgr = WeightsManager(tmp_path / "store", home=tmp_path / "home")
    st = failed_mirror(mgr, "dep", cfg)  # a deployment pushed before the rule
    assert st.error.startswith(f"weights[0].source: {private} is not listable"), st.error


def test_a_private_file_or_a_link_to_one_in_a_public_source_fails_the_mirror(
    tmp_path: Path, public_tmp: Path
) -> None:
    secret = public_tmp / "vault"
    secret.mkdir(mode=0o700)
    (secret / "id_ed25519").write_text("PRIVATE KEY")
    for name, make in (
        ("file", lambda repo: (repo / "key.bin").chmod(0o600)),
        ("link", lambda repo: (repo / "key.bin").symlink_to(secret / "id_ed25519")),
        ("link-to-dir", lambda repo: (repo / "sub" / "k").symlink_to(secret / "id_ed25519")),
    ):
        repo = local_repo(public_tmp / name)
        if name == "file":
            (repo / "key.bin").write_text("PRIVATE")
        make(repo)
        mgr = WeightsManager(tmp_path / f"store-{name}")
        cfg = f"weights:\n  - source: file://{repo}\n    mount_location: /models/m\n"
        assert validate_weights(entries(cfg), tmp_path / "home") == []  # the directory is fine
        st = failed_mirror(mgr, "dep", cfg)
        assert st.error.startswith("weights[0].source: "), st.error
        assert "readable by others (o+r)" in st.error or "searchable by others" in st.error
        assert not any(
            b"PRIVATE" in p.read_bytes() for p in (tmp_path / f"store-{name}").rglob("*")
            if p.is_file()
        )  # fmt: skip


def test_a_link_swapped_in_after_the_listing_is_not_followed(
    tmp_path: Path, public_tmp: Path
) -> None:
    repo = local_repo(public_tmp / "repo")
    secret = public_tmp / "vault"
    secret.mkdir(mode=0o700)
    (secret / "shard.safetensors").write_text("PRIVATE")
    source = LocalSource(repo, "weights[0].source")
    listed = {f.path: f for f in source.files()}
    # Between the listing and the read, the directory becomes a link to the secret one.
    (repo / "sub").rename(public_tmp / "old-sub")
    (repo / "sub").symlink_to(secret)
    out = tmp_path / "out"
    with out.open("wb") as fh, pytest.raises(WeightsError, match=r"searchable by others|o\+r"):
        source.fetch(listed["sub/shard.safetensors"], fh)
    assert b"PRIVATE" not in out.read_bytes()


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "169.254.169.254", "10.1.2.3", "[::1]", "[::ffff:127.0.0.1]",
             "[::ffff:169.254.169.254]", "0.0.0.0", "localhost"],
)  # fmt: skip
def test_a_url_on_a_private_address_is_refused_unless_the_operator_allows_it(
    tmp_path: Path, host: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control plane, on the host network, must not fetch for a replica what the
    replica (in its own namespace) cannot reach: a metadata service, this machine."""
    monkeypatch.delenv("KINGPOST_WEIGHTS_ALLOW_PRIVATE_URLS", raising=False)
    cfg = f"external_data:\n  - url: http://{host}:9/creds\n    local_data_path: c.txt\n"
    st = failed_mirror(WeightsManager(tmp_path / "store"), "dep", cfg)
    assert "refused:" in st.error and "KINGPOST_WEIGHTS_ALLOW_PRIVATE_URLS" in st.error, st.error


def test_a_local_url_is_fetched_when_the_operator_allows_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from helpers.httpd import QuietHandler, serving

    class Files(QuietHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "5")
            self.end_headers()
            self.wfile.write(b"hello")

    with serving(Files) as server:
        url = f"http://127.0.0.1:{server.server_address[1]}/f.txt"
        cfg = f"external_data:\n  - url: {url}\n    local_data_path: f.txt\n"
        st = failed_mirror(WeightsManager(tmp_path / "refused"), "dep", cfg)
        assert "127.0.0.1 is loopback" in st.error, st.error
        monkeypatch.setenv("KINGPOST_WEIGHTS_ALLOW_PRIVATE_URLS", "1")
        mgr = WeightsManager(tmp_path / "store")
        mirror(mgr, "dep", cfg)
        (mount,) = mgr.mounts("dep")
        assert mount.source_dir.read_bytes() == b"hello"


def test_a_public_name_is_connected_to_at_the_address_that_was_checked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A name resolved twice (check, then connect) could answer a public address first and
    a private one next: the connection goes to the address that was checked."""
    import socket

    import httpx

    from kingpost.weights import access

    monkeypatch.delenv("KINGPOST_WEIGHTS_ALLOW_PRIVATE_URLS", raising=False)
    answers = iter(["93.184.215.14", "127.0.0.1"])
    monkeypatch.setattr(
        socket, "getaddrinfo",
        lambda host, port, **kw: [(socket.AF_INET, socket.SOCK_STREAM, 6, "",
                                   (next(answers), port))],
    )  # fmt: skip
    sent: list[httpx.Request] = []
    monkeypatch.setattr(
        httpx.HTTPTransport, "handle_request",
        lambda self, request: sent.append(request) or httpx.Response(200, content=b"x"),
    )  # fmt: skip
    with access.guarded_client() as client:
        assert client.get("https://weights.example/model.bin").status_code == 200
    (request,) = sent
    assert request.url.host == "93.184.215.14"
    assert request.headers["host"] == "weights.example"
    assert request.extensions["sni_hostname"] == "weights.example"


def test_a_service_account_token_uri_on_a_private_address_is_refused(
    gcs: Gcs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The key's token_uri is the user's: the JWT is not posted to this machine."""
    monkeypatch.delenv("KINGPOST_WEIGHTS_ALLOW_PRIVATE_URLS")
    gcs.buckets["models"] = Bucket({"llama/a.bin": b"a"}, readers={"sa@p.iam"})
    mgr = WeightsManager(tmp_path / "store")
    mgr.start("dep", entries(gs_cfg()), {"gsa": json.dumps(gcs.service_account("sa@p.iam"))})
    done = (MirrorState.COMPLETE, MirrorState.FAILED)
    st = wait_for(lambda: (s := mgr.status("dep")).state in done and s, 30, "the mirror")
    assert st and st.state == MirrorState.FAILED, st
    assert "/token: refused:" in st.error and "loopback" in st.error, st.error


def test_an_r2_account_id_cannot_name_another_host(tmp_path: Path) -> None:
    cfg = s3_cfg("r2://localhost#.weights/llama", "r2")
    mgr = WeightsManager(tmp_path / "store")
    secret = json.dumps({"aws_access_key_id": "AK", "aws_secret_access_key": "SK"})
    mgr.start("dep", entries(cfg), {"r2": secret})
    done = (MirrorState.COMPLETE, MirrorState.FAILED)
    st = wait_for(lambda: (s := mgr.status("dep")).state in done and s, 30, "the mirror")
    assert st and st.state == MirrorState.FAILED, st
    assert "R2 account id 'localhost#'" in st.error, st.error
