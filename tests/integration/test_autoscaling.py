"""Autoscaling and scale-to-zero with real replicas behind a real `kingpost server`.

Small windows and delays (Baseten's lowest window, 10 s; no delay) keep these quick."""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import shutil
import time
from pathlib import Path
from typing import Any

import httpx

from helpers.platform import EXAMPLES, Platform, wait_for

FAST = ("--autoscaling-window", "10", "--scale-down-delay", "0")


def _push(
    platform: Platform, tmp_path: Path, name: str, server: str | None = None
) -> tuple[str, str]:
    project = tmp_path / name
    shutil.copytree(EXAMPLES / "echo-server", project)
    config = (project / "config.yaml").read_text()
    (project / "config.yaml").write_text(
        config.replace("model_name: echo-server", f"model_name: {name}")
    )
    if server is not None:
        (project / "server.py").write_text(server)
    out = platform.cli("push", str(project), "--wait", "--output", "json")
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(out.stdout)
    return result["model"]["id"], result["deployment"]["id"]


def _set(platform: Platform, model: str, *args: str) -> None:
    out = platform.cli("autoscaling", "set", model, "--environment", "production", *args)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ACCEPTED" in out.stdout


def _describe(platform: Platform, dep_id: str) -> dict[str, Any]:
    with platform.client() as c:
        return c.deployment(dep_id)


def test_scale_to_zero_then_a_burst_wakes_it_and_every_request_is_answered(
    platform: Platform, tmp_path: Path
) -> None:
    p = platform  # the module's: each test has its own model
    model, dep = _push(p, tmp_path, "sleepy")
    _set(p, "sleepy", "--min-replica", "0", "--max-replica", "2", *FAST)
    p.wait_status(dep, "SCALED_TO_ZERO", timeout=40)
    shown = _describe(p, dep)
    assert shown["replicas_wanted"] == 0 and "zero" in shown["scaling_reason"]

    def call(i: int) -> tuple[int, float]:
        started = time.perf_counter()
        with p.gateway() as gw:
            r = gw.post(f"/models/{model}/production/predict", json={"i": i})
        assert r.json()["echo"] == {"i": i}, r.text
        return r.status_code, time.perf_counter() - started

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(call, range(20)))
    assert [status for status, _ in answers] == [200] * 20
    # Held while one replica started, then answered: well under the hold timeout.
    assert max(took for _, took in answers) < 10, answers
    assert _describe(p, dep)["status"] == "ACTIVE"


def test_a_restarted_control_plane_at_zero_wakes_on_the_next_request(
    fresh_platform: Platform, tmp_path: Path
) -> None:
    p = fresh_platform
    model, dep = _push(p, tmp_path, "napper")
    _set(p, "napper", "--min-replica", "0", *FAST)
    p.wait_status(dep, "SCALED_TO_ZERO", timeout=40)
    p.stop()
    p.start()
    assert _describe(p, dep)["status"] == "SCALED_TO_ZERO"  # it stays at zero
    with p.gateway() as gw:
        r = gw.post(f"/models/{model}/production/predict", json={"back": 1})
    assert r.status_code == 200 and r.json()["echo"] == {"back": 1}, r.text


def test_scales_up_under_sustained_concurrency_and_down_after_the_delay(
    platform: Platform, tmp_path: Path
) -> None:
    p = platform  # the module's: each test has its own model
    model, dep = _push(p, tmp_path, "busy")
    _set(p, "busy", "--max-replica", "3", "--concurrency-target", "1", *FAST)
    stop = time.monotonic() + 60
    failures: list[str] = []

    def stream(_: int) -> None:
        with p.gateway() as gw:
            while time.monotonic() < stop and _describe_ready(p, dep) < 3:
                r = gw.get(f"/models/{model}/production/sync/stream?n=25")  # ~0.5 s each
                if r.status_code != 200:
                    failures.append(r.text)

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        list(pool.map(stream, range(3)))
    assert not failures
    assert _describe_ready(p, dep) == 3, _describe(p, dep)
    # Idle now: back down to min_replica, one step at a time, no flapping back up.
    seen: list[int] = []

    def at_min() -> bool:
        d = _describe(p, dep)
        seen.append(d["replicas_wanted"])
        return d["replicas_wanted"] == 1 and d["replicas_ready"] == 1

    wait_for(at_min, 60, "scale down to min_replica")
    changes = [b for a, b in itertools.pairwise(seen) if a != b]
    assert changes == sorted(changes, reverse=True), seen


def _describe_ready(p: Platform, dep: str) -> int:
    return int(_describe(p, dep).get("replicas_ready") or 0)


SLOW_START = """\
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

time.sleep(30)  # a server that takes long to come up


class H(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()


ThreadingHTTPServer(("0.0.0.0", 8000), H).serve_forever()
"""


def test_queue_full_and_wait_expired_are_clean_json_with_retry_after(tmp_path: Path) -> None:
    """A deployment that never gets ready: two requests may wait (503 after 3 s, the wait
    expired), the others find the queue full (429 at once)."""
    env = {"KINGPOST_GATEWAY_QUEUE_LIMIT": "2", "KINGPOST_GATEWAY_HOLD_TIMEOUT": "3"}
    p = Platform(tmp_path / "home", extra_env=env).start()
    try:
        project = tmp_path / "slow"
        shutil.copytree(EXAMPLES / "echo-server", project)
        cfg = (project / "config.yaml").read_text().replace("echo-server", "slow")
        (project / "config.yaml").write_text(cfg)
        (project / "server.py").write_text(SLOW_START)
        out = p.cli("push", str(project), "--output", "json")  # no --wait: it never gets ready
        assert out.returncode == 0, out.stderr
        model = json.loads(out.stdout)["model"]["id"]

        def call(_: int) -> httpx.Response:
            with p.gateway() as gw:
                return gw.post(f"/models/{model}/production/predict", json={}, timeout=15)

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(call, range(4)))
        codes = sorted((r.status_code, r.json()["code"]) for r in answers)
        assert codes == [(429, "overloaded")] * 2 + [(503, "unavailable")] * 2, codes
        for r in answers:
            assert r.headers["retry-after"] == "1"
            assert r.headers["content-type"] == "application/json"
        expired = next(r for r in answers if r.status_code == 503).json()["error"]
        full = next(r for r in answers if r.status_code == 429).json()["error"]
        assert "no replica became ready within 3s" in expired and "2 requests queued" in full
    finally:
        p.stop()


def test_wake_prewarms_a_deployment_at_zero(platform: Platform, tmp_path: Path) -> None:
    p = platform  # the module's: each test has its own model
    model, dep = _push(p, tmp_path, "warm")
    _set(p, "warm", "--min-replica", "0", *FAST)
    p.wait_status(dep, "SCALED_TO_ZERO", timeout=40)
    with p.gateway() as gw:
        r = gw.post(f"/models/{model}/deployment/{dep}/wake")
    assert (r.status_code, r.json()) == (202, {}), r.text
    p.wait_status(dep, "ACTIVE", timeout=10)  # no request has been sent to it
    with p.client() as c:  # the management API's wake, on one already awake: harmless
        assert c.wake("warm", dep) == {}
