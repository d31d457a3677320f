"""Async inference end to end: a real `kingpost server`, real replicas of a custom server
(tests/fixtures/models/async_worker) and a real webhook receiver started here."""

from __future__ import annotations

import json
import shutil
import signal
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from helpers.platform import REPO, Platform, free_port, wait_for
from kingpost.asyncq.webhooks import SIGNATURE_HEADER, verify

MODEL = REPO / "tests" / "fixtures" / "models" / "async_worker"
DONE = {"SUCCEEDED", "FAILED", "EXPIRED", "CANCELED", "WEBHOOK_FAILED"}
ASYNC_WORKER_ENV = {
    "KINGPOST_ASYNC_SHARE": "1",
    "KINGPOST_ISOLATION": "off",  # the model appends to a log file the test reads
    "KINGPOST_NETNS": "off",
}


class Receiver:
    """A webhook receiver: ``/ok`` answers 200, ``/flaky`` 503 twice then 200, ``/down``
    always 500; every delivery is kept with its headers."""

    def __init__(self) -> None:
        self.got: list[tuple[str, dict[str, str], bytes]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with receiver.lock:
                    receiver.got.append((self.path, dict(self.headers.items()), body))
                    seen = sum(1 for p, _, _ in receiver.got if p == self.path)
                failing = self.path == "/down" or (self.path == "/flaky" and seen <= 2)
                self.send_response(
                    503 if self.path == "/flaky" and failing else 500 if failing else 200
                )
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def deliveries(self, path: str) -> list[tuple[dict[str, str], bytes]]:
        with self.lock:
            return [(h, b) for p, h, b in self.got if p == path]


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    home = tmp_path_factory.mktemp("async")
    env = {
        "KINGPOST_ASYNC_WEBHOOK_ALLOW_HTTP": "true",
        "KINGPOST_ASYNC_WEBHOOK_INITIAL_DELAY": "0.2",
        "KINGPOST_ASYNC_WEBHOOK_ATTEMPTS": "3",
        **ASYNC_WORKER_ENV,
    }
    p = Platform(home / "home", extra_env=env).start()
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture(scope="module")
def model(platform: Platform, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return push_async_worker(platform, tmp_path_factory)


def push_async_worker(
    platform: Platform, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """The async_worker model pushed and ready: its model and deployment ids, and the file
    it appends each call to (``CALL_LOG``)."""
    project = tmp_path_factory.mktemp("proj") / "async-worker"
    shutil.copytree(MODEL, project)
    log = project.parent / "calls.log"
    log.touch()
    # No network namespace here (the model writes a file the test reads): another home's
    # replica of it may be running beside this one (xdist), so a port of its own.
    port = free_port()
    config = project / "config.yaml"
    config.write_text(config.read_text().replace("server_port: 8000", f"server_port: {port}"))
    with config.open("a") as fh:
        fh.write(f"environment_variables:\n  CALL_LOG: {log}\n  ASYNC_WORKER_PORT: '{port}'\n")
    out = platform.cli("push", str(project), "--wait", "--output", "json")
    assert out.returncode == 0, out.stdout + out.stderr
    pushed = json.loads(out.stdout)
    return {"id": pushed["model"]["id"], "dep": pushed["deployment"]["id"], "log": log}


def enqueue(platform: Platform, model: dict[str, Any], body: dict[str, Any]) -> str:
    with platform.gateway() as gw:
        r = gw.post(f"/models/{model['id']}/production/async_predict", json=body)
    assert r.status_code == 201, r.text
    return str(r.json()["request_id"])


def status(platform: Platform, model: dict[str, Any], rid: str, what: str = "") -> Any:
    with platform.gateway() as gw:
        r = gw.get(f"/models/{model['id']}/async_request/{rid}{what}")
    assert r.status_code == 200, r.text
    return r.json()


def wait_done(platform: Platform, model: dict[str, Any], rid: str, timeout: float = 60) -> Any:
    return wait_for(
        lambda: (s := status(platform, model, rid))["status"] in DONE and s,
        timeout,
        f"async request {rid} to finish",
    )


def calls(model: dict[str, Any]) -> list[tuple[str, str]]:
    lines = Path(model["log"]).read_text().splitlines()
    return [(k, rid) for k, rid in (line.split(" ", 1) for line in lines)]


def test_result_priority_order_and_queue_status(platform: Platform, model: dict[str, Any]) -> None:
    blocker = enqueue(platform, model, {"model_input": {"key": "block", "sleep": 1.5}})
    wait_for(lambda: status(platform, model, blocker)["status"] == "IN_PROGRESS", 30, "block")
    ids = {
        prio: enqueue(platform, model, {"model_input": {"key": f"p{prio}"}, "priority": prio})
        for prio in (2, 1, 0)
    }
    with platform.gateway() as gw:
        qs = gw.get(f"/models/{model['id']}/deployment/{model['dep']}/async_queue_status").json()
    assert qs["num_queued_requests"] == 3 and qs["num_in_progress_requests"] == 1
    for rid in ids.values():
        assert wait_done(platform, model, rid)["status"] == "SUCCEEDED"
    order = [k for k, _ in calls(model) if k.startswith("p")]
    assert order == ["p0", "p1", "p2"]  # highest priority first, whatever the arrival
    res = status(platform, model, ids[0], "/result")
    assert res["data"] == {"echo": {"key": "p0"}} and res["errors"] == []
    assert [rid for k, rid in calls(model) if k == "p0"] == [ids[0]]  # its id reached it


def test_model_errors_are_retried_with_backoff(platform: Platform, model: dict[str, Any]) -> None:
    retry = {"max_attempts": 3, "initial_delay_ms": 100, "max_delay_ms": 200}
    ok = enqueue(
        platform,
        model,
        {"model_input": {"key": "r-ok", "fail_times": 2}, "inference_retry_config": retry},
    )
    got = wait_done(platform, model, ok)
    assert (got["status"], got["attempts"]) == ("SUCCEEDED", 3)
    bad = enqueue(
        platform,
        model,
        {
            "model_input": {"key": "r-bad", "fail_times": 9},
            "inference_retry_config": {**retry, "max_attempts": 2},
        },
    )
    got = wait_done(platform, model, bad)
    assert (got["status"], got["attempts"]) == ("FAILED", 2)
    assert got["errors"][0]["code"] == "MODEL_PREDICT_ERROR"
    assert "failing on purpose, call 2" in got["errors"][0]["message"]
    invalid = enqueue(
        platform,
        model,
        {"model_input": {"key": "r-400", "bad": True}, "inference_retry_config": retry},
    )
    got = wait_done(platform, model, invalid)
    assert (got["status"], got["attempts"], got["errors"][0]["code"]) == (
        "FAILED",
        1,
        "MODEL_INVALID_INPUT",
    )  # a 4xx is not retried


def test_streaming_output_is_refused(platform: Platform, model: dict[str, Any]) -> None:
    rid = enqueue(platform, model, {"model_input": {"key": "s", "stream": True}})
    got = wait_done(platform, model, rid)
    assert got["status"] == "FAILED"
    assert got["errors"][0]["code"] == "ASYNC_REQUEST_NOT_SUPPORTED"
    assert "does not support streaming" in got["errors"][0]["message"]


def test_cancel_and_expiry(platform: Platform, model: dict[str, Any], receiver: Receiver) -> None:
    blocker = enqueue(platform, model, {"model_input": {"key": "long", "sleep": 11}})
    wait_for(lambda: status(platform, model, blocker)["status"] == "IN_PROGRESS", 30, "long")
    doomed = enqueue(
        platform,
        model,
        {
            "model_input": {"key": "doomed"},
            "max_time_in_queue_seconds": 10,
            "webhook_endpoint": receiver.url + "/expired",
        },
    )
    gone = enqueue(platform, model, {"model_input": {"key": "gone"}})
    with platform.gateway() as gw:
        r = gw.delete(f"/models/{model['id']}/async_request/{gone}")
        assert r.status_code == 200 and r.json()["status"] == "CANCELED"
        r = gw.delete(f"/models/{model['id']}/async_request/{blocker}")
        assert r.status_code == 409 and "IN_PROGRESS" in r.json()["error"]
    got = wait_done(platform, model, doomed, timeout=40)
    assert got["status"] == "EXPIRED" and got["errors"][0]["code"] == "EXPIRED"
    # An expiry is a finish like any other: its webhook goes out (it never did once).
    wait_for(lambda: status(platform, model, doomed)["webhook_status"] == "SUCCEEDED", 30, "hook")
    ((_, body),) = receiver.deliveries("/expired")
    sent = json.loads(body)
    assert (sent["request_id"], sent["data"]) == (doomed, None)
    assert sent["errors"][0]["code"] == "EXPIRED"
    wait_done(platform, model, blocker, timeout=40)
    keys = [k for k, _ in calls(model)]
    assert "doomed" not in keys and "gone" not in keys


def test_signed_webhooks_retry_and_fail_with_the_result_kept(
    platform: Platform, model: dict[str, Any], receiver: Receiver
) -> None:
    made = platform.cli("webhooks", "secret", "create")
    assert made.returncode == 0, made.stderr
    secret = made.stdout.strip().splitlines()[-1]
    assert secret.startswith("whsec_")
    ok = enqueue(
        platform, model, {"model_input": {"key": "w1"}, "webhook_endpoint": receiver.url + "/ok"}
    )
    flaky = enqueue(
        platform, model, {"model_input": {"key": "w2"}, "webhook_endpoint": receiver.url + "/flaky"}
    )
    down = enqueue(
        platform, model, {"model_input": {"key": "w3"}, "webhook_endpoint": receiver.url + "/down"}
    )
    wait_for(lambda: status(platform, model, ok)["webhook_status"] == "SUCCEEDED", 60, "ok hook")
    ((headers, body),) = receiver.deliveries("/ok")
    sent = json.loads(body)
    assert sent["request_id"] == ok and sent["model_id"] == model["id"]
    assert sent["deployment_id"] == model["dep"] and sent["data"] == {"echo": {"key": "w1"}}
    assert sent["errors"] == [] and sent["type"] and sent["time"]
    assert verify(body, headers[SIGNATURE_HEADER], secret)
    assert not verify(body, headers[SIGNATURE_HEADER], "whsec_wrong")
    assert not verify(body.replace(b"w1", b"w9"), headers[SIGNATURE_HEADER], secret)

    got = wait_for(
        lambda: (s := status(platform, model, flaky))["webhook_status"] == "SUCCEEDED" and s,
        60,
        "flaky hook",
    )
    assert got["status"] == "SUCCEEDED" and got["webhook_attempts"] == 3
    assert len(receiver.deliveries("/flaky")) == 3

    got = wait_for(
        lambda: (s := status(platform, model, down))["status"] == "WEBHOOK_FAILED" and s,
        60,
        "down hook",
    )
    assert got["webhook_status"] == "FAILED" and got["webhook_attempts"] == 3
    assert "HTTP 500" in got["webhook_error"]
    assert status(platform, model, down, "/result")["data"] == {"echo": {"key": "w3"}}


def test_webhooks_to_the_control_plane_itself_are_refused(
    platform: Platform, model: dict[str, Any]
) -> None:
    rid = enqueue(
        platform,
        model,
        {"model_input": {"key": "ssrf"}, "webhook_endpoint": f"{platform.api_url}/v1/health"},
    )
    got = wait_for(
        lambda: (s := status(platform, model, rid))["webhook_status"] == "FAILED" and s,
        60,
        "refused hook",
    )
    assert "own port" in got["webhook_error"] and got["webhook_attempts"] == 1


def test_kill_9_loses_nothing_and_reruns_nothing_recorded(
    platform: Platform, model: dict[str, Any]
) -> None:
    first = enqueue(platform, model, {"model_input": {"key": "k-first"}})
    assert wait_done(platform, model, first)["status"] == "SUCCEEDED"
    inflight = enqueue(platform, model, {"model_input": {"key": "k-inflight", "sleep": 30}})
    queued = [enqueue(platform, model, {"model_input": {"key": f"k-q{i}"}}) for i in range(3)]
    wait_for(lambda: ("k-inflight", inflight) in calls(model), 30, "the long run to begin")
    # Begun and claimed (a run starts before the workers' next settle records its claim).
    wait_for(lambda: status(platform, model, inflight)["status"] == "IN_PROGRESS", 30, "claim")
    platform.stop(signal.SIGKILL)
    platform.start()
    for rid in [inflight, *queued]:
        assert wait_done(platform, model, rid, timeout=90)["status"] == "SUCCEEDED"
    keys = [k for k, _ in calls(model)]
    assert keys.count("k-first") == 1  # recorded before the kill: never run again
    assert all(keys.count(f"k-q{i}") == 1 for i in range(3))
    assert keys.count("k-inflight") == 2  # begun, never recorded: run again
    assert status(platform, model, inflight)["attempts"] == 2


def test_validation_errors_through_the_real_gateway(
    platform: Platform, model: dict[str, Any]
) -> None:
    with platform.gateway() as gw:
        path = f"/models/{model['id']}/production/async_predict"
        r = gw.post(path, json={"model_input": 1, "max_time_in_queue_seconds": 5})
        assert r.status_code == 400 and r.json()["field"] == "max_time_in_queue_seconds"
        r = gw.post(path, json={"model_input": "x" * (300 * 1024)})
        assert r.status_code == 413 and r.json()["limit_bytes"] == 256 * 1024
    r = httpx.post(platform.gateway_url + path, json={"model_input": 1})
    assert r.status_code == 401


def test_async_work_wakes_a_deployment_scaled_to_zero(
    fresh_platform: Platform, tmp_path: Path
) -> None:
    """On a server of its own, with the default isolation: without it, a replica started
    by the wake finds the host port still bound (the process engine's check; seen here
    while writing this test, not in scope of async inference)."""
    platform = fresh_platform
    project = tmp_path / "async-zero"
    shutil.copytree(MODEL, project)
    config = project / "config.yaml"
    config.write_text(
        config.read_text().replace("model_name: async-worker", "model_name: async-zero")
    )
    out = platform.cli("push", str(project), "--wait", "--output", "json")
    assert out.returncode == 0, out.stdout + out.stderr
    pushed = json.loads(out.stdout)
    zero = {"id": pushed["model"]["id"], "dep": pushed["deployment"]["id"]}
    out = platform.cli(
        "autoscaling",
        "set",
        "async-zero",
        "--environment",
        "production",
        "--min-replica",
        "0",
        "--autoscaling-window",
        "10",
        "--scale-down-delay",
        "0",
    )
    assert out.returncode == 0, out.stdout + out.stderr
    platform.wait_status(zero["dep"], "SCALED_TO_ZERO", timeout=60)
    rid = enqueue(platform, zero, {"model_input": {"key": "z"}})
    got = wait_done(platform, zero, rid, timeout=90)
    assert got["status"] == "SUCCEEDED" and got["attempts"] == 1, got["errors"]
    assert status(platform, zero, rid, "/result")["data"] == {"echo": {"key": "z"}}


def test_a_run_the_gateway_turns_away_goes_back_to_the_queue(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """A run the gateway refuses for now (here its 429: the deployment's one slot is taken
    and its queue, one long, is full) is not an attempt: the request goes back to the
    queue and runs once the slot frees. Recording that release once failed on every
    tick, so the request stayed IN_PROGRESS and no other async request was taken again."""
    home = tmp_path_factory.mktemp("async-release")
    env = {**ASYNC_WORKER_ENV, "KINGPOST_GATEWAY_QUEUE_LIMIT": "1"}
    platform = Platform(home / "home", extra_env=env).start()
    try:
        model = push_async_worker(platform, tmp_path_factory)
        url = f"{platform.gateway_url}/models/{model['id']}/production/predict"
        auth = {"Authorization": f"Api-Key {platform.api_key}"}
        answers: list[int] = []

        def sync(body: dict[str, Any]) -> None:
            answers.append(httpx.post(url, json=body, headers=auth, timeout=60).status_code)

        def metric(name: str, *labels: str) -> float:
            text = httpx.get(f"{platform.api_url}/metrics", headers=auth).text
            lines = [x for x in text.splitlines() if x.startswith(name + "{")]
            lines = [x for x in lines if all(label in x for label in labels)]
            return sum(float(x.rsplit(" ", 1)[1]) for x in lines)  # its one deployment

        def queued() -> float:
            return metric("kingpost_requests_queued")

        holder = threading.Thread(target=sync, args=({"key": "hold", "sleep": 8},))
        holder.start()
        wait_for(lambda: any(k == "hold" for k, _ in calls(model)), 30, "the slot to be held")
        waiter = threading.Thread(target=sync, args=({"key": "wait"},))
        waiter.start()
        wait_for(lambda: queued() == 1, 6, "a sync request to wait in the gateway's queue")
        rid = enqueue(platform, model, {"model_input": {"key": "turned-away"}})
        wait_for(  # the run was turned away (429): back in the queue, its attempt undone
            lambda: (
                metric("kingpost_requests_total", 'code_class="4xx"') >= 1
                and status(platform, model, rid)["status"] == "QUEUED"
            ),
            6,
            "the run to be turned away and released",
        )
        got = wait_done(platform, model, rid, timeout=60)
        holder.join(30)
        waiter.join(30)
        assert answers == [200, 200]
        assert got["status"] == "SUCCEEDED" and got["attempts"] == 1, got
        assert [k for k, _ in calls(model)].count("turned-away") == 1
        log = platform.log.read_text()
        assert "a worker tick failed" not in log, log[-3000:]
        after = enqueue(platform, model, {"model_input": {"key": "after"}})
        assert wait_done(platform, model, after)["status"] == "SUCCEEDED"
    finally:
        platform.stop()
