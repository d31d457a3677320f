"""Rolling promotion benchmark: open-loop load through the gateway while a 4-replica
deployment is replaced by another, 25% at a time.

Starts a `kingpost server` (process engine) in a temporary home, deploys the tests'
stdlib rollout server (`tests/fixtures/models/rollout`, 20 ms per request) as v1 with 4
replicas, then:

  1. measures latency under `--rate` req/s for `--seconds` (bench/loadgen.c, open loop);
  2. times one fresh replica's start (a 1-replica deployment of the same project);
  3. runs the same load while v2 (4 replicas) is promoted with max_surge_percent 25 and
     `--stabilization` seconds, and reports requests sent, failed (non-2xx, errors; must
     be 0), p99 during the rollout over p99 before it (target <= 2), and the rollout's
     duration over the sum of what its steps must wait for: 4 x (replica start +
     stabilization) (target <= 1.2).

    python bench/rollout.py [--rate 300] [--seconds 10] [--stabilization 2] [--json out]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "tests"))

import openloop  # noqa: E402

from helpers.platform import Platform, wait_for  # noqa: E402

FIXTURE = REPO / "tests" / "fixtures" / "models" / "rollout"
MODEL = "rollout-bench"
PATH = f"/models/{MODEL}/environments/production/predict"
REPLICAS = 4


def project(root: Path, version: str) -> Path:
    out = root / version
    shutil.copytree(FIXTURE, out)
    (out / "VERSION").write_text(version)
    return out


def load(platform: Platform, rate: float, seconds: float) -> dict[str, Any]:
    request = openloop.http_request(PATH, b"{}", {"Authorization": f"Api-Key {platform.api_key}"})
    return openloop.run(platform.gateway_port, request, rate=rate, connections=32,
                        seconds=seconds, warmup=1.0)  # fmt: skip


def replica_start_s(platform: Platform, root: Path) -> float:
    """How long one fresh replica of the project takes to be ready, as the platform sees
    it (push answered -> ACTIVE), passes of the loop included."""
    with platform.client() as c:
        began = time.monotonic()
        dep = c.push(project(root, "probe"), model_name=f"{MODEL}-probe")["deployment"]["id"]
        platform.wait_status(dep, "ACTIVE")
        return time.monotonic() - began


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rate", type=float, default=300.0)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--stabilization", type=float, default=2.0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    openloop.ensure_built()
    with tempfile.TemporaryDirectory(prefix="kp-bench-rollout-") as tmp:
        root = Path(tmp)
        platform = Platform(root / "home").start()
        try:
            report = run(platform, root, args)
        finally:
            platform.stop()
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


def run(platform: Platform, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    with platform.client() as c:
        v1 = c.push(project(root, "v1"), model_name=MODEL, min_replicas=REPLICAS,
                    max_replicas=REPLICAS)["deployment"]["id"]  # fmt: skip
        platform.wait_status(v1, "ACTIVE")
        c.update_environment(MODEL, "production", {
            "rolling_deploy": True,
            "rolling_deploy_config": {
                "max_surge_percent": 25,
                "stabilization_time_seconds": args.stabilization,
            },
        })  # fmt: skip
    time.sleep(2)  # every v1 replica ready and in the table
    before = load(platform, args.rate, args.seconds)
    start_s = replica_start_s(platform, root)
    expected = REPLICAS * (start_s + args.stabilization)
    window = expected * 1.5 + 6
    during: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: during.update(load(platform, args.rate, window)))
    runner.start()
    time.sleep(2.0)
    with platform.client() as c:
        c.push(project(root, "v2"), model_name=MODEL, environment="production",
               min_replicas=REPLICAS, max_replicas=REPLICAS)  # fmt: skip

        began = time.monotonic()
        timeline: list[str] = []
        last = [""]

        def finished() -> dict[str, Any] | None:
            r = c.promotion(MODEL, "production")
            line = (
                f"{r['status']} step {r['step']} {r['phase']} {r['candidate_traffic_percent']:g}%"
            )
            if line != last[0]:
                last[0] = line
                timeline.append(f"{time.monotonic() - began:6.2f} {line}")
            return r if r["status"] in ("SUCCEEDED", "FAILED", "CANCELED") else None

        done = wait_for(finished, window, "the rollout to finish")
    runner.join()
    took = (
        datetime.fromisoformat(done["finished_at"]) - datetime.fromisoformat(done["created_at"])
    ).total_seconds()
    failed = int(during["non2xx"]) + int(during["errors"])
    return {
        "rate": args.rate,
        "stabilization_s": args.stabilization,
        "rollout_status": done["status"],
        "sent": during["answered"] + during["errors"],
        "failed": failed,
        "p99_before_ms": before["p99"],
        "p99_during_ms": during["p99"],
        "p99_ratio": round(during["p99"] / before["p99"], 2) if before["p99"] else None,
        "replica_start_s": round(start_s, 2),
        "rollout_s": round(took, 2),
        "expected_s": round(expected, 2),
        "duration_ratio": round(took / expected, 2),
        "timeline": timeline,
        "before": before,
        "during": during,
    }


if __name__ == "__main__":
    main()
