"""GPU placement on a real GPU, end to end (issue 28): one script, under 10 minutes.

Starts `kingpost server` on the process engine, reads the inventory it found, pushes a
custom server (this machine's `python3`: torch from its own packages, nothing from PyPI)
whose start builds a small torch model on ``cuda`` and whose /predict runs it, pushes a
second deployment asking for the same GPU, and records: the inventory, the first
replica's ``CUDA_VISIBLE_DEVICES`` and what torch sees inside it, the second waiting with
its reason, predict latency on the GPU through the gateway, and the whole server log.

    python3 bench/gpu_check.py --out /tmp/gpu-check          # on the GPU machine
    .venv/bin/python bench/gpu_check.py --out /tmp/gpu-check  # no GPU: the no-GPU path
    .venv/bin/python bench/gpu_check.py --fake H200 --out …   # the GPU path, faked inventory

Without a GPU it records the empty inventory and checks that a config asking for one is
refused at push with the inventory in the message. ``--fake NAME`` injects a one-GPU
inventory (``KINGPOST_FAKE_GPUS``) so the placement path runs here; torch then reports
no CUDA, which the report says. Writes ``report.json`` and ``server.log`` under --out and
prints the report; exits 1 if a check failed.
"""

from __future__ import annotations

import argparse
import json
import os
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

SERVER = r'''
"""A custom server: a small torch model on the GPU it was given."""
import json, os, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

INFO = {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "NVIDIA_VISIBLE_DEVICES": os.environ.get("NVIDIA_VISIBLE_DEVICES")}
try:
    import torch
    INFO["torch"] = torch.__version__
    INFO["cuda_available"] = torch.cuda.is_available()
    INFO["device_count"] = torch.cuda.device_count()
    DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
    if DEVICE == "cuda":
        INFO["device_names"] = [torch.cuda.get_device_name(i)
                                for i in range(torch.cuda.device_count())]
    started = time.perf_counter()
    MODEL = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.ReLU(),
                                torch.nn.Linear(4096, 1024)).to(DEVICE).eval()
    X = torch.randn(64, 1024, device=DEVICE)
    with torch.no_grad():
        MODEL(X)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    INFO["load_s"] = round(time.perf_counter() - started, 3)
except ImportError as exc:
    torch, DEVICE, INFO["torch"] = None, "cpu", f"not importable: {exc}"
INFO["device"] = DEVICE


def run():
    if torch is None:
        return sum(i * i for i in range(10000))
    with torch.no_grad():
        y = MODEL(X)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return float(y.float().mean())


class Handler(BaseHTTPRequestHandler):
    def _json(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._json(200, INFO if self.path == "/info" else {"ok": True})

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._json(200, {"value": run(), "device": DEVICE})

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("0.0.0.0", 8000), Handler).serve_forever()
'''

CONFIG = """\
model_name: {name}
docker_server:
  start_command: {python} server.py
  server_port: 8000
  predict_endpoint: /predict
  readiness_endpoint: /health
  liveness_endpoint: /health
resources:
  accelerator: {kind}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, home: Path, extra: dict[str, str]) -> None:
        self.home, self.api, self.gw = home, free_port(), free_port()
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("KINGPOST_")},
            "KINGPOST_HOME": str(home),
            "KINGPOST_API_PORT": str(self.api),
            "KINGPOST_GATEWAY_PORT": str(self.gw),
            "KINGPOST_ENGINE": "process",
            "KINGPOST_RECONCILE_INTERVAL": "0.2",
            **extra,
        }
        home.mkdir(parents=True)
        self.log = home / "server.log"
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kingpost.cli", "server", "--log-level", "info"],
                env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        wait(self._up, 90, "the server to answer")
        auth = {"Authorization": f"Api-Key {(home / 'credentials').read_text().strip()}"}
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.api}", headers=auth)
        self.gateway = httpx.Client(base_url=f"http://127.0.0.1:{self.gw}", headers=auth,
                                    timeout=60)  # fmt: skip

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            raise SystemExit(f"server exited:\n{self.log.read_text()[-3000:]}")
        try:
            return httpx.get(f"http://127.0.0.1:{self.api}/v1/health", timeout=1).is_success
        except httpx.TransportError:
            return False

    def push(self, project: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "kingpost.cli", "push", str(project), "-o", "json"],
            env=self.env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip

    def deployment(self, dep: str) -> dict[str, Any]:
        return dict(self.client.get(f"/v1/deployments/{dep}").json())

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=60)


def wait(pred: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.1)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def project(root: Path, name: str, kind: str) -> Path:
    path = root / name
    path.mkdir()
    (path / "server.py").write_text(SERVER)
    python = shutil.which("python3") or sys.executable
    (path / "config.yaml").write_text(CONFIG.format(name=name, python=python, kind=kind))
    return path


def kind_for(name: str) -> str:
    """A Truss kind that matches the device's NVML name (README, "GPUs")."""
    from kingpost.config import KNOWN_ACCELERATORS
    from kingpost.gpus import Gpu, matches

    device = Gpu("0", "GPU-x", name, 0)
    found = sorted(k for k in KNOWN_ACCELERATORS if matches(k, device))
    return found[0] if found else ""


