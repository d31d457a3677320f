"""Gateway benchmark: Kingpost's gateway beside direct calls, nginx and Ray Serve.

Runs everything on this machine in one run, alternating targets each round:

  (a) direct   the upstream itself (nginx answering a 1 KB JSON body)
  (b) nginx    nginx as a keep-alive reverse proxy, one worker
  (c) kingpost `python -m kingpost.gateway`, one worker, routing
               /models/bench/environments/production/predict via a pushed table,
               with auth, request ids and concurrency limits on
  (d) ray      Ray Serve's HTTP proxy in front of a no-op deployment (if installable)

Servers under test are pinned to core 0, the load generator and upstream to core 1
(`taskset`). Saturation: `wrk -t1 -c64`. Latency at 50% of Kingpost's peak, and the
same offered load over 1 and over 256 connections: bench/loadgen.c, open loop. Also a
streaming case (SSE, 100 chunks), a 1 MB request body case, and the gateway with two
workers on both cores.

    python bench/gateway.py [--duration 5] [--rounds 2] [--no-ray] [--json out.json]
        [--src TREE/src] [--baseline-src OTHER/src]

``--baseline-src`` adds a second Kingpost gateway, run from another source tree (a ``git
worktree`` of an older commit), as the target ``baseline`` in every phase: before and
after a change measured in the same rounds. ``--src`` runs the gateway under test from
another tree than this one.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
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

import openloop  # noqa: E402

from kingpost.gateway.control import control_socket_paths, push_table  # noqa: E402
from kingpost.gateway.table import (  # noqa: E402
    DeploymentRoute,
    DeploymentState,
    ModelRoute,
    RoutingTable,
    Upstream,
)

KEY = "kp_bench_key"
PAYLOAD = json.dumps({"data": "x" * 1000})[:1024]
PATH = "/models/bench/environments/production/predict"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pinned(core: int, cmd: list[str]) -> list[str]:
    return ["taskset", "-c", str(core), *cmd] if shutil.which("taskset") else cmd


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


class Procs:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, cmd: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, **kw
        )
        self.procs.append(p)
        return p

    def stop_one(self, p: subprocess.Popen[bytes]) -> None:
        """Stop one process group (the process and everything it started)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        self.procs.remove(p)

    def stop(self) -> None:
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


def nginx_conf(work: Path, name: str, port: int, body: str) -> Path:
    root = work / name
    root.mkdir()
    conf = root / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
