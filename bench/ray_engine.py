"""The Ray engine against the process engine: gateway throughput and replica start time.

Starts the Ray engine's test cluster (``tests/helpers/raycluster.py``: each node in a
network namespace of its own, joined by a bridge; needs root and iproute2), then, for each
engine in turn, a `kingpost server` in the head's namespace with the same
examples/echo-server deployment of ``--replicas`` replicas (the Ray engine spreads them
over the nodes; the process engine runs them beside the server). Per engine:

- start time: push to all replicas ready (the Ray engine's includes placing the actors,
  unpacking the project on each node and the forwarder's hop being set up);
- throughput: ``wrk`` through the gateway, ``--rounds`` rounds of ``--seconds`` each, the
  median and the spread (min..max).

The ratio ray/process is the cost of the extra hop (the node's forwarder) and of the
replicas sharing one machine's two cores with Ray's own processes here.

    sudo .venv/bin/python bench/ray_engine.py [--replicas 3] [--seconds 5] [--rounds 3]
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "tests"))

from helpers import raycluster  # noqa: E402
from helpers.platform import EXAMPLES, Platform, wait_for  # noqa: E402

NODES = ["kpb-ray-n2", "kpb-ray-n3", "kpb-ray-n4"]
"""The nodes' network namespaces, the head's first (both servers run there)."""
LEAN = "resources:\n  cpu: 500m\n  memory: 128Mi\n"
CONNECTIONS = 8


def wrk_rps(platform: Platform, model: str, seconds: float, work: Path) -> float:
    lua = work / "post.lua"
    lua.write_text(
        'wrk.method = "POST"\nwrk.body = \'{"n": 1}\'\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Api-Key {platform.api_key}"\n'
    )
    url = f"{platform.gateway_url}/models/{model}/production/predict"
    out = subprocess.run(
        ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{max(int(seconds), 1)}s", "-s", str(lua), url],
        capture_output=True,
        text=True,
        check=True,
    )
    if "Non-2xx" in out.stdout:
        raise SystemExit(f"wrk saw failed requests:\n{out.stdout}")
    line = next(x for x in out.stdout.splitlines() if x.startswith("Requests/sec"))
    return float(line.split()[1])


def run_engine(
    engine: str, work: Path, env: dict[str, str], head: tuple[str, str], args: argparse.Namespace
) -> dict[str, Any]:
    project = work / f"echo-{engine}"
    shutil.copytree(EXAMPLES / "echo-server", project)
    cfg = project / "config.yaml"
    cfg.write_text(cfg.read_text() + LEAN)
    platform = Platform(work / f"home-{engine}", engine=engine, extra_env=env, netns=head).start()
    try:
        with platform.client() as c:
            start = time.monotonic()
            pushed = c.push(project, min_replicas=args.replicas)
            model, dep = pushed["model"]["id"], pushed["deployment"]["id"]
            wait_for(
                lambda: c.deployment(dep)["replicas_ready"] == args.replicas,
                180,
                f"{args.replicas} ready replicas on the {engine} engine",
            )
            start_s = time.monotonic() - start
        wrk_rps(platform, model, 1, work)  # warm the gateway's connections
        rounds = [wrk_rps(platform, model, args.seconds, work) for _ in range(args.rounds)]
    finally:
        platform.stop()
        raycluster.kill_replicas(work / "nodes")
    return {
        "start_s": round(start_s, 2),
        "rps_median": round(statistics.median(rounds), 1),
        "rps_spread": [round(min(rounds), 1), round(max(rounds), 1)],
    }


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    p = argparse.ArgumentParser()
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--nodes", type=int, default=3, choices=(1, 2, 3), help="head plus workers")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespaces for the Ray nodes)")
    root = Path(f"/tmp/kpb-ray-{os.getpid()}")
    names = NODES[: args.nodes]
    raycluster.network_down(NODES)
    raycluster.network_up(names)
    cluster = None
    try:
        cluster = raycluster.start_cluster(root, names)
        head = (cluster.nodes[0].netns, cluster.nodes[0].ip)
        with tempfile.TemporaryDirectory(prefix="kp-bench-ray-") as tmp:
            work = Path(tmp)
            env = {
                **raycluster.ray_env(),
                "KINGPOST_RAY_ADDRESS": cluster.address,
                "KINGPOST_RAY_NODE_DIR": str(work / "nodes"),
            }
            process = run_engine("process", work, env, head, args)
            ray = run_engine("ray", work, env, head, args)
    finally:
        if cluster is not None:
            cluster.stop()
        raycluster.network_down(NODES)
        shutil.rmtree(root, ignore_errors=True)
    report = {
        "replicas": args.replicas,
        "nodes": args.nodes,
        "connections": CONNECTIONS,
        "process": process,
        "ray": ray,
        "rps_ray_over_process": round(ray["rps_median"] / process["rps_median"], 3),
        "start_ray_over_process": round(ray["start_s"] / process["start_s"], 2),
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