def check(report: dict[str, Any], name: str, ok: bool, detail: Any = None) -> None:
    report["checks"].append({"check": name, "ok": bool(ok), "detail": detail})
    print(f"{'ok  ' if ok else 'FAIL'} {name}" + (f": {detail}" if detail else ""), flush=True)


def no_gpu_path(srv: Server, root: Path, report: dict[str, Any]) -> None:
    pushed = srv.push(project(root, "gpu-check-refused", "H100"))
    refused = pushed.returncode != 0 and "this host has no H100" in pushed.stderr
    check(report, "a config asking for a GPU is refused at push, with the inventory",
          refused, pushed.stderr.strip()[-300:])  # fmt: skip


def gpu_path(srv: Server, root: Path, kind: str, runs: int, report: dict[str, Any]) -> None:
    first = json.loads(srv.push(project(root, "gpu-check-first", kind)).stdout)
    model, dep = first["model"]["id"], first["deployment"]["id"]
    started = time.perf_counter()
    try:
        wait(lambda: srv.deployment(dep)["status"] == "ACTIVE", 300, "the first deployment")
    finally:
        report["first"] = srv.deployment(dep)
    report["first_ready_s"] = round(time.perf_counter() - started, 2)
    info = srv.gateway.get(f"/models/{model}/environments/production/sync/info").json()
    report["replica_sees"] = info
    gpus = srv.client.get("/v1/gpus").json()
    uuid = next(d["uuid"] for d in gpus["devices"] if d["held_by"])
    check(report, "the replica's CUDA_VISIBLE_DEVICES is its device's UUID",
          info.get("CUDA_VISIBLE_DEVICES") == uuid, info.get("CUDA_VISIBLE_DEVICES"))  # fmt: skip
    check(report, "torch inside the replica sees exactly one device",
          info.get("device_count") == 1, info.get("device_names") or info.get("torch"))  # fmt: skip

    second = json.loads(srv.push(project(root, "gpu-check-second", kind)).stdout)
    dep2 = second["deployment"]["id"]
    try:
        waiting = wait(lambda: (d := srv.deployment(dep2))["message"].startswith("waiting") and d,
                       30, "the second deployment to wait")  # fmt: skip
        report["second"] = waiting
        check(report, "the second deployment waits, saying why", True, waiting["message"])
    except TimeoutError as exc:
        report["second"] = srv.deployment(dep2)
        check(report, "the second deployment waits, saying why", False, str(exc))

    times = []
    for _ in range(runs):
        t = time.perf_counter()
        r = srv.gateway.post(f"/models/{model}/environments/production/predict", json={})
        times.append(time.perf_counter() - t)
        if r.status_code != 200:
            check(report, "predict", False, f"{r.status_code} {r.text[:200]}")
            break
    report["predict_ms"] = {
        "runs": len(times),
        "p50": round(statistics.median(times) * 1000, 2),
        "p95": round(sorted(times)[int(0.95 * (len(times) - 1))] * 1000, 2),
        "device": r.json().get("device") if r.status_code == 200 else None,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--fake", metavar="NVML_NAME", help="inject a one-GPU inventory")
    ap.add_argument("--runs", type=int, default=200)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"checks": [], "started": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                     time.gmtime())}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        root = Path(tmp)
        extra = {}
        if args.fake:
            fake = root / "gpus.json"
            fake.write_text(json.dumps([{"uuid": "GPU-fake-0", "name": args.fake,
                                         "memory_mib": 143771}]))  # fmt: skip
            extra["KINGPOST_FAKE_GPUS"] = str(fake)
        srv = Server(root / "home", extra)
        try:
            inventory = srv.client.get("/v1/gpus").json()
            report["inventory"] = inventory
            devices = [d for d in inventory["devices"] if not d["mig_mode"] or d["parent_uuid"]]
            print(f"inventory ({inventory['source']}): {[d['name'] for d in devices]} "
                  f"{inventory.get('note', '')}", flush=True)  # fmt: skip
            kind = kind_for(devices[0]["name"]) if devices else ""
            report["kind"] = kind
            if not devices:
                no_gpu_path(srv, root, report)
            elif not kind:
                check(report, "a Truss kind matches the device's name", False, devices[0]["name"])
            else:
                gpu_path(srv, root, kind, args.runs, report)
        except Exception as exc:  # recorded: the log and the report are what this run is for
            check(report, "the run finished", False, repr(exc))
        finally:
            srv.stop()
            shutil.copy(srv.log, args.out / "server.log")
    (args.out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps({k: v for k, v in report.items() if k != "inventory"}, indent=2,
                     default=str))  # fmt: skip
    return 0 if all(c["ok"] for c in report["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
