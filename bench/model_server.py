"""Model-server benchmark: Kingpost's server vs Truss's own, same echo model.

Each server runs pinned to one core (taskset); wrk runs on another core with
the same connection count against both. Reports requests/s and p50/p99 at
peak (closed loop), the ratios Kingpost/Truss, and Kingpost's p50/p99 under an
open-loop load (bench/loadgen.c) at 50, 70 and 80% of its own peak.

    .venv/bin/python bench/model_server.py [--duration 8] [--connections 16]

Truss is installed into ``.bench-cache/truss-venv`` on first use (PyPI) and its
server is started from ``truss/templates/server`` the way its image does:
template files + ``_truss_shared`` + ``model/`` + a full ``config.yaml`` in one
directory, ``python main.py`` with ``INFERENCE_SERVER_PORT``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import openloop
from gateway import Procs, nginx_conf, wait_port

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".bench-cache"
TRUSS_VENV = CACHE / "truss-venv"
UV = Path(sys.executable).parent / "uv"

ECHO_MODEL = """class Model:
    def __init__(self, **kwargs):
        pass

    def load(self):
        pass

    def predict(self, model_input):
        return model_input
"""
BODY = '{"prompt": "hello world", "max_tokens": 16, "temperature": 0.5}'
PATH = "/v1/models/model:predict"


@dataclass(frozen=True)
class Run:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    unfinished: int = 0
    cpu_us: float = 0.0
    """The server's CPU time per answered request, when measured."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _lua(path: Path) -> Path:
    script = path / "post.lua"
    lines = [
        'wrk.method = "POST"',
        f"wrk.body = '{BODY}'",
        'wrk.headers["Content-Type"] = "application/json"',
    ]
    script.write_text("\n".join(lines) + "\n")
    return script


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text.strip())
    if not m:
        raise ValueError(f"cannot parse latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def wrk(url: str, lua: Path, connections: int, seconds: float, core: int) -> Run:
    cmd = [
        "taskset",
        "-c",
        str(core),
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
    ]
    cmd += ["--latency", "-s", str(lua), url + PATH]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    err = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return Run(rps, p50, p99, int(err.group(1)) if err else 0)


def _wait_ready(url: str, proc: subprocess.Popen[bytes], deadline_s: float = 60) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/v1/models/model", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"{url} never became ready")


def ensure_truss() -> Path:
    python = TRUSS_VENV / "bin" / "python"
    marker = TRUSS_VENV / ".server-deps"
    if not marker.exists():
        if not python.exists():
            subprocess.run(
                [str(UV), "venv", "--python", sys.executable, str(TRUSS_VENV)], check=True
            )
        subprocess.run([str(UV), "pip", "install", "--python", str(python), "truss"], check=True)
        reqs = _truss_templates(python) / "server" / "requirements.txt"
        subprocess.run(
            [str(UV), "pip", "install", "--python", str(python), "-r", str(reqs)], check=True
        )
        marker.touch()
    return python


GRANIAN_VENV = CACHE / "granian-venv"
GRANIAN_APP = """async def app(scope, proto):
    body = await proto()
    proto.response_bytes(200, [("content-type", "application/json")], body)
"""


def ensure_granian() -> Path:
    """Granian (a Rust HTTP server that calls a Python app per request) in its own venv."""
    granian = GRANIAN_VENV / "bin" / "granian"
    if not granian.exists():
        subprocess.run([str(UV), "venv", "--python", sys.executable, str(GRANIAN_VENV)], check=True)
        python = GRANIAN_VENV / "bin" / "python"
        subprocess.run([str(UV), "pip", "install", "--python", str(python), "granian"], check=True)
    return granian


def start_granian(granian: Path, work: Path, core: int) -> tuple[subprocess.Popen[bytes], str]:
    """An RSGI echo under Granian: one worker, one single-threaded runtime, on ``core``.

    What a compiled request path still costs when each request calls into Python."""
    app_dir = work / "granian-app"
    app_dir.mkdir(exist_ok=True)
    (app_dir / "echo.py").write_text(GRANIAN_APP)
    port = _free_port()
    cmd = [
        str(granian), "--interface", "rsgi", "--workers", "1", "--runtime-threads", "1",
        "--runtime-mode", "st", "--host", "127.0.0.1", "--port", str(port), "--no-ws",
        "--log-level", "warning", "echo:app",
    ]  # fmt: skip
    proc = start(cmd, app_dir, {}, core)
    wait_port(port)
    return proc, f"http://127.0.0.1:{port}"


def _truss_templates(python: Path) -> Path:
    code = "import truss, pathlib; print(pathlib.Path(truss.__file__).parent / 'templates')"
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def truss_app(python: Path, work: Path) -> Path:
    templates = _truss_templates(python)
    app = work / "truss-app"
    shutil.copytree(templates / "server", app)
    shutil.copytree(templates / "shared", app / "_truss_shared")
    (app / "model").mkdir()
    (app / "model" / "model.py").write_text(ECHO_MODEL)
    (app / "data").mkdir()
    code = (
        "import sys, yaml; from truss.base.truss_config import TrussConfig; "
        "print(yaml.safe_dump(TrussConfig.from_dict({'model_name': 'echo'}).to_dict(verbose=True)))"
    )
    cfg = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True)
    (app / "config.yaml").write_text(cfg.stdout)
    return app


