"""Promotions through the whole platform with real replicas (process engine) and a real
load loop through the gateway: no request fails while traffic moves, in any outcome."""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from helpers.platform import REPO, Platform, wait_for

FIXTURE = REPO / "tests" / "fixtures" / "models" / "rollout"
FAST = 0.2  # stabilization, so each step is long enough to be seen


def project(tmp_path: Path, version: str, **files: str) -> Path:
    """The fixture as version ``version`` (files: LOAD_DELAY, NEVER_READY...)."""
    out = tmp_path / version
    shutil.copytree(FIXTURE, out)
    (out / "VERSION").write_text(version)
    for name, text in files.items():
        (out / name).write_text(text)
    return out


class Load:
    """Two threads posting to the environment as fast as it answers."""

    def __init__(self, platform: Platform, model: str, environment: str = "production") -> None:
        self.platform, self.path = platform, f"/models/{model}/environments/{environment}/predict"
        self.answers: list[tuple[float, int, str]] = []
        self.errors: list[str] = []
        self.slowest = 0.0
        self._stop = threading.Event()

    def _run(self) -> None:
        with self.platform.gateway() as gw:
            while not self._stop.is_set():
                began = time.monotonic()
                try:
                    r = gw.post(self.path, json={})
                    self.slowest = max(self.slowest, time.monotonic() - began)
                    version = r.json().get("version", "") if r.status_code == 200 else r.text
                    self.answers.append((time.monotonic(), r.status_code, version))
                except httpx.HTTPError as exc:
                    self.errors.append(repr(exc))

    @contextmanager
    def running(self) -> Iterator[Load]:
        threads = [threading.Thread(target=self._run, daemon=True) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            yield self
        finally:
            self._stop.set()
            for t in threads:
                t.join(timeout=30)

    def failed(self) -> list[Any]:
        return self.errors + [a for a in self.answers if a[1] != 200]

    def versions(self, since: float = 0.0) -> set[str]:
        return {v for t, _, v in self.answers if t >= since}


def settings(client: Any, model: str, **config: Any) -> None:
    body = {"rolling_deploy": True, "rolling_deploy_config": config, "ready_timeout_seconds": 60}
    client.update_environment(model, "production", body)


def push(platform: Platform, path: Path, replicas: int, **kw: Any) -> dict[str, Any]:
    with platform.client() as c:
        return c.push(path, min_replicas=replicas, max_replicas=replicas, **kw)


def rollout(platform: Platform, model: str) -> dict[str, Any]:
    with platform.client() as c:
        return c.promotion(model, "production")


def until(platform: Platform, model: str, *statuses: str, timeout: float = 60) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        r = rollout(platform, model)
        return r if r["status"] in statuses else None

    return wait_for(reached, timeout, f"rollout of {model} to be {statuses}")


def serving_v1(platform: Platform, tmp_path: Path, model: str, replicas: int) -> str:
    first = push(platform, project(tmp_path, "v1"), replicas, model_name=model)
    dep = first["deployment"]["id"]
    platform.wait_status(dep, "ACTIVE", timeout=60)
    return str(dep)


def test_a_promotion_waits_for_a_slow_candidate_and_no_request_fails(
    platform: Platform, tmp_path: Path
) -> None:
    serving_v1(platform, tmp_path, "swap", 1)
    load = Load(platform, "swap")
    with load.running():
        time.sleep(0.5)
        v2 = project(tmp_path, "v2", LOAD_DELAY="3")
        pushed = push(platform, v2, 1, model_name="swap", environment="production")
        assert pushed["deployment"]["environments"] == []  # not yet: it is loading
        done = until(platform, "swap", "SUCCEEDED", "FAILED")
        time.sleep(0.5)
    assert done["status"] == "SUCCEEDED", done
    assert load.failed() == []
    assert load.slowest < 1.5  # no request waited for v2's 3 s load
    # v1 answered while v2 loaded; afterwards v2 alone.
    assert load.versions() == {"v1", "v2"}
    assert load.versions(since=load.answers[-1][0] - 0.3) == {"v2"}


def test_a_rolling_promotion_moves_a_quarter_per_step_with_every_request_answered(
    platform: Platform, tmp_path: Path
) -> None:
    first = serving_v1(platform, tmp_path, "rolling", 4)
    with platform.client() as c:
        settings(c, "rolling", max_surge_percent=25, stabilization_time_seconds=FAST)
        desc = platform.cli("environments", "describe", "rolling", "production")
        assert "surge 25%" in desc.stdout, desc.stdout + desc.stderr
    load = Load(platform, "rolling")
    shares: list[tuple[int, float]] = []
    with load.running():
        push(platform, project(tmp_path, "v2"), 4, model_name="rolling", environment="production")

        def finished() -> bool | None:
            r = rollout(platform, "rolling")
            row = (r["step"], r["candidate_traffic_percent"])
            if not shares or shares[-1] != row:
                shares.append(row)
            return r["status"] in ("SUCCEEDED", "FAILED", "CANCELED") or None

        wait_for(finished, 90, "the rolling promotion to finish")
    assert rollout(platform, "rolling")["status"] == "SUCCEEDED"
    assert load.failed() == []
    assert len(load.answers) > 50
    # Traffic followed the steps: a quarter, a half, three quarters, all.
    moved = [p for _, p in shares]
    assert [p for p in (25.0, 50.0, 75.0, 100.0) if p in moved] == [25.0, 50.0, 75.0, 100.0]
    assert moved == sorted(moved)
    with platform.client() as c:
        assert c.deployment(first)["desired_state"] == "inactive"  # scaled down, then off


def test_pause_resume_and_cancel_midway_return_everything_to_v1(
    platform: Platform, tmp_path: Path
) -> None:
    serving_v1(platform, tmp_path, "steer", 4)
    with platform.client() as c:
        # Steps long enough for the CLI calls below to land mid-way.
        settings(c, "steer", max_surge_percent=25, stabilization_time_seconds=1.5)
    load = Load(platform, "steer")
    with load.running():
        push(platform, project(tmp_path, "v2"), 4, model_name="steer", environment="production")
        out = platform.cli("rollouts", "pause", "steer", "--environment", "production")
        assert out.returncode == 0, out.stderr
        paused = until(platform, "steer", "PAUSED")
        time.sleep(1.0)  # nothing moves while paused
        still = rollout(platform, "steer")
        assert (still["status"], still["step"]) == ("PAUSED", paused["step"])
        assert still["candidate_traffic_percent"] == paused["candidate_traffic_percent"]
        again = platform.cli("rollouts", "resume", "steer", "--environment", "production")
        assert again.returncode == 0, again.stderr
        wrong = platform.cli("rollouts", "resume", "steer", "--environment", "production")
        assert wrong.returncode != 0 and "IN_PROGRESS" in wrong.stderr  # 409: running already
        wait_for(
            lambda: rollout(platform, "steer")["step"] > paused["step"] or None, 30, "next step"
        )
        with platform.client() as c:
            c.promotion_action("steer", "production", "cancel")
        until(platform, "steer", "CANCELED")
        settled = time.monotonic()
        time.sleep(1.0)
    assert load.failed() == []
    assert load.versions() == {"v1", "v2"}
    assert load.versions(since=settled + 0.3) == {"v1"}
    out = platform.cli("rollouts", "cancel", "steer", "--environment", "production")
    assert out.returncode != 0 and "CANCELED" in out.stderr  # 409 with the state


def test_force_complete_and_a_candidate_never_ready(platform: Platform, tmp_path: Path) -> None:
    serving_v1(platform, tmp_path, "force", 2)
    with platform.client() as c:
        settings(c, "force", max_surge_percent=50, stabilization_time_seconds=60)
    load = Load(platform, "force")
    with load.running():
        push(platform, project(tmp_path, "v2"), 2, model_name="force", environment="production")
        until(platform, "force", "IN_PROGRESS")
        wait_for(lambda: rollout(platform, "force")["phase"] == "STABILIZE" or None, 30, "ready")
        with platform.client() as c:
            c.promotion_action("force", "production", "force_complete")
        until(platform, "force", "SUCCEEDED", timeout=20)
        # The next promotion's candidate never gets ready: it fails, v2 keeps serving.
        with platform.client() as c:
            c.update_environment(
                "force", "production",
                {"rolling_deploy": False, "ready_timeout_seconds": 3},
            )  # fmt: skip
        push(
            platform, project(tmp_path, "v3", NEVER_READY=""), 1, model_name="force",
            environment="production",
        )  # fmt: skip
        failed = until(platform, "force", "FAILED", timeout=30)
        time.sleep(0.5)
    assert "not ready" in failed["message"] and "ready_timeout_seconds" in failed["message"]
    assert load.failed() == []
    assert load.versions(since=load.answers[-1][0] - 0.3) == {"v2"}


def test_a_killed_control_plane_resumes_the_rollout_at_its_step(tmp_path: Path) -> None:
    platform = Platform(tmp_path / "home").start()
    gateway = json.loads((platform.home / "run" / "gateway.json").read_text())["pid"]
    try:
        serving_v1(platform, tmp_path, "restart", 4)
        with platform.client() as c:
            settings(c, "restart", max_surge_percent=25, stabilization_time_seconds=1.5)
        load = Load(platform, "restart")
        with load.running():
            push(
                platform, project(tmp_path, "v2"), 4, model_name="restart", environment="production"
            )
            wait_for(lambda: rollout(platform, "restart")["step"] >= 2 or None, 60, "step 2")
            platform.stop(signal.SIGKILL)
            answered = len(load.answers)
            time.sleep(1.5)  # no control plane: the gateway serves on with the last table
            assert len(load.answers) > answered, load.failed()[-3:]
            platform.start()
            resumed = rollout(platform, "restart")
            assert resumed["status"] == "IN_PROGRESS" and resumed["step"] >= 2, resumed
            done = until(platform, "restart", "SUCCEEDED", "FAILED", timeout=90)
            time.sleep(0.5)
        assert done["status"] == "SUCCEEDED", done
        assert load.failed() == []
        assert json.loads((platform.home / "run" / "gateway.json").read_text())["pid"] == gateway
        with platform.gateway() as gw:
            r = gw.post("/models/restart/environments/production/predict", json={})
        assert r.json() == {"version": "v2"}
    finally:
        platform.stop()


def test_a_canary_moves_traffic_in_stages_with_every_request_answered(
    platform: Platform, tmp_path: Path
) -> None:
    serving_v1(platform, tmp_path, "canary", 1)
    out = platform.cli(
        "environments", "update", "canary", "production", "--canary",
        "--ramp-up-duration-seconds", "3",
    )  # fmt: skip
    assert out.returncode == 0 and "canary over 3 s" in out.stdout, out.stdout + out.stderr
    load = Load(platform, "canary")
    shares: list[float] = []
    with load.running():
        push(platform, project(tmp_path, "v2"), 1, model_name="canary", environment="production")

        def finished() -> bool | None:
            r = rollout(platform, "canary")
            if not shares or shares[-1] != r["candidate_traffic_percent"]:
                shares.append(r["candidate_traffic_percent"])
            return r["status"] == "SUCCEEDED" or None

        wait_for(finished, 60, "the canary to finish")
    assert load.failed() == []
    assert shares == sorted(shares) and shares[-1] == 100.0
    assert len([s for s in shares if 0 < s < 100]) >= 5, shares  # stages, not one jump
