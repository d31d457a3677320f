"""Cold start from zero, end to end, beside the floor of starting the same server by hand.

For a trivial custom server (examples/echo-server) and a trivial model class
(examples/echo-model) on the process engine: push, set ``min_replica 0`` with the shortest
window (10 s) and no delay, then repeat: wait until the deployment is SCALED_TO_ZERO with
no replica left, send one predict through the gateway, and time it to its answer. The
floor is the same server started by hand (same interpreter, same command) and timed from
the start to its first answer, polling its readiness every 5 ms.

    .venv/bin/python bench/cold_start.py --runs 8 [--engine process|docker]
        [--baseline-src OTHER/src] [--json out.json]

``--engine docker`` runs the replicas as containers; the floor is then the replica's own
container started by hand (``docker run`` of the same image, command, environment, user and
network, an empty tmpfs at /secrets), timed the same way.

``--baseline-src`` runs a second server from another source tree (``git archive REV src |
tar -x -C DIR``) beside this tree's, and each round times a cold start on each (the order
alternating), then the floor: the two platform shares come from the same moments.

Each round times one cold start and then one start of the floor (while the deployment idles
towards zero again), so the machine's drift lands in both. Reports p50/p95 of each, the
platform's share (cold start p50 minus the floor's p50), the paired share (each round's cold
start minus that round's floor: their median, and every round), and the requests that
failed (must be 0).
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

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
PYTHON = os.path.realpath(sys.executable)
"""The custom server's interpreter, by its real path, for the replica and the floor alike."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """One `kingpost server` with its own home and ports."""

    def __init__(self, home: Path, src: Path | None = None, engine: str = "process") -> None:
        self.home, self.api, self.gw = home, free_port(), free_port()
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("KINGPOST_")},
            **({"PYTHONPATH": str(src.resolve())} if src is not None else {}),
            "KINGPOST_HOME": str(home),
            "KINGPOST_API_PORT": str(self.api),
            "KINGPOST_GATEWAY_PORT": str(self.gw),
            "KINGPOST_ENGINE": engine,
            # The docker engine leaves containers running for the next server by default.
            "KINGPOST_STOP_REPLICAS_ON_EXIT": "true",
        }
        log = (home / "server.log").open("ab") if home.mkdir(parents=True) is None else None
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kingpost.cli", "server"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{self.api}/v1/health", timeout=1).is_success:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        self.container: ContainerFloor | None = None
        self.key = (home / "credentials").read_text().strip()
        auth = {"Authorization": f"Api-Key {self.key}"}
        self.api_client = httpx.Client(base_url=f"http://127.0.0.1:{self.api}", headers=auth)
        self.gateway = httpx.Client(
            base_url=f"http://127.0.0.1:{self.gw}", headers=auth, timeout=120
        )

    def cli(self, *args: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "kingpost.cli", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        if out.returncode != 0:
            raise SystemExit(f"kingpost {' '.join(args)} failed:\n{out.stdout}{out.stderr}")
        return out.stdout

    def deployment(self, dep: str) -> dict[str, Any]:
        return dict(self.api_client.get(f"/v1/deployments/{dep}").json())

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=30)


def wait(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what}")


def pushed_at_zero(srv: Server, example: str) -> tuple[str, str, dict[str, Any]]:
    """Push ``example`` to ``srv`` and let it scale to zero after a 10 s window."""
    project = srv.home.parent / example
    shutil.copytree(EXAMPLES / example, project)
    if example == "echo-server" and srv.env["KINGPOST_ENGINE"] == "process":
        # No PATH lookup (a pyenv shim alone takes 200-400 ms); in an image, python3 is real.
        config = (project / "config.yaml").read_text()
        config = config.replace("python3 server.py", f"{PYTHON} server.py")
        (project / "config.yaml").write_text(config)
    pushed = json.loads(srv.cli("push", str(project), "--wait", "--output", "json"))
    model, dep = pushed["model"]["id"], pushed["deployment"]["id"]
    if srv.env["KINGPOST_ENGINE"] == "docker":  # the container to copy for the floor
        srv.container = ContainerFloor.copy_of(dep, example)
    srv.cli(
        "autoscaling", "set", example, "--deployment", dep, "--min-replica", "0",
        "--autoscaling-window", "10", "--scale-down-delay", "0",
    )  # fmt: skip
    body = {"text": "hi"} if example == "echo-model" else {"n": 1}
    return model, dep, body


