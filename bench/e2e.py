"""End-to-end benchmark: client -> Kingpost's gateway -> Kingpost's model server, against
the same model server called directly.

The path users call (``/models/.../predict`` through ``kingpost server``) costs the gateway
and the replica together; this measures what the gateway adds to a real model server, not
to nginx (``bench/gateway.py`` does that). Both processes run pinned to one core (core 0
by default), as a one-core box would run them; wrk runs on another. Every round runs
direct and end to end back to back, so the machine's drift lands in both; the report
gives each round's ratio, their median and spread, and each process's CPU time per
request (``/proc/PID/task/*/schedstat``) and context switches per request.

The model is a trivial echo (``predict`` returns its input). It is served once per
``predict_concurrency`` asked for (default 1 and 8), and the gateway's table gives the
replica the same concurrency, as the controller does.

    .venv/bin/python bench/e2e.py [--duration 4] [--rounds 5] [--concurrency 1 8]
        [--connections 16] [--baseline-src OTHER/src] [--json out.json]

With ``--baseline-src`` a second gateway, run from another source tree (e.g. a
``git worktree`` of the commit before a change), is measured in the same rounds, in front
of the same model server: before and after a change in one run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from gateway import Procs, free_port, wait_port, wrk  # noqa: E402
from model_server import BODY, ECHO_MODEL  # noqa: E402
from model_server import PATH as DIRECT_PATH  # noqa: E402

from kingpost.gateway.control import push_table  # noqa: E402
from kingpost.gateway.table import (  # noqa: E402
    DeploymentRoute,
    DeploymentState,
    ModelRoute,
    RoutingTable,
    Upstream,
)

KEY = "kp_bench_key"
GATEWAY_PATH = "/models/bench/environments/production/predict"


def cpu_and_switches(pid: int) -> tuple[float, int]:
    """CPU seconds a process's threads have used so far (the scheduler's own count; the
    model server runs predict on threads, which ``/proc/PID/schedstat`` alone leaves out),
    and their context switches, voluntary or not."""
    cpu, switches = 0.0, 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            cpu += int((task / "schedstat").read_text().split()[0]) / 1e9
            for line in (task / "status").read_text().splitlines():
                if "ctxt_switches:" in line:
                    switches += int(line.split()[1])
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that ended meanwhile
    return cpu, switches


def model_app(work: Path, concurrency: int) -> Path:
    app = work / f"app-c{concurrency}"
    (app / "model").mkdir(parents=True)
    (app / "model" / "model.py").write_text(ECHO_MODEL)
    (app / "config.yaml").write_text(
        f"model_name: echo\nruntime:\n  predict_concurrency: {concurrency}\n"
    )
    return app


def table(port: int, concurrency: int) -> RoutingTable:
    """One model, its production environment on one deployment with one replica: what the
    controller pushes for a deployment of this project (concurrency from its config)."""
    return RoutingTable(
        version=1,
        models={"mb": ModelRoute("mb", "bench", {"production": (("db", 1.0),)})},
        model_names={"bench": "mb"},
        deployments={
            "db": DeploymentRoute(
                "db",
                "mb",
                DIRECT_PATH,
                DeploymentState.SERVING,
                (Upstream("r0", "127.0.0.1", port),),
                concurrency=concurrency,
            )
        },
        api_key_hashes=frozenset({hashlib.sha256(KEY.encode()).hexdigest()}),
    )


def wait_ready(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/v1/models/model", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"{url} never became ready")


def lua(work: Path, name: str, auth: bool) -> Path:
    script = work / f"{name}.lua"
    lines = ['wrk.method = "POST"', f"wrk.body = '{BODY}'"]
    lines.append('wrk.headers["Content-Type"] = "application/json"')
    if auth:
        lines.append(f'wrk.headers["Authorization"] = "Api-Key {KEY}"')
    script.write_text("\n".join(lines) + "\n")
    return script


def measure(
    url: str, script: Path, args: argparse.Namespace, pids: dict[str, int]
) -> dict[str, float]:
    """One wrk run, with each named process's CPU time and context switches per answered
    request."""
    before = {name: cpu_and_switches(pid) for name, pid in pids.items()}
    r = wrk(url, args.duration, args.connections, script, core=args.client_core)
    answered = max(1.0, r["rps"] * int(args.duration))
    for name, pid in pids.items():
        cpu, switches = cpu_and_switches(pid)
        r[f"cpu_us_{name}"] = (cpu - before[name][0]) / answered * 1e6
        r[f"switches_{name}"] = (switches - before[name][1]) / answered
    return r


def run_one(args: argparse.Namespace, work: Path, concurrency: int) -> dict[str, Any]:
    procs = Procs()
    core = str(args.server_core)
    try:
        app = model_app(work, concurrency)
        mport, gport = free_port(), free_port()
        env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
        server_cmd = [sys.executable, "-m", "kingpost.server", "--app-dir", str(app)]
        server_cmd += ["--port", str(mport), "--host", "127.0.0.1"]
        server = procs.start(["taskset", "-c", core, *server_cmd], env=env)
        control = work / f"gw-c{concurrency}.sock"
        gw_cmd = [sys.executable, "-m", "kingpost.gateway", "--port", str(gport)]
        gw_cmd += ["--control-socket", str(control), "--workers", "1"]
        gateway = procs.start(["taskset", "-c", core, *gw_cmd], env=env)
        controls = [control]
        base = None
        if args.baseline_src is not None:
            bport, bcontrol = free_port(), work / f"base-c{concurrency}.sock"
            base_cmd = [sys.executable, "-m", "kingpost.gateway", "--port", str(bport)]
            base_cmd += ["--control-socket", str(bcontrol), "--workers", "1"]
            base_env = {**os.environ, "PYTHONPATH": str(args.baseline_src.resolve())}
            base = procs.start(["taskset", "-c", core, *base_cmd], env=base_env)
            controls.append(bcontrol)
            wait_port(bport)
        wait_port(mport)
        wait_port(gport)
        wait_ready(f"http://127.0.0.1:{mport}")
        for sock in controls:
            deadline = time.monotonic() + 10
            while not sock.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            push_table(sock, table(mport, concurrency))
        plain, authed = lua(work, "direct", False), lua(work, "e2e", True)
        targets = {
            "direct": (f"http://127.0.0.1:{mport}{DIRECT_PATH}", plain, gateway.pid),
            "e2e": (f"http://127.0.0.1:{gport}{GATEWAY_PATH}", authed, gateway.pid),
        }
        if base is not None:
            targets["base"] = (f"http://127.0.0.1:{bport}{GATEWAY_PATH}", authed, base.pid)
        for url, script, _pid in targets.values():  # warm up every path
            r = wrk(url, 1, args.connections, script, core=args.client_core)
            if r["errors"]:
                raise SystemExit(f"{url}: {r['errors']:.0f} non-2xx answers in the warm-up")
        rounds: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
        for _ in range(args.rounds):
            for name, (url, script, pid) in targets.items():
                pids = {"server": server.pid, "gateway": pid}
                rounds[name].append(measure(url, script, args, pids))
        return {"concurrency": concurrency, "rounds": rounds}
    finally:
        procs.stop()


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(
        f"\nEnd to end {time.strftime('%Y-%m-%d %H:%M')}: echo model, wrk -c{args.connections}, "
        f"{args.duration:g}s x {args.rounds} rounds; gateway and model server on core "
        f"{args.server_core}, wrk on core {args.client_core}"
    )
    for res in results:
        d, e = res["rounds"]["direct"], res["rounds"]["e2e"]
        b = res["rounds"].get("base", [])
        ratios = [y["rps"] / x["rps"] for x, y in zip(d, e, strict=True)]
        errors = sum(r["errors"] for r in d + e + b)

        def med(runs: list[dict[str, float]], key: str) -> float:
            return statistics.median(r[key] for r in runs)

        print(f"\npredict_concurrency {res['concurrency']}:")
        print(
            "| path | req/s, median | per round | p50 ms | p99 ms | CPU us/req server | gateway "
            "| switches/req server | gateway |"
        )
        print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        paths = [("direct", d), ("end to end", e)] + ([("baseline", b)] if b else [])
        for name, runs in paths:
            each = ", ".join(f"{r['rps']:.0f}" for r in runs)
            print(
                f"| {name} | {med(runs, 'rps'):.0f} | {each} | {med(runs, 'p50'):.3f} | "
                f"{med(runs, 'p99'):.3f} | {med(runs, 'cpu_us_server'):.1f} | "
                f"{med(runs, 'cpu_us_gateway'):.1f} | {med(runs, 'switches_server'):.2f} | "
                f"{med(runs, 'switches_gateway'):.2f} |"
            )
        print(
            "end to end / direct per round: "
            + ", ".join(f"{x:.2f}" for x in ratios)
            + f"; median {statistics.median(ratios):.2f} (min {min(ratios):.2f}, max "
            f"{max(ratios):.2f}; target >= 0.60)"
            + (f"; {errors:.0f} non-2xx answers" if errors else "")
        )
        if b:
            before = [y["rps"] / x["rps"] for x, y in zip(d, b, strict=True)]
            after = [y["rps"] / x["rps"] for x, y in zip(b, e, strict=True)]
            print(
                "baseline / direct per round: "
                + ", ".join(f"{x:.2f}" for x in before)
                + f"; median {statistics.median(before):.2f}"
            )
            print(
                "end to end / baseline per round: "
                + ", ".join(f"{x:.2f}" for x in after)
                + f"; median {statistics.median(after):.2f}"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--server-core", type=int, default=0)
    ap.add_argument("--client-core", type=int, default=1)
    ap.add_argument(
        "--baseline-src",
        type=Path,
        help="another tree's src/ to run a second gateway from, measured in the same rounds",
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="kp-e2e-") as tmp:
        results = [run_one(args, Path(tmp), c) for c in args.concurrency]
    report(results, args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
