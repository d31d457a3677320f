"""How a Ray node fills its weights cache (``fetch_weights``) from the control plane's
mirror (``WeightsSource``), with both sides' real blob stores and no Ray: in chunks, once
per blob however many replicas prepare at once, verified, read-only."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import pytest

from kingpost.engines._ray_node import NodeWeights, WeightsSource, fetch_weights
from kingpost.errors import WeightsError
from kingpost.weights.blobs import BlobStore, Manifest

CHUNK = 1000


def _mirror(root: Path, files: dict[str, bytes]) -> Manifest:
    store = BlobStore(root)
    entries = {}
    for rel, data in files.items():
        with store.writer() as (fh, tmp):
            fh.write(data)
        entries[rel] = (store.commit(tmp, len(data)), len(data))
    return Manifest("m1", "file:///repo", "r1", entries)


class _Counting:
    def __init__(self, source: WeightsSource, delay: float = 0.0) -> None:
        self.source = source
        self.delay = delay
        self.calls: list[tuple[str, int]] = []
        self._lock = threading.Lock()

    def __call__(self, digest: str, offset: int, length: int) -> bytes:
        with self._lock:
            self.calls.append((digest, offset))
        time.sleep(self.delay)  # a transfer takes time: replicas overlap
        return self.source.read(digest, offset, length)


def test_files_are_fetched_in_chunks_once_and_mounted_read_only(tmp_path: Path) -> None:
    big = os.urandom(2500)
    manifest = _mirror(tmp_path / "mirror", {"model.bin": big, "sub/config.json": b"{}"})
    read = _Counting(WeightsSource(str(tmp_path / "mirror")))
    cache = tmp_path / "node" / "weights"
    weights = (
        NodeWeights("/models/m", manifest),
        NodeWeights("/app/data/c.json", manifest, "sub/config.json"),
    )
    notes: list[str] = []
    (tree, single) = fetch_weights(weights, read, cache, notes.append, chunk=CHUNK)
    assert (
        tree.mount_location == "/models/m"
        and single.source_dir == tree.source_dir / "sub/config.json"
    )
    assert (tree.source_dir / "model.bin").read_bytes() == big
    assert len(read.calls) == 3 + 1  # 2500 bytes in three 1000-byte chunks, then the small file
    assert (tree.source_dir / "model.bin").stat().st_mode & 0o777 == 0o444
    assert (tree.source_dir / "sub").stat().st_mode & 0o777 == 0o555
    assert notes == [
        "weights: fetched 2 files (2502 bytes) onto this node; the rest were in its cache"
    ]
    again = fetch_weights(weights, read, cache, notes.append, chunk=CHUNK)
    assert again == (tree, single) and len(read.calls) == 4  # a second replica fetches nothing
    assert notes[-1].startswith("weights: fetched 0 files (0 bytes)")


def test_replicas_preparing_at_once_on_one_node_fetch_each_blob_once(tmp_path: Path) -> None:
    data = os.urandom(5000)
    manifest = _mirror(tmp_path / "mirror", {"model.bin": data})
    read = _Counting(WeightsSource(str(tmp_path / "mirror")), delay=0.02)
    cache = tmp_path / "node" / "weights"
    results: list[Path] = []
    errors: list[BaseException] = []
    together = threading.Barrier(4)

    def replica() -> None:
        together.wait()
        try:
            (m,) = fetch_weights((NodeWeights("/w", manifest),), read, cache, print, chunk=CHUNK)
            results.append(m.source_dir)
        except BaseException as exc:  # the assertion below names it
            errors.append(exc)

    threads = [threading.Thread(target=replica) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    assert len(set(results)) == 1 and (results[0] / "model.bin").read_bytes() == data
    assert len(read.calls) == 5  # one blob, five chunks, fetched by one replica only
    assert list((cache / "tmp").iterdir()) == []


def test_a_damaged_transfer_leaves_no_blob(tmp_path: Path) -> None:
    manifest = _mirror(tmp_path / "mirror", {"model.bin": b"x" * 1500})
    source = WeightsSource(str(tmp_path / "mirror"))

    def damaged(digest: str, offset: int, length: int) -> bytes:
        return source.read(digest, offset, length).replace(b"x", b"y", 1)

    cache = tmp_path / "node" / "weights"
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        fetch_weights((NodeWeights("/w", manifest),), damaged, cache, print, chunk=CHUNK)
    assert list((cache / "blobs").rglob("*")) == [] and list((cache / "tmp").iterdir()) == []
    digest = hashlib.sha256(b"x" * 1500).hexdigest()
    assert source.read(digest, 1400, CHUNK) == b"x" * 100


def test_the_source_serves_only_blobs_by_their_hash(tmp_path: Path) -> None:
    source = WeightsSource(str(tmp_path / "mirror"))
    with pytest.raises(ValueError, match="is not a sha256 in hex"):
        source.read("../../etc/passwd", 0, 10)
