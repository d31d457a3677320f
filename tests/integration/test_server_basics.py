"""The model server against real fixture projects: basics, readiness, errors."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import msgpack
from test_server_harness import FIXTURES, ready_server, run_server

PREDICT = "/v1/models/model:predict"


def test_basic_predict_gets_init_kwargs_and_loaded_state(tmp_path: Path) -> None:
    env = {"KINGPOST_ENVIRONMENT": json.dumps({"name": "production"})}
    with ready_server("basic", tmp_path, env=env) as (_, client):
        r = client.post(PREDICT, json={"text": "hi"}, headers={"X-Baseten-Request-Id": "req-1"})
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/json"
        assert r.headers["x-baseten-request-id"] == "req-1"
        assert r.json() == {
            "echo": {"text": "hi"},
            "loaded": True,
            "greeting": "hello",
            "model_name": "basic",
            "environment": {"name": "production"},
        }
        assert client.get("/").text == "true"
        assert client.get("/v1/models/model").json() == {}


def test_keep_alive_serves_many_requests_on_one_connection(tmp_path: Path) -> None:
    with ready_server("basic", tmp_path) as (_, client):
        for i in range(50):
            assert client.post(PREDICT, json=i).json()["echo"] == i
        gen = client.get("/v1/models/model")
        assert gen.headers.get("connection") != "close"


def test_bad_json_is_400_with_truss_shape(tmp_path: Path) -> None:
    with ready_server("basic", tmp_path) as (_, client):
        r = client.post(PREDICT, content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400
        assert r.json()["error"].startswith("Invalid JSON payload")


def test_msgpack_in_and_out(tmp_path: Path) -> None:
    with ready_server("basic", tmp_path) as (_, client):
        body = msgpack.packb({"blob": b"\x00\x01", "n": 3})
        r = client.post(PREDICT, content=body, headers={"content-type": "application/octet-stream"})
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/octet-stream"
        assert msgpack.unpackb(r.content)["echo"] == {"blob": b"\x00\x01", "n": 3}
        bad = client.post(
            PREDICT, content=b"\xc1", headers={"content-type": "application/octet-stream"}
        )
        assert bad.status_code == 400


def test_readiness_is_503_until_load_finishes(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    app = FIXTURES / "slow_load"
    env = {"KINGPOST_TEST_LOAD_GATE": str(gate)}
    with (
        run_server(app, tmp_path, env=env) as server,
        httpx.Client(base_url=server.url, timeout=10) as client,
    ):
        assert client.get("/").status_code == 200  # liveness answers during load
        r = client.get("/v1/models/model")
        assert r.status_code == 503
        assert r.json() == {"error": "Model with name model is not ready."}
        assert client.post(PREDICT, json={}).status_code == 503
        gate.touch()
        server.wait_ready(client)
        assert client.post(PREDICT, json={}).json() == {"ok": True}


def test_load_failure_exits_non_zero_with_traceback(tmp_path: Path) -> None:
    with run_server(FIXTURES / "load_error", tmp_path) as server:
        assert server.wait_exit() != 0
        output = server.output()
        assert "Traceback" in output
        assert "load failed on purpose" in output
        assert "kingpost/server/" not in output  # the model's frames only, as in Truss
        assert output.count("load() failed; retrying (1 of 1)") == 1  # once, as Truss


def test_user_error_is_500_generic_and_logged_with_request_id(tmp_path: Path) -> None:
    with ready_server("predict_error", tmp_path) as (server, client):
        r = client.post(PREDICT, json={}, headers={"X-Baseten-Request-Id": "boom-1"})
        assert r.status_code == 500
        assert r.json() == {"error": "Internal Server Error (in model/chainlet)."}
        assert "secret internals" not in r.text
        assert r.headers["x-baseten-error-code"] == "600"
        http = client.post(PREDICT, json={"http": True})
        assert (http.status_code, http.json()) == (418, {"error": "short and stout"})
        errors = [x for x in server.lines() if x.get("request_id") == "boom-1" and "traceback" in x]
        assert errors and "secret internals" in errors[0]["traceback"]
        # as in Truss, the traceback starts at the model's frame, not in the server
        first_frame = errors[0]["traceback"].splitlines()[1]
        assert "model/model.py" in first_frame and first_frame.endswith("in predict")


def test_is_healthy_feeds_readiness(tmp_path: Path) -> None:
    with ready_server("health", tmp_path) as (_, client):
        assert client.post(PREDICT, json={"healthy": False}).json() == {"healthy": False}
        assert client.get("/v1/models/model").status_code == 503
        client.post(PREDICT, json={"healthy": True})
        assert client.get("/v1/models/model").status_code == 200


def test_metrics_count_requests(tmp_path: Path) -> None:
    with ready_server("basic", tmp_path) as (_, client):
        for _ in range(3):
            client.post(PREDICT, json=1)
        text = client.get("/metrics").text
        assert 'kingpost_model_requests_total{route="predict",status="200"} 3' in text
        assert "kingpost_model_request_duration_seconds_bucket" in text


def test_unknown_route_is_404_json(tmp_path: Path) -> None:
    with ready_server("basic", tmp_path) as (_, client):
        r = client.get("/nope")
        assert r.status_code == 404
        assert "error" in r.json()


def test_bundled_packages_are_importable(tmp_path: Path) -> None:
    with ready_server("bundled", tmp_path) as (_, client):
        assert client.post(PREDICT, json={"text": "hi"}).json() == {"shout": "HI!"}
