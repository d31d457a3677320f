"""Live reload of a development deployment vs a fresh push, on the process engine.

Starts one `kingpost server` with its own home, creates the development deployment of a
trivial model with `push --watch`'s API call, then runs `kingpost watch` on the folder and
makes one-line edits to model.py: each edit is timed from the file write until a predict
through the gateway returns the new value (the user's view: the watcher's polling, the
upload, the reload, the request). Beside it: the same edits applied without the watcher
(upload + sync call + predict), and fresh pushes of the same project (a new numbered
deployment, its environment cached) until it answers.

    .venv/bin/python bench/reload.py [--edits 20] [--pushes 3]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from kingpost.client import KingpostClient  # noqa: E402

MODEL = """
class Model:
    def __init__(self, **kwargs):
        pass

    def predict(self, model_input):
        return {"value": VALUE}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(fn, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got = fn()
        except Exception:
            got = None
        if got:
            return got
        time.sleep(0.01)
    raise SystemExit(f"timed out waiting for {what}")


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _line(name: str, values: list[float]) -> str:
    return (
        f"| {name} | {len(values)} | {statistics.median(values):.3f} | "
        f"{_pct(values, 0.95):.3f} | {min(values):.3f} | {max(values):.3f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--edits", type=int, default=20)
    parser.add_argument("--pushes", type=int, default=3)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="kingpost-bench-reload-"))
    api, gw = _free_port(), _free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("KINGPOST_")},
        "KINGPOST_HOME": str(home / "home"),
        "KINGPOST_API_PORT": str(api),
        "KINGPOST_GATEWAY_PORT": str(gw),
        "KINGPOST_ENGINE": "process",
    }
    log = (home / "server.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "kingpost.cli", "server"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    watcher: subprocess.Popen[bytes] | None = None
    try:
        api_url, gw_url = f"http://127.0.0.1:{api}", f"http://127.0.0.1:{gw}"
        _wait(lambda: httpx.get(f"{api_url}/v1/health").status_code == 200, 60, "the server")
        key = (home / "home" / "credentials").read_text().strip()
        client = KingpostClient(api_url, key, gw_url, timeout=600)
        http = httpx.Client(base_url=gw_url, headers={"Authorization": f"Api-Key {key}"})
        project = home / "bench-reload"
        (project / "model").mkdir(parents=True)
        (project / "config.yaml").write_text("model_name: bench-reload\n")
        model_py = project / "model" / "model.py"
        model_py.write_text(MODEL.replace("VALUE", "0"))

        def answers(value: int, path: str = "development") -> bool:
            r = http.post(f"/models/bench-reload/{path}/predict", json={})
            return r.status_code == 200 and r.json()["value"] == value

        started = time.perf_counter()
        dep = client.push(project, development=True)["deployment"]
        _wait(lambda: answers(0), 600, "the development deployment")
        first_dev = time.perf_counter() - started

        direct: list[float] = []
        for i in range(1, args.edits + 1):
            model_py.write_text(MODEL.replace("VALUE", str(i)))
            t0 = time.perf_counter()
            client.development_sync("bench-reload", client.upload(project))
            _wait(lambda i=i: answers(i), 30, f"edit {i}")
            direct.append(time.perf_counter() - t0)

        watcher = subprocess.Popen(
            [sys.executable, "-m", "kingpost.cli", "watch", str(project)],
            env=env, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        time.sleep(2)  # its first pass (nothing to apply)
        watched: list[float] = []
        base = 1000
        for i in range(base + 1, base + args.edits + 1):
            model_py.write_text(MODEL.replace("VALUE", str(i)))
            t0 = time.perf_counter()
            _wait(lambda i=i: answers(i), 30, f"watched edit {i}")
            watched.append(time.perf_counter() - t0)
            time.sleep(0.3)

        pushes: list[float] = []
        for j in range(args.pushes):
            value = 5000 + j
            model_py.write_text(MODEL.replace("VALUE", str(value)))
            t0 = time.perf_counter()
            new = client.push(project)["deployment"]
            _wait(lambda n=new, v=value: answers(v, f"deployment/{n['id']}"), 600, "a push")
            pushes.append(time.perf_counter() - t0)

        print(f"development deployment {dep['id']}: first push until it answered "
              f"{first_dev:.2f} s")  # fmt: skip
        print("| what | n | p50 (s) | p95 (s) | min | max |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        print(_line("edit -> next predict, `kingpost watch` (poll 0.2 s)", watched))
        print(_line("edit -> next predict, upload + sync call", direct))
        print(_line("fresh push of the same project -> answers", pushes))
        print(f"fresh push p50 / watched reload p50: "
              f"{statistics.median(pushes) / statistics.median(watched):.1f}x")  # fmt: skip
    finally:
        for proc in (watcher, server):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)


if __name__ == "__main__":
    main()