def kingpost_app(work: Path) -> Path:
    app = work / "kingpost-app"
    (app / "model").mkdir(parents=True)
    (app / "model" / "model.py").write_text(ECHO_MODEL)
    (app / "config.yaml").write_text("model_name: echo\n")
    return app


def start(
    cmd: list[str], cwd: Path, env: dict[str, str], core: int, log: Path | None = None
) -> subprocess.Popen[bytes]:
    out = subprocess.DEVNULL if log is None else log.open("wb")
    try:
        return subprocess.Popen(
            ["taskset", "-c", str(core), *cmd],
            cwd=cwd,
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT if log is not None else subprocess.DEVNULL,
        )
    finally:
        if log is not None:
            out.close()  # type: ignore[union-attr]


def placement_events(log: Path) -> list[str]:
    """Where the server ran predict during the run (thread pool or event loop), and why."""
    events = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("method") == "predict" and "reason" in entry:
            events.append(f"{entry.get('message', '?')}: {entry['reason']}")
    return events


def measure_peak(url: str, work: Path, args: argparse.Namespace) -> Run:
    lua = _lua(work)
    wrk(url, lua, args.connections, 2, args.client_core)  # warm-up
    return wrk(url, lua, args.connections, args.duration, args.client_core)


CONTROL_HTTP = """
  server {
    listen 127.0.0.1:PORT;
    location / { default_type application/json; return 200 'BODY'; }
  }
"""


def start_control(procs: Procs, work: Path, core: int) -> str:
    """nginx answering the echo's response from memory, pinned where the server runs.

    Run at the same open-loop rate right after each Kingpost run, it tells the machine's
    own stalls (the host, the load generator) apart from the server's queueing.
    """
    port = _free_port()
    conf = nginx_conf(work, "control", port, CONTROL_HTTP.replace("BODY", BODY))
    procs.start(["taskset", "-c", str(core), shutil.which("nginx") or "nginx", "-c", str(conf)])
    wait_port(port)
    return f"http://127.0.0.1:{port}"


