"""Scaling under load: open-loop load stepping 1x -> 10x -> 1x the concurrency target of one
replica, on the process engine, against examples/echo-server's streaming route (each
request is held ``--hold`` seconds by the server, so concurrency = rate x hold).

    .venv/bin/python bench/autoscale.py [--phase 20] [--hold 0.2] [--json out.json]

Reports the time from the step to the autoscaler's decision and to the new replicas
serving, p50/p99 latency (from each request's scheduled time, so waiting counts) before,
during and after the step, requests failed (must be 0), and replica-seconds used against
the minimum the load needed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import itertools

from cold_start import EXAMPLES, Server, pct

TARGET = 2
"""concurrency_target, and the replicas' predict_concurrency: a replica takes no more."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phase", type=float, default=20.0, help="seconds per load phase")
    ap.add_argument("--hold", type=float, default=0.2, help="seconds each request takes")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    hold_n = max(1, round(args.hold / 0.02))  # the stream sends one event per 20 ms
    # 1x: 80% of one replica's concurrency target in flight on average (at 100% a ceil()
    # of a noisy average flips between one and two replicas).
    base_rate = 0.8 * TARGET / args.hold
    with tempfile.TemporaryDirectory(prefix="kp-autoscale-") as tmp:
        srv = Server(Path(tmp) / "home")
        try:
            report = run(srv, Path(tmp), args.phase, hold_n, base_rate)
        finally:
            srv.stop()
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


def run(srv: Server, tmp: Path, phase: float, hold_n: int, base_rate: float) -> dict[str, Any]:
    project = tmp / "echo-server"
    shutil.copytree(EXAMPLES / "echo-server", project)
    config = (project / "config.yaml").read_text()
    config = config.replace("predict_concurrency: 8", f"predict_concurrency: {TARGET}")
    (project / "config.yaml").write_text(config)
    pushed = json.loads(srv.cli("push", str(project), "--wait", "--output", "json"))
    model, dep = pushed["model"]["id"], pushed["deployment"]["id"]
    srv.cli(
        "autoscaling", "set", "echo-server", "--deployment", dep, "--min-replica", "1",
        "--max-replica", "12", "--concurrency-target", str(TARGET),
        "--target-utilization-percentage", "100", "--autoscaling-window", "10",
        "--scale-down-delay", "10",
    )  # fmt: skip
    phases = [("before", 1.0), ("during", 10.0), ("after", 1.0)]
    results: list[tuple[str, float, float, int]] = []  # phase, due, latency, status
    lock = threading.Lock()
    counts: list[tuple[float, int, int]] = []  # time, wanted, ready
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            d = srv.deployment(dep)
            counts.append(
                (time.monotonic(), d.get("replicas_wanted") or 0, d.get("replicas_ready") or 0)
            )
            stop.wait(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    path = f"/models/{model}/deployment/{dep}/sync/stream?n={hold_n}"
    local = threading.local()  # a client per thread: one shared by 256 threads lost fds

    def client() -> httpx.Client:
        if not hasattr(local, "client"):
            local.client = httpx.Client(
                base_url=str(srv.gateway.base_url), headers=srv.gateway.headers, timeout=120
            )
        return local.client

    def call(name: str, due: float) -> None:
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        try:
            r = client().get(path)
            status = r.status_code
            if status != 200:
                print(f"  {name}: {status} {r.text[:200]}", file=sys.stderr)
        except Exception as exc:
            status = 0
            print(f"  {name}: no answer: {exc!r}", file=sys.stderr)
        with lock:
            results.append((name, due, time.monotonic() - due, status))

    step_at = 0.0
    with concurrent.futures.ThreadPoolExecutor(256) as pool:
        t = time.monotonic() + 0.5
        for name, factor in phases:
            if name == "during":
                step_at = t
            end, interval = t + phase, 1.0 / (base_rate * factor)
            while t < end:
                pool.submit(call, name, t)
                t += interval
        pool.shutdown(wait=True)
    time.sleep(1.0)
    stop.set()
    watcher.join()
    at_step = max((c[1] for c in counts if c[0] < step_at), default=1)
    decided = next((c[0] - step_at for c in counts if c[0] >= step_at and c[1] > at_step), None)
    peak = max(c[1] for c in counts)
    serving = next((c[0] - step_at for c in counts if c[0] >= step_at and c[2] >= peak), None)
    report: dict[str, Any] = {
        "step_to_decision_s": decided,
        "step_to_replicas_serving_s": serving,
        "replicas_before_step": at_step,
        "peak_replicas_wanted": peak,
        "failed": sum(1 for r in results if r[3] != 200),
        "requests": len(results),
    }
    for name, _ in phases:
        lat = [r[2] for r in results if r[0] == name]
        report[f"{name}_p50_ms"] = round(pct(lat, 0.5) * 1000, 1)
        report[f"{name}_p99_ms"] = round(pct(lat, 0.99) * 1000, 1)
    used = sum((b[0] - a[0]) * max(a[2], 1) for a, b in itertools.pairwise(counts))
    needed = sum(math.ceil(0.8 * f) * phase for _, f in phases)  # demand / target, rounded up
    report["replica_seconds_used"] = round(used, 1)
    report["replica_seconds_needed"] = needed
    return report


if __name__ == "__main__":
    main()
