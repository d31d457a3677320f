"""Async inference: how fast the gateway accepts, and async end to end vs sync.

Starts a real ``kingpost server`` (process engine, SQLite) in a temporary home, pushes
``examples/echo-server`` (one replica, ``predict_concurrency: 8``) and measures:

1. **accept**: ``POST .../async_predict`` on a fixed schedule (open loop,
   ``bench/loadgen.c``) at ``--rate`` req/s for ``--seconds``: accepted req/s and the
   accept latency (p50/p99 counted from when each request was due). The workers run the
   accepted requests meanwhile, as they would.
2. **throughput**: the same replica called synchronously (wrk, closed loop, 8 connections:
   its predict slots) for ``--seconds``, then async requests enqueued at once (open loop
   at three times the sync rate, 2,000/s at least, until ``--seconds`` of the sync rate's
   requests are due: what the gateway accepted by then is the backlog) and the time
   until the last one SUCCEEDED (a marker queued after them, polled by id, then the
   counts once): completed req/s of each (async: the drain rate after the enqueue) and
   their ratio. With ``KINGPOST_ASYNC_SHARE=1`` here, so async may use every slot sync
   used (the default, 0.5, keeps half of them for sync predicts).

    .venv/bin/python bench/async.py [--rate 1000] [--seconds 5] [--json out.json]
        [--rounds 3] [--baseline-src OTHER/src]

``--baseline-src`` starts a second server from another source tree (``git archive REV
src | tar -x -C DIR``) beside this one; both are pushed, then each round measures both
(the order alternating per round), and the report gives per variant the median of the
rounds and their spread (min-max), and the ratios new/baseline of the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

from openloop import http_request  # noqa: E402
from openloop import run as openloop  # noqa: E402

from helpers.platform import Platform  # noqa: E402

SLOTS = 8
ENQUEUE_RATE = 2000.0
"""The least rate the throughput case enqueues at (three times the sync rate if more)."""
INPUT: dict[str, Any] = {"n": 1}


def push(platform: Platform, work: Path, model_ms: float) -> tuple[str, str]:
    project = work / "echo-bench"
    work.mkdir(parents=True, exist_ok=True)
    if model_ms:  # a model that works: the test model sleeping model_ms per predict
        shutil.copytree(REPO / "tests" / "fixtures" / "models" / "async_worker", project)
        config = project / "config.yaml"
        text = config.read_text().replace("predict_concurrency: 1", f"predict_concurrency: {SLOTS}")
        config.write_text(text)  # its call log stays in the replica's own directory
    else:
        shutil.copytree(REPO / "examples" / "echo-server", project)
    out = platform.cli("push", str(project), "--wait", "--output", "json")
    if out.returncode != 0:
        raise SystemExit(out.stdout + out.stderr)
    pushed = json.loads(out.stdout)
    return pushed["model"]["id"], pushed["deployment"]["id"]


def accept_request(platform: Platform, model: str) -> bytes:
    body = json.dumps({"model_input": INPUT}).encode()
    return http_request(
        f"/models/{model}/production/async_predict",
        body,
        {"Authorization": f"Api-Key {platform.api_key}", "Content-Type": "application/json"},
    )


def accept(platform: Platform, model: str, rate: float, seconds: float) -> dict[str, Any]:
    req = accept_request(platform, model)
    got = openloop(platform.gateway_port, req, rate=rate, connections=16, seconds=seconds)
    keys = ("completed", "rate", "p50", "p90", "p99", "max", "non2xx", "errors")
    return {k: got.get(k) for k in keys}


def sync_rps(platform: Platform, model: str, seconds: float) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as lua:
        lua.write(
            f"wrk.method = \"POST\"\nwrk.body = '{json.dumps(INPUT)}'\n"
            'wrk.headers["Content-Type"] = "application/json"\n'
            f'wrk.headers["Authorization"] = "Api-Key {platform.api_key}"\n'
        )
    url = f"{platform.gateway_url}/models/{model}/production/predict"
    out = subprocess.run(
        ["wrk", "-t1", f"-c{SLOTS}", f"-d{max(int(seconds), 1)}s", "-s", lua.name, url],
        capture_output=True,
        text=True,
        check=True,
    )
    line = next(x for x in out.stdout.splitlines() if x.startswith("Requests/sec"))
    return float(line.split()[1])


def total(gw: httpx.Client, model: str, dep: str) -> int:
    counts = gw.get(f"/models/{model}/deployment/{dep}/async_queue_status").json()["counts"]
    return sum(int(v) for v in counts.values())


def succeeded(gw: httpx.Client, model: str, dep: str) -> int:
    counts = gw.get(f"/models/{model}/deployment/{dep}/async_queue_status").json()["counts"]
    return int(counts["SUCCEEDED"])


def async_rps(platform: Platform, model: str, dep: str, n: int, rate: float) -> dict[str, float]:
    """``n`` async requests due at once (open loop at ``rate``, well above what the
    workers drain, so a backlog builds; those the gateway had not taken by the last one's
    due time are not sent), then the time until the last SUCCEEDED. ``async_rps``: the
    queue's drain rate after the enqueue ended (what the workers and replicas sustain;
    what ran during the enqueue is left out of both count and time);
    ``async_rps_with_enqueue``: all of them over the whole time."""
    req = accept_request(platform, model)
    with platform.gateway() as gw:
        before, before_all = succeeded(gw, model, dep), total(gw, model, dep)
        start = time.monotonic()
        openloop(platform.gateway_port, req, rate=rate, connections=16, seconds=n / rate, warmup=0)
        enqueued = time.monotonic()
        done_then = succeeded(gw, model, dep) - before
        # Requests still unanswered when the generator stopped are accepted all the same:
        # count what the queue holds once it settles, not what the generator saw answered.
        sent, settle = -1, time.monotonic() + 10
        while time.monotonic() < settle:
            time.sleep(0.3)
            now_total = total(gw, model, dep) - before_all
            if now_total == sent:
                break
            sent = now_total
        # The end: a marker queued after the others (same priority, so it runs last) has
        # run, then nothing is left. Polled by id, a point read: the queue status counts
        # every request the deployment kept (15 ms at 100,000), and polled every 50 ms
        # it took the gateway's CPU from the workers' runs.
        marker = gw.post(
            f"/models/{model}/production/async_predict", json={"model_input": INPUT}
        ).json()["request_id"]
        deadline = start + 120

        def give_up(why: str) -> None:
            counts = gw.get(f"/models/{model}/deployment/{dep}/async_queue_status").json()
            raise SystemExit(f"async requests did not all succeed ({why}): {counts}")

        while (got := gw.get(f"/models/{model}/async_request/{marker}").json())["status"] != (
            "SUCCEEDED"
        ):
            if got["status"] in ("FAILED", "EXPIRED", "CANCELED", "WEBHOOK_FAILED"):
                give_up(f"the marker ended {got['status']}")
            if time.monotonic() > deadline:
                give_up("120 s")
            time.sleep(0.02)
        while succeeded(gw, model, dep) < before + sent + 1:
            if time.monotonic() > deadline:
                give_up("120 s")
            time.sleep(0.02)
        end = time.monotonic()
    return {
        "async_rps": (sent + 1 - done_then) / (end - enqueued),
        "async_rps_with_enqueue": (sent + 1) / (end - start),
        "async_requests": sent,
        "async_enqueue_s": enqueued - start,
    }


def drain(platform: Platform, model: str, dep: str) -> None:
    """Wait until the accepted backlog has run."""
    with platform.gateway() as gw:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            qs = gw.get(f"/models/{model}/deployment/{dep}/async_queue_status").json()
            if qs["num_queued_requests"] + qs["num_in_progress_requests"] == 0:
                return
            time.sleep(0.2)


def one_round(platform: Platform, model: str, dep: str, args: argparse.Namespace) -> dict[str, Any]:
    acc = {} if args.skip_accept else accept(platform, model, args.rate, args.seconds)
    drain(platform, model, dep)
    sync = sync_rps(platform, model, args.seconds)
    n = max(int(sync * args.seconds), 100)
    # At a fixed 2,000/s, a machine whose workers drain as fast left no backlog: the drain
    # measured the enqueue (and the polls after it), not the workers.
    got = async_rps(platform, model, dep, n, max(ENQUEUE_RATE, 3 * sync))
    return {
        "accept": acc,
        "sync_rps": round(sync, 1),
        **{k: round(v, 2) for k, v in got.items()},
        "async_over_sync": round(got["async_rps"] / sync, 3),
    }


def summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per figure: the median of the rounds and their spread (min, max)."""
    figures: dict[str, list[float]] = {}
    for r in rounds:
        for key in ("p50", "p99", "rate"):
            value = r["accept"].get(key)
            if value is not None:
                figures.setdefault(f"accept_{key}", []).append(float(value))
        for key in ("sync_rps", "async_rps", "async_rps_with_enqueue", "async_over_sync"):
            figures.setdefault(key, []).append(float(r[key]))
    return {
        k: {"median": round(statistics.median(v), 4), "min": min(v), "max": max(v)}
        for k, v in figures.items()
    }