def cold_start(srv: Server, model: str, dep: str, body: dict[str, Any], label: str) -> float:
    """Wait for zero, then time one predict through the gateway (raises if it fails)."""

    def at_zero() -> bool:
        d = srv.deployment(dep)
        return d["status"] == "SCALED_TO_ZERO" and not d.get("replicas_starting")

    wait(at_zero, 60, "scale to zero")
    time.sleep(0.5)  # the replica's process group is gone, not only out of the table
    started = time.perf_counter()
    r = srv.gateway.post(f"/models/{model}/deployment/{dep}/predict", json=body)
    took = time.perf_counter() - started
    if r.status_code != 200:
        raise RuntimeError(f"{label}: {r.status_code} {r.text[:200]}")
    return took


def cold_starts(
    servers: dict[str, Server], example: str, runs: int
) -> tuple[dict[str, list[float]], list[float], int]:
    """Per round, a cold start on each server (the order alternating), then one start of
    the floor (while the deployments idle towards zero again), so the machine's drift lands
    in all of them."""
    pushed = {name: pushed_at_zero(srv, example) for name, srv in servers.items()}
    ours = list(servers.values())[-1]  # this tree's server, in its environment or image
    bare: Floor | ContainerFloor = ours.container or Floor(ours, example)
    times: dict[str, list[float]] = {name: [] for name in servers}
    floors, failed = [], 0
    for i in range(runs):
        order = list(servers) if i % 2 == 0 else list(reversed(servers))
        for name in order:
            try:
                times[name].append(cold_start(servers[name], *pushed[name], f"{example} {name}"))
            except RuntimeError as exc:
                failed += 1
                times[name].append(float("nan"))
                print(f"  {exc}", file=sys.stderr)
        floors.append(bare.once())
        took = ", ".join(f"{n} {times[n][-1] * 1000:.0f} ms" for n in servers)
        print(f"  {example}: cold start {took}, floor {floors[-1] * 1000:.0f} ms", file=sys.stderr)
    return times, floors, failed


def first_answer(base_url: str, ready: str, predict: str, body: dict[str, Any]) -> None:
    """Poll ``ready`` every 5 ms until it answers 200, then one predict (must be 200)."""
    with httpx.Client(base_url=base_url, timeout=5) as c:
        while True:
            try:
                if c.get(ready).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.005)
        r = c.post(predict, json=body)
        assert r.status_code == 200, r.text