def cpu_seconds(pid: int) -> float:
    """CPU time a process has used so far (the scheduler's own count, in ns)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9


def start_minimal(work: Path, core: int, cpu_us: float) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    script = Path(__file__).with_name("minimal_server.py")
    cmd = [sys.executable, str(script), str(port), "--cpu-us", f"{cpu_us:.1f}"]
    proc = start(cmd, work, {}, core)
    wait_port(port)
    return proc, f"http://127.0.0.1:{port}"


def calibrate_minimal(
    work: Path, args: argparse.Namespace, target_us: float
) -> tuple[subprocess.Popen[bytes], str, float]:
    """The minimal server (bench/minimal_server.py), given the CPU per request the server
    under test showed at its peak: the same service time with none of the features, so
    its latency at a share of its own peak is what queueing alone costs on this machine."""
    lua = _lua(work)
    proc, url = start_minimal(work, args.server_core, 0)
    try:
        wrk(url, lua, args.connections, 1, args.client_core)
        before = cpu_seconds(proc.pid)
        bare = wrk(url, lua, args.connections, 3, args.client_core)
        bare_us = (cpu_seconds(proc.pid) - before) / (bare.rps * 3) * 1e6
    finally:
        proc.terminate()
        proc.wait()
    extra = max(0.0, target_us - bare_us)
    proc, url = start_minimal(work, args.server_core, extra)
    return proc, url, extra


def measure_at(url: str, args: argparse.Namespace, target_rps: float, pid: int = 0) -> Run:
    """Open loop at ``target_rps`` (bench/loadgen.c): requests go out on schedule whatever
    the server does, and each is timed from when it was due, so queueing shows. With the
    server's ``pid``, also its CPU time per request (requests one at a time cost more than
    the batches a closed-loop peak is made of)."""
    port = int(url.rsplit(":", 1)[1])
    before = cpu_seconds(pid) if pid else 0.0
    request = openloop.http_request(PATH, BODY.encode(), {"Content-Type": "application/json"})
    r = openloop.run(
        port, request, rate=target_rps, connections=args.connections, seconds=args.duration,
        core=args.client_core,
    )  # fmt: skip
    # Over every answered request: the CPU count also covers the generator's warm-up.
    cpu_us = (cpu_seconds(pid) - before) / max(1, r["answered"]) * 1e6 if pid else 0.0
    errors = int(r["non2xx"] + r["errors"])
    return Run(r["rate"], r["p50"], r["p99"], errors, r["unfinished"], cpu_us)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--server-core", type=int, default=0)
    parser.add_argument("--client-core", type=int, default=1)
    parser.add_argument("--skip-truss", action="store_true")
    parser.add_argument(
        "--loads", type=int, nargs="*", default=[50, 70, 80],
        help="open-loop runs at these percentages of Kingpost's peak",
    )  # fmt: skip
    parser.add_argument(
        "--rounds", type=int, default=3,
        help="open-loop rounds; each load is set from a peak measured just before it",
    )  # fmt: skip
    parser.add_argument(
        "--no-control", action="store_true",
        help="skip the controls: nginx at the same rates and at the same shares of its own "
        "peak, and the minimal server (needs nginx)",
    )  # fmt: skip
    parser.add_argument(
        "--granian", action="store_true",
        help="also run Granian (Rust HTTP, a Python echo per request) at the same shares of "
        "its own peak; installed into .bench-cache/granian-venv on first use",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    args = parser.parse_args()
    results: dict[str, Run] = {}
    peaks: dict[str, float] = {}
    after: dict[str, float] = {}
    notes: list[str] = []
    procs = Procs()
    with tempfile.TemporaryDirectory(prefix="kp-bench-") as tmp:
        work = Path(tmp)
        if not args.skip_truss:
            python = ensure_truss()
            app = truss_app(python, work)
            port = _free_port()
            proc = start([str(python), "main.py"], app, {"INFERENCE_SERVER_PORT": str(port)},
                         args.server_core)  # fmt: skip
            try:
                _wait_ready(f"http://127.0.0.1:{port}", proc)
                results["truss"] = measure_peak(f"http://127.0.0.1:{port}", work, args)
            finally:
                proc.terminate()
                proc.wait()
        app = kingpost_app(work)
        port = _free_port()
        cmd = [sys.executable, "-m", "kingpost.server", "--app-dir", str(app), "--port", str(port)]
        log = work / "kingpost.log"
        proc = start([*cmd, "--host", "127.0.0.1"], work, {}, args.server_core, log)
        minimal = bare = granian = None
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_ready(url, proc)
            wrk(url, _lua(work), args.connections, 2, args.client_core)  # warm-up
            cpu_before = cpu_seconds(proc.pid)
            results["kingpost"] = peak = measure_peak(url, work, args)
            cpu_us = (cpu_seconds(proc.pid) - cpu_before) / (peak.rps * (args.duration + 2)) * 1e6
            if not args.no_control:
                minimal, minimal_url, extra_us = calibrate_minimal(work, args, cpu_us)
                notes.append(
                    f"kingpost used {cpu_us:.1f} us of CPU per request at its peak; the minimal "
                    f"server burns {extra_us:.1f} us on top of its own cost to match"
                )
                bare, bare_url = start_minimal(work, args.server_core, 0)
            if args.granian:
                granian, granian_url = start_granian(ensure_granian(), work, args.server_core)
            # This machine's speed drifts by tens of percent from minute to minute, so each
            # open-loop run gets its rate from a short closed-loop peak taken just before it.
            lua = _lua(work)
            control = None if args.no_control else start_control(procs, work, args.server_core)
            # Servers run at the same shares of their own peak: (label, url, pid for CPU).
            own: list[tuple[str, str, int]] = []
            if control is not None:
                # nginx: what a server whose service time is a fifth of Kingpost's does
                # with the same target.
                own.append(("nginx-own", control, 0))
            if minimal is not None:
                own.append(("minimal", minimal_url, minimal.pid))
            if bare is not None:
                # The minimal server with no extra work: the least Python a server can run
                # per request.
                own.append(("bare", bare_url, bare.pid))
            if granian is not None:
                own.append(("granian", granian_url, 0))
            for round_ in range(1, args.rounds + 1):
                for share in args.loads:
                    peak = wrk(url, lua, args.connections, 3, args.client_core)
                    at = measure_at(url, args, share / 100 * peak.rps, proc.pid)
                    name = f"kingpost@{share}%#{round_}"
                    results[name], peaks[name] = at, peak.rps
                    # The peak again right after: when it moved, the run was not at the
                    # share it was meant to be (this machine's speed swings within seconds).
                    after[name] = wrk(url, lua, args.connections, 3, args.client_core).rps
                    if control is not None:
                        results[f"nginx@{share}%#{round_}"] = measure_at(control, args, at.rps)
                    for label, target, pid in own:
                        peak = wrk(target, lua, args.connections, 3, args.client_core)
                        name = f"{label}@{share}%#{round_}"
                        results[name] = measure_at(target, args, share / 100 * peak.rps, pid)
                        peaks[name] = peak.rps
        finally:
            proc.terminate()
            proc.wait()
            for control_proc in (minimal, bare, granian):
                if control_proc is not None:
                    control_proc.terminate()
                    control_proc.wait()
            procs.stop()
        events = placement_events(log)
    report(results, peaks, after, args)
    if not args.json:
        for note in notes:
            print(note)
        for event in events:
            print(f"kingpost predict placement: {event}")
    return 0


def report(
    results: dict[str, Run],
    peaks: dict[str, float],
    after: dict[str, float],
    args: argparse.Namespace,
) -> None:
    if args.json:
        out = {
            k: {**vars(v), "peak_rps": peaks.get(k), "peak_after_rps": after.get(k)}
            for k, v in results.items()
        }
        print(json.dumps(out, indent=2))
        return
    print(f"echo model, {args.connections} connections, {args.duration:.0f}s per run, "
          f"server on core {args.server_core}, wrk on core {args.client_core}")  # fmt: skip
    print(f"{'server':<14}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'non-2xx':>9}"
          f"{'unanswered':>12}{'cpu us/req':>12}{'core busy':>11}")  # fmt: skip
    for name, r in results.items():
        cpu = f"{r.cpu_us:>12.1f}{r.cpu_us * r.rps / 1e4:>10.0f}%" if r.cpu_us else ""
        print(f"{name:<14}{r.rps:>10.0f}{r.p50_ms:>10.3f}{r.p99_ms:>10.3f}{r.errors:>9}"
              f"{r.unfinished:>12}{cpu}")  # fmt: skip
    k, t = results.get("kingpost"), results.get("truss")
    if k and t:
        print(f"throughput ratio kingpost/truss: {k.rps / t.rps:.2f}x")
        print(f"p50 ratio kingpost/truss: {k.p50_ms / t.p50_ms:.2f}  "
              f"p99 ratio kingpost/truss: {k.p99_ms / t.p99_ms:.2f}")  # fmt: skip
    for share in args.loads:
        print(f"kingpost@{share}%: {_at_share(results, peaks, f'kingpost@{share}%#', after)}")
        ctl = sorted(r.p99_ms for k, r in results.items() if k.startswith(f"nginx@{share}%#"))
        if ctl:
            print(f"  nginx at the same rates (control): median p99 {statistics.median(ctl):.3f} "
                  f"ms ({', '.join(f'{p:.2f}' for p in ctl)})")  # fmt: skip
        if own := _at_share(results, peaks, f"nginx-own@{share}%#"):
            print(f"  nginx at {share}% of its own peak (control): {own}")
        if minimal := _at_share(results, peaks, f"minimal@{share}%#"):
            print(f"  minimal server, same CPU per request, {share}% of its own peak (control): "
                  f"{minimal}")  # fmt: skip
        if bare := _at_share(results, peaks, f"bare@{share}%#"):
            print(f"  minimal server, no extra work, {share}% of its own peak (control): {bare}")
        if granian := _at_share(results, peaks, f"granian@{share}%#"):
            print(f"  Granian, a Python echo, {share}% of its own peak (control): {granian}")


def _at_share(
    results: dict[str, Run],
    peaks: dict[str, float],
    prefix: str,
    after: dict[str, float] | None = None,
) -> str:
    """The median p99 of the rounds named ``prefix…``, then each round's p99, rate and the
    peak it was a share of (and, from ``after``, the peak measured right after the run);
    empty when there were none."""
    runs = [(k, peaks[k], r) for k, r in results.items() if k.startswith(prefix)]
    if not runs:
        return ""
    median = statistics.median(r.p99_ms for _, _, r in runs)
    each = []
    for name, peak, r in runs:
        then = f" (then {after[name]:.0f})" if after and name in after else ""
        each.append(f"{r.p99_ms:.2f} ms at {r.rps:.0f} of {peak:.0f}{then}")
    return f"median p99 {median:.3f} ms ({', '.join(each)} req/s)"


if __name__ == "__main__":
    sys.exit(main())
