"""Weights benchmark.

1. Mirror: the same objects from a local S3-compatible server (moto's server mode), once
   through Kingpost's mirror (WeightsManager, parallel GETs into the blob store) and once
   through boto3's own transfer manager (ranged multipart downloads), alternating; reports
   the time ratio.
2. Materialize: time for a new replica to get an already-cached model as a read-only
   hard-link tree, beside `cp -r` of the same tree (sparse files stand in for 5 GB).

    python bench/weights.py [--mirror-mb 256] [--files 8] [--model-gb 5]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from kingpost.config import parse_config  # noqa: E402
from kingpost.weights import BlobStore, Manifest, MirrorState, WeightsManager  # noqa: E402


def mirror_case(work: Path, total_mb: int, files: int) -> dict[str, float]:
    import boto3
    from boto3.s3.transfer import TransferConfig
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    os.environ["KINGPOST_S3_ENDPOINT_URL"] = url
    s3 = boto3.client(
        "s3",
        endpoint_url=url,
        aws_access_key_id="AK",
        aws_secret_access_key="SK",
        region_name="us-east-1",
    )
    s3.create_bucket(Bucket="bench")
    size = total_mb * 1024 * 1024 // files
    for i in range(files):
        s3.put_object(Bucket="bench", Key=f"model/shard-{i}.safetensors", Body=os.urandom(size))
    cfg = (
        "weights:\n  - source: s3://bench/model\n    mount_location: /m\n"
        "    auth: {auth_method: CUSTOM_SECRET, auth_secret_name: c}\n"
    )
    entries = list(parse_config(cfg).config.weights or [])
    secrets = {"c": json.dumps({"aws_access_key_id": "AK", "aws_secret_access_key": "SK"})}
    times: dict[str, list[float]] = {"kingpost": [], "boto3": []}
    try:
        for r in range(2):
            mgr = WeightsManager(work / f"store-{r}")
            t0 = time.perf_counter()
            mgr.start("d", entries, secrets)
            while mgr.status("d").state not in (MirrorState.COMPLETE, MirrorState.FAILED):
                time.sleep(0.01)
            times["kingpost"].append(time.perf_counter() - t0)
            assert mgr.status("d").state == MirrorState.COMPLETE, mgr.status("d").error
            dest = work / f"boto-{r}"
            dest.mkdir()
            t0 = time.perf_counter()
            config = TransferConfig(max_concurrency=8, multipart_chunksize=8 * 1024 * 1024)
            for i in range(files):
                s3.download_file(
                    "bench", f"model/shard-{i}.safetensors", str(dest / f"shard-{i}"), Config=config
                )
            times["boto3"].append(time.perf_counter() - t0)
    finally:
        server.stop()
    k, b = min(times["kingpost"]), min(times["boto3"])
    return {"mb": total_mb, "kingpost_s": k, "boto3_s": b, "speed_ratio": b / k}


def materialize_case(work: Path, gb: int, files: int) -> dict[str, float]:
    store = BlobStore(work / "mat")
    size = gb * 1024**3 // files
    entries = {}
    for i in range(files):
        digest = hashlib.sha256(f"blob-{i}".encode()).hexdigest()
        path = store.blob_path(digest)
        path.parent.mkdir(exist_ok=True)
        with path.open("wb") as fh:
            fh.truncate(size)  # sparse: the link count, not the bytes, is what is timed
        entries[f"model-{i:05d}-of-{files:05d}.safetensors"] = (digest, size)
    m = Manifest("bench", "s3://bench/model", "x", entries)
    t0 = time.perf_counter()
    tree = store.tree(m)
    link_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    subprocess.run(["cp", "-r", str(tree), str(work / "copy")], check=True)
    cp_s = time.perf_counter() - t0
    return {"gb": gb, "files": files, "hardlink_ms": link_s * 1000, "cp_ms": cp_s * 1000}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mirror-mb", type=int, default=256)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--model-gb", type=int, default=5)
    ap.add_argument("--model-files", type=int, default=4)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kp-weights-bench-"))
    try:
        mat = materialize_case(work, args.model_gb, args.model_files)
        mir = mirror_case(work, args.mirror_mb, args.files)
    finally:
        for dirpath, _, _ in os.walk(work):
            os.chmod(dirpath, 0o755)
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"materialize a cached {mat['gb']} GB model ({int(mat['files'])} files): "
        f"hard-link tree {mat['hardlink_ms']:.2f} ms (target < 50), cp -r {mat['cp_ms']:.0f} ms"
    )
    print(
        f"mirror {mir['mb']} MB from moto S3: kingpost {mir['kingpost_s']:.2f} s, "
        f"boto3 transfer manager {mir['boto3_s']:.2f} s, ratio {mir['speed_ratio']:.2f} "
        "(>= 1.0 means Kingpost is as fast or faster)"
    )


if __name__ == "__main__":
    main()