class Floor:
    """The same server started by hand: its command, its interpreter, to its first answer."""

    def __init__(self, srv: Server, example: str) -> None:
        self.project = project = srv.home.parent / example
        self.port = port = free_port()
        if example == "echo-server":
            # Its start_command as the engine runs it, through the shell.
            src = (project / "server.py").read_text().replace("PORT = 8000", f"PORT = {port}")
            (project / "server_floor.py").write_text(src)
            self.cmd = ["/bin/sh", "-c", f"{PYTHON} server_floor.py"]
            self.ready, self.predict, self.body = "/health", "/predict", {"n": 1}
        else:
            envs = sorted((srv.home / "envs").glob("*/bin/python"))
            python = str(envs[0]) if envs else sys.executable
            self.cmd = [python, "-P", "-m", "kingpost.server", "--app-dir", str(project)]
            self.cmd += ["--port", str(port), "--host", "127.0.0.1"]
            self.ready, self.predict = "/v1/models/model", "/v1/models/model:predict"
            self.body = {"text": "hi"}

    def once(self) -> float:
        started = time.perf_counter()
        proc = subprocess.Popen(
            self.cmd, cwd=self.project, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            first_answer(f"http://127.0.0.1:{self.port}", self.ready, self.predict, self.body)
            return time.perf_counter() - started
        finally:
            proc.terminate()
            proc.wait(timeout=10)


class ContainerFloor:
    """On the docker engine: the replica's container started by hand with ``docker run``
    (same image, command, environment, user and network; no mounts but an empty tmpfs at
    /secrets), timed to its first answer, readiness polled every 5 ms."""

    def __init__(self, attrs: dict[str, Any], port: int, example: str) -> None:
        config = attrs["Config"]
        self.image, self.cmd, self.user = config["Image"], config["Cmd"], config["User"]
        self.env = config["Env"]
        self.network = next(iter(attrs["NetworkSettings"]["Networks"]))
        self.port = port
        if example == "echo-server":
            self.ready, self.predict, self.body = "/health", "/predict", {"n": 1}
        else:
            self.ready, self.predict = "/v1/models/model", "/v1/models/model:predict"
            self.body = {"text": "hi"}

    @classmethod
    def copy_of(cls, dep: str, example: str) -> ContainerFloor:
        import docker

        client = docker.from_env()
        (container,) = client.containers.list(filters={"label": f"kingpost.deployment={dep}"})
        attrs = container.attrs
        port = json.loads(attrs["Config"]["Labels"]["kingpost.runtime"])["port"]
        return cls(attrs, int(port), example)

    def once(self) -> float:
        import docker

        client = docker.from_env()
        started = time.perf_counter()
        c = client.containers.run(
            self.image, self.cmd, environment=self.env, user=self.user, network=self.network,
            init=True, detach=True, tmpfs={"/secrets": ""},
        )  # fmt: skip
        try:
            c.reload()
            ip = c.attrs["NetworkSettings"]["Networks"][self.network]["IPAddress"]
            first_answer(f"http://{ip}:{self.port}", self.ready, self.predict, self.body)
            return time.perf_counter() - started
        finally:
            c.remove(force=True)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(cold: list[float], bare: list[float], failed: int, runs: int) -> dict[str, Any]:
    paired = [(c - b) * 1000 for c, b in zip(cold, bare, strict=True)]
    return {
        "cold_p50_ms": pct(cold, 0.5) * 1000,
        "cold_p95_ms": pct(cold, 0.95) * 1000,
        "floor_p50_ms": pct(bare, 0.5) * 1000,
        "floor_p95_ms": pct(bare, 0.95) * 1000,
        "platform_share_p50_ms": (pct(cold, 0.5) - statistics.median(bare)) * 1000,
        "paired_share_ms": paired,
        "paired_share_median_ms": statistics.median(paired),
        "failed": failed,
        "runs": runs,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--only", choices=["echo-server", "echo-model"])
    ap.add_argument("--baseline-src", type=Path, help="another tree's src/ to run beside")
    ap.add_argument("--engine", choices=["process", "docker"], default="process")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="kp-cold-") as tmp:
        servers: dict[str, Server] = {}
        try:
            if args.baseline_src is not None:
                servers["baseline"] = Server(
                    Path(tmp) / "baseline" / "home", args.baseline_src, args.engine
                )
            servers["new"] = Server(Path(tmp) / "new" / "home", REPO / "src", args.engine)
            for example in [args.only] if args.only else ["echo-server", "echo-model"]:
                cold, bare, failed = cold_starts(servers, example, args.runs)
                for name in servers:
                    key = example if len(servers) == 1 else f"{example} ({name})"
                    report[key] = summary(cold[name], bare, failed, args.runs)
        finally:
            for srv in servers.values():
                srv.stop()
    print(f"{'project':<24} {'cold p50':>9} {'cold p95':>9} {'floor p50':>10} "
          f"{'floor p95':>10} {'platform p50':>13} {'paired':>7} {'failed':>7}")  # fmt: skip
    for name, r in report.items():
        print(
            f"{name:<24} {r['cold_p50_ms']:>7.0f}ms {r['cold_p95_ms']:>7.0f}ms "
            f"{r['floor_p50_ms']:>8.0f}ms {r['floor_p95_ms']:>8.0f}ms "
            f"{r['platform_share_p50_ms']:>11.0f}ms {r['paired_share_median_ms']:>5.0f}ms "
            f"{r['failed']:>7}"
        )
        shares = ", ".join(f"{x:.0f}" for x in r["paired_share_ms"])
        print(f"  {name}: cold minus floor per round (ms): {shares}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