daemon off;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {root}/body;
  proxy_temp_path {root}/proxy;
  client_max_body_size 8m;
  keepalive_requests 1000000;
  {body.replace("PORT", str(port))}
}}
""")
    return conf


UPSTREAM_HTTP = """
  server {
    listen 127.0.0.1:PORT;
    location /sse { proxy_pass http://127.0.0.1:SSEPORT; proxy_buffering off; proxy_http_version 1.1; }
    location / { default_type application/json; client_body_buffer_size 2m; return 200 'BODY'; }
  }
"""

PROXY_HTTP = """
  upstream up { server 127.0.0.1:UPPORT; keepalive 128; }
  server {
    listen 127.0.0.1:PORT;
    location / {
      proxy_pass http://up;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_request_buffering off;
    }
  }
"""

SSE_SERVER = r"""
import socket, sys, threading, time
def serve(conn):
    f = conn.makefile("rb")
    try:
        while True:
            line = f.readline()
            if not line: return
            while f.readline() not in (b"\r\n", b""): pass
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            for i in range(100):
                ev = b"data: %d\n\n" % i
                conn.sendall(b"%x\r\n%s\r\n" % (len(ev), ev))
                time.sleep(0.001)
            conn.sendall(b"0\r\n\r\n")
    except OSError:
        pass
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(64)
while True:
    c, _ = s.accept(); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

RAY_APP = """
import sys, time
from ray import serve
import ray
ray.init(num_cpus=1, include_dashboard=False)
serve.start(http_options={"host": "127.0.0.1", "port": int(sys.argv[1])})
BODY = sys.argv[2]
@serve.deployment(num_replicas=1)
class Noop:
    async def __call__(self, request):
        return BODY
serve.run(Noop.bind(), route_prefix=sys.argv[3])
print("ready", flush=True)
while True:
    time.sleep(3600)
"""


def wrk(url: str, seconds: float, conns: int, script: Path, core: int = 1) -> dict[str, float]:
    proc = subprocess.run(
        pinned(
            core,
            ["wrk", "-t1", f"-c{conns}", f"-d{int(seconds)}s", "--latency", "-s", str(script), url],
        ),
        capture_output=True,
        text=True,
        timeout=seconds + 30,
    )
    out = proc.stdout
    found = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if found is None:
        raise RuntimeError(f"wrk against {url} failed:\n{out}\n{proc.stderr}")
    rps = float(found.group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    lat = {p: _ms(m) for p, m in re.findall(r"^\s+(50|99)%\s+([\d.]+\w+)", out, re.M)}
    return {
        "rps": rps,
        "p50": lat.get("50", 0.0),
        "p99": lat.get("99", 0.0),
        "errors": float(errors.group(1)) if errors else 0.0,
    }


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    assert m
    return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]


def stream_times(url: str, n: int = 20) -> dict[str, float]:
    first, total = [], []
    with httpx.Client(headers={"Authorization": f"Api-Key {KEY}"}, timeout=30) as c:
        for _ in range(n):
            t0 = time.perf_counter()
            with c.stream("GET", url) as r:
                it = r.iter_raw()
                next(it)
                first.append(time.perf_counter() - t0)
                count = 1 + sum(1 for _ in it)
            total.append(time.perf_counter() - t0)
            assert r.status_code == 200 and count >= 1
    return {
        "first_ms": statistics.median(first) * 1000,
        "total_ms": statistics.median(total) * 1000,
    }


def table_for(up_port: int, sse_port: int) -> RoutingTable:
    return RoutingTable(
        version=1,
        models={"mb": ModelRoute("mb", "bench", {"production": (("db", 1.0),)})},
        model_names={"bench": "mb"},
        deployments={
            "db": DeploymentRoute(
                "db",
                "mb",
                "/",
                DeploymentState.SERVING,
                (Upstream("r0", "127.0.0.1", up_port),),
                concurrency=1024,
            )
        },
        api_key_hashes=frozenset({hashlib.sha256(KEY.encode()).hexdigest()}),
    )


def cpu_seconds(pid: int) -> float:
    """CPU time a process has used so far (the scheduler's own count, in ns)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9


def start_gateway(
    procs: Procs,
    port: int,
    control: Path,
    cores: str,
    workers: int,
    src: Path = REPO / "src",
    extra: tuple[str, ...] = (),
) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "kingpost.gateway", "--port", str(port)]
    cmd += ["--control-socket", str(control), "--workers", str(workers), *extra]
    env = {**os.environ, "PYTHONPATH": str(src.resolve())}
    return procs.start(["taskset", "-c", cores, *cmd], env=env)


def open_loop(url: str, rate: float, seconds: float, connections: int) -> dict[str, float]:
    """Latency under an open-loop load (bench/loadgen.c, on core 1), timed from when each
    request was due; microsecond resolution."""
    port = int(url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
    path = "/" + url.split("://", 1)[1].split("/", 1)[1]
    headers = {"Content-Type": "application/json", "Authorization": f"Api-Key {KEY}"}
    request = openloop.http_request(path, PAYLOAD.encode(), headers)
    return openloop.run(port, request, rate=rate, connections=connections, seconds=seconds, core=1)


def _median_run(runs: list[dict[str, float]]) -> dict[str, float]:
    """Each latency figure's median over the rounds."""
    return {q: statistics.median(r[q] for r in runs) for q in ("p50", "p99")}


def start_ray(procs: Procs, work: Path, port: int) -> subprocess.Popen[bytes] | None:
    py = REPO / ".bench-cache" / "ray-venv" / "bin" / "python"
    if not py.exists():
        return None
    app = work / "ray_app.py"
    app.write_text(RAY_APP)
    p = procs.start(pinned(0, [str(py), str(app), str(port), PAYLOAD, PATH]))
    try:
        wait_port(port, 90)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and p.poll() is None:
            try:
                if httpx.post(f"http://127.0.0.1:{port}{PATH}", timeout=2).status_code == 200:
                    return p
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
    except RuntimeError:
        pass
    procs.stop_one(p)
    return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=5)
    ap.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="rounds of saturation and of half-load latency; each runs every target back to "
        "back (default 5)",
    )
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--src", type=Path, default=REPO / "src", help="the gateway under test's tree")
    ap.add_argument(
        "--baseline-src",
        type=Path,
        help="another tree's src/ to run a second gateway from, as the target 'baseline'",
    )
    ap.add_argument(
        "--log-store",
        action="store_true",
        help="the gateway under test keeps access lines in a log store (`--log-dir`), as "
        "`kingpost server` runs it; the baseline runs as it is",
    )
    ap.add_argument(
        "--baseline-log-store",
        action="store_true",
        help="the baseline keeps access lines in a log store of its own too (to compare two "
        "trees' access lines: both with `--log-store`)",
    )
    ap.add_argument(
        "--saturation-only",
        action="store_true",
        help="only the saturation rounds (with each gateway's CPU time per request)",
    )
    args = ap.parse_args()
    for tool in ("nginx", "wrk"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is not installed (apt-get install nginx-light wrk)")
    procs = Procs()
    work = Path(tempfile.mkdtemp(prefix="kp-bench-"))
    try:
        results = run(args, procs, work)
    finally:
        procs.stop()
        shutil.rmtree(work, ignore_errors=True)
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def run(args: argparse.Namespace, procs: Procs, work: Path) -> dict[str, Any]:
    up_port, sse_port, ngx_port, kp_port, kp2_port, ray_port = (free_port() for _ in range(6))
    nginx = shutil.which("nginx") or "nginx"
    body = PAYLOAD.replace("'", "")
    procs.start(
        pinned(
            1,
            [
                nginx,
                "-c",
                str(
                    nginx_conf(
                        work,
                        "up",
                        up_port,
                        UPSTREAM_HTTP.replace("BODY", body).replace("SSEPORT", str(sse_port)),
                    )
                ),
            ],
        )
    )
    sse = work / "sse.py"
    sse.write_text(SSE_SERVER)
    procs.start(pinned(1, [sys.executable, str(sse), str(sse_port)]))
    procs.start(
        pinned(
            0,
            [
                nginx,
                "-c",
                str(
                    nginx_conf(work, "proxy", ngx_port, PROXY_HTTP.replace("UPPORT", str(up_port)))
                ),
            ],
        )
    )
    control = work / "gw.sock"
    # As `kingpost server` runs it: access lines kept in a log store.
    store = ("--log-dir", str(work / "logs")) if args.log_store else ()
    gateways = {
        "kingpost": start_gateway(procs, kp_port, control, "0", 1, src=args.src, extra=store)
    }
    control2 = work / "gw2.sock"
    start_gateway(procs, kp2_port, control2, "0,1", workers=2, src=args.src, extra=store)
    sockets = [control, *control_socket_paths(control2, 2)]
    ports = [up_port, sse_port, ngx_port, kp_port, kp2_port]
    if args.baseline_src is not None:
        base_port, base_control = free_port(), work / "base.sock"
        base_store = ("--log-dir", str(work / "base-logs")) if args.baseline_log_store else ()
        gateways["baseline"] = start_gateway(
            procs, base_port, base_control, "0", workers=1, src=args.baseline_src, extra=base_store
        )
        sockets.append(base_control)
        ports.append(base_port)
    for port in ports:
        wait_port(port)
    table = table_for(up_port, sse_port)
    for sock in sockets:
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        push_table(sock, table)
    targets = {
        "direct": f"http://127.0.0.1:{up_port}{PATH}",
        "nginx": f"http://127.0.0.1:{ngx_port}{PATH}",
        "kingpost": f"http://127.0.0.1:{kp_port}{PATH}",
    }
    if args.baseline_src is not None:
        targets["baseline"] = f"http://127.0.0.1:{base_port}{PATH}"
    post = work / "post.lua"
    post.write_text(
        'wrk.method = "POST"\nwrk.body = ' + json.dumps(PAYLOAD) + "\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Api-Key {KEY}"\n'
    )
    big = work / "big.lua"
    big.write_text(
        'wrk.method = "POST"\nwrk.body = string.rep("x", 1048576)\n'
        f'wrk.headers["Authorization"] = "Api-Key {KEY}"\n'
    )
    for url in targets.values():  # warm up every path once
        wrk(url, 1, 8, post)
    sat: dict[str, list[dict[str, float]]] = {k: [] for k in targets}
    for _ in range(args.rounds):
        for name, url in targets.items():
            # A gateway's CPU time per request too: steadier than req/s on a busy machine.
            pid = gateways[name].pid if name in gateways else 0
            before = cpu_seconds(pid) if pid else 0.0
            sat[name].append(wrk(url, args.duration, args.connections, post))
            if pid:
                done = sat[name][-1]["rps"] * int(args.duration)
                sat[name][-1]["cpu_us"] = (cpu_seconds(pid) - before) / max(1.0, done) * 1e6
    if args.saturation_only:
        return {"saturation": sat, "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count()}
    peak = {k: max(r["rps"] for r in v) for k, v in sat.items()}
    p1 = {k: wrk(url, args.duration, 1, post) for k, url in targets.items()}
    p256 = {k: wrk(url, args.duration, 256, post) for k, url in targets.items()}
    rate = peak["kingpost"] * 0.5
    # Latency at half load in rounds too, each round every target back to back: a stall of
    # the machine lands in one round and one target, and the per-round difference to direct
    # (and its median) shows it as such instead of as the system's tail.
    half_rounds: dict[str, list[dict[str, float]]] = {k: [] for k in targets}
    for _ in range(args.rounds):
        for name, url in targets.items():
            half_rounds[name].append(open_loop(url, rate, args.duration, 16))
    half = {k: _median_run(v) for k, v in half_rounds.items()}
    # The same offered load over 1 connection and over 256: a rate one connection can
    # carry for every target (half of the slowest closed-loop c=1 rate).
    equal_rate = 0.5 * min(p1[k]["rps"] for k in ("direct", "nginx", "kingpost"))
    equal = {
        k: {c: open_loop(targets[k], equal_rate, args.duration, c) for c in (1, 256)}
        for k in ("direct", "nginx", "kingpost")
    }
    kp2_url = f"http://127.0.0.1:{kp2_port}{PATH}"
    wrk(kp2_url, 1, 8, post)
    two_workers = max(
        wrk(kp2_url, args.duration, args.connections, post)["rps"] for _ in range(args.rounds)
    )
    big_rps = {k: wrk(url, args.duration, 8, big)["rps"] for k, url in targets.items()}
    sse_urls = {
        "direct": f"http://127.0.0.1:{sse_port}/sse",
        "nginx": f"http://127.0.0.1:{ngx_port}/sse",
        "kingpost": f"http://127.0.0.1:{kp_port}/models/bench/environments/production/sync/sse",
    }
    if args.baseline_src is not None:
        sse_urls["baseline"] = (
            f"http://127.0.0.1:{base_port}/models/bench/environments/production/sync/sse"
        )
    streaming = {k: stream_times(u) for k, u in sse_urls.items()}
    # Ray Serve last and alone: its raylet, GCS and controller keep working on core 0 while
    # idle, which would add milliseconds to every other target's tail latency there.
    ray_note = "skipped (--no-ray)"
    if not args.no_ray:
        ray = start_ray(procs, work, ray_port)
        if ray is None:
            ray_note = (
                "unavailable: ray[serve] not installed in .bench-cache/ray-venv or failed to start"
            )
        else:
            ray_note = "ok (measured after the others, with them idle)"
            url = f"http://127.0.0.1:{ray_port}{PATH}"
            wrk(url, 1, 8, post)
            sat["ray"] = [wrk(url, args.duration, args.connections, post) for _ in range(2)]
            peak["ray"] = max(x["rps"] for x in sat["ray"])
            p1["ray"] = wrk(url, args.duration, 1, post)
            half["ray"] = open_loop(url, rate, args.duration, 16)
            procs.stop_one(ray)
    return {
        "saturation": sat,
        "peak_rps": peak,
        "c1": p1,
        "c256": p256,
        "half_load": half,
        "half_load_rounds": half_rounds,
        "half_rate": rate,
        "equal_load": equal,
        "equal_rate": equal_rate,
        "two_workers_rps": two_workers,
        "body_1mb_rps": big_rps,
        "sse_100": streaming,
        "ray": ray_note,
        "date": time.strftime("%Y-%m-%d"),
        "cpus": os.cpu_count(),
    }


def report_saturation(r: dict[str, Any]) -> None:
    sat = r["saturation"]
    print(f"\nGateway saturation rounds {r['date']} (wrk -c64; SUT on core 0)")
    for name, runs in sat.items():
        cpu = [x["cpu_us"] for x in runs if "cpu_us" in x]
        print(
            f"{name}: req/s per round "
            + ", ".join(f"{x['rps']:.0f}" for x in runs)
            + (f"; CPU us/request {', '.join(f'{c:.1f}' for c in cpu)}" if cpu else "")
            + (f", median {statistics.median(cpu):.1f}" if cpu else "")
        )
    pairs = [("kingpost", "nginx"), ("baseline", "nginx"), ("kingpost", "baseline")]
    for a, b in pairs:
        if a in sat and b in sat:
            each = [x["rps"] / y["rps"] for x, y in zip(sat[a], sat[b], strict=True)]
            print(
                f"{a} / {b} per round: "
                + ", ".join(f"{x:.2f}" for x in each)
                + f"; median {statistics.median(each):.2f}"
            )


def report(r: dict[str, Any]) -> None:
    if "peak_rps" not in r:
        report_saturation(r)
        return
    peak, half = r["peak_rps"], r["half_load"]
    print(
        f"\nGateway benchmark {r['date']}, {r['cpus']} cores (SUT on core 0; wrk/loadgen + upstream on core 1)"
    )
    print(f"Ray Serve: {r['ray']}\n")
    print(
        "| target | req/s (c=64) | p50 ms @50% | p99 ms @50% | p99 c=1 | p99 c=256 | 1 MB body req/s |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for k in peak:
        c256 = r["c256"].get(k, {}).get("p99", float("nan"))
        big = r["body_1mb_rps"].get(k, float("nan"))
        print(
            f"| {k} | {peak[k]:.0f} | {half[k]['p50']:.3f} | {half[k]['p99']:.3f} | "
            f"{r['c1'][k]['p99']:.3f} | {c256:.3f} | {big:.0f} |"
        )
    kp = peak["kingpost"]
    print(f"\nkingpost / nginx throughput: {kp / peak['nginx']:.2f}  (target >= 0.40)")
    # Other load on the machine moves every figure between rounds; within a round the
    # targets run seconds apart, so the ratio per round is the steadier comparison.
    sat = r["saturation"]
    rounds = [k["rps"] / n["rps"] for k, n in zip(sat["kingpost"], sat["nginx"], strict=True)]
    print(
        "kingpost / nginx per round: "
        + ", ".join(f"{x:.2f}" for x in rounds)
        + f"; median {statistics.median(rounds):.2f}"
    )
    if "baseline" in sat:
        for name, other in (("baseline", "nginx"), ("kingpost", "baseline")):
            each = [a["rps"] / b["rps"] for a, b in zip(sat[name], sat[other], strict=True)]
            print(
                f"{name} / {other} per round: "
                + ", ".join(f"{x:.2f}" for x in each)
                + f"; median {statistics.median(each):.2f}"
            )
    if "ray" in peak:
        print(f"kingpost / ray throughput:   {kp / peak['ray']:.2f}  (target >= 5)")
    # Added latency per round (the target's run minus direct's run seconds before it), and
    # its median: the table above gives each target's median figures over the same rounds.
    per = r["half_load_rounds"]
    print(f"added latency at 50% of kingpost's peak ({r['half_rate']:.0f} req/s), per round:")
    for name in ("kingpost", "nginx", *(["baseline"] if "baseline" in per else [])):
        for q, target in (("p50", 0.3), ("p99", 1.0)):
            added = [t[q] - d[q] for t, d in zip(per[name], per["direct"], strict=True)]
            goal = f" (target <= {target})" if name == "kingpost" else ""
            print(
                f"  {name} {q}: "
                + ", ".join(f"{x:+.3f}" for x in added)
                + f" ms; median {statistics.median(added):+.3f}{goal}"
            )
    for k, v in r["c256"].items():
        ratio = v["p99"] / max(r["c1"][k]["p99"], 1e-6)
        print(f"{k}: p99 at 256 connections / p99 at 1, closed loop: {ratio:.1f}  (target <= 5)")
    print(
        f"\nSame offered load ({r['equal_rate']:.0f} req/s, open loop) over 1 and 256 connections:"
    )
    print("| target | p50 c=1 | p99 c=1 | p50 c=256 | p99 c=256 | p99 ratio |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for k, v in r["equal_load"].items():
        one, many = v[1], v[256]
        print(
            f"| {k} | {one['p50']:.3f} | {one['p99']:.3f} | {many['p50']:.3f} | "
            f"{many['p99']:.3f} | {many['p99'] / max(one['p99'], 1e-6):.2f} |"
        )
    print(
        f"\nkingpost with 2 workers on cores 0-1: {r['two_workers_rps']:.0f} req/s, "
        f"{r['two_workers_rps'] / peak['kingpost']:.2f}x one worker on core 0 "
        "(wrk and the upstream also run on core 1)"
    )
    for k, v in r["sse_100"].items():
        print(
            f"SSE 100 chunks via {k}: first chunk {v['first_ms']:.2f} ms, all {v['total_ms']:.2f} ms"
        )


if __name__ == "__main__":
    main()