def main() -> None:
    # A SIGTERM (timeout(1)) ends the run through its finally: the server is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    p = argparse.ArgumentParser()
    p.add_argument("--rate", type=float, default=1000.0)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--baseline-src", type=Path, help="another tree's src/ to run beside")
    p.add_argument("--json", type=Path)
    p.add_argument(
        "--model-ms",
        type=float,
        default=0.0,
        help="a model that takes this long per predict (tests/fixtures/models/async_worker) "
        "instead of the echo server, so the replica, not the platform, bounds throughput",
    )
    p.add_argument("--skip-accept", action="store_true")
    args = p.parse_args()
    if args.model_ms:
        INPUT.update(sleep=args.model_ms / 1000)
    variants: dict[str, dict[str, str]] = {"new": {}}
    if args.baseline_src is not None:
        src = str(args.baseline_src.resolve())
        variants = {"baseline": {"PYTHONPATH": src}, "new": {}}
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory(prefix="kp-bench-async-") as tmp:
        work = Path(tmp)
        platforms: dict[str, tuple[Platform, str, str]] = {}
        try:
            for name, env in variants.items():
                # Exact counts on every read: the benchmark counts what ran by them.
                extra = {"KINGPOST_ASYNC_SHARE": "1", "KINGPOST_ASYNC_COUNTS_REFRESH": "0", **env}
                platform = Platform(work / name, extra_env=extra)
                if "PYTHONPATH" not in env:
                    platform.env.pop("PYTHONPATH", None)
                platforms[name] = (
                    platform.start(),
                    *push(platform, work / f"{name}-project", args.model_ms),
                )
            for i in range(args.rounds):
                order = list(platforms) if i % 2 == 0 else list(reversed(platforms))
                for name in order:
                    platform, model, dep = platforms[name]
                    results[name].append(one_round(platform, model, dep, args))
                    print(name, json.dumps(results[name][-1]), file=sys.stderr, flush=True)
        finally:
            for platform, _, _ in platforms.values():
                platform.stop()
    report: dict[str, Any] = {
        "model_ms": args.model_ms,
        "rate": args.rate,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "load_average": os.getloadavg(),
        "variants": {name: {"summary": summary(r), "rounds": r} for name, r in results.items()},
    }
    if "baseline" in results:
        base, new = report["variants"]["baseline"]["summary"], report["variants"]["new"]["summary"]
        report["new_over_baseline"] = {
            k: round(new[k]["median"] / base[k]["median"], 3)
            for k in new
            if k in base and base[k]["median"]
        }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
