"""The model server against fixture projects: the rest of the Truss model contract."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest
from test_server_harness import ready_server, run_server

from kingpost.server.placement import BLOCK_S, PROVEN_CALLS

PREDICT = "/v1/models/model:predict"


def test_async_load_and_predict(tmp_path: Path) -> None:
    with ready_server("async_model", tmp_path) as (_, client):
        assert client.post(PREDICT, json={"n": 21}).json() == {
            "async": True,
            "n": 42,
            "ready": True,
        }


def _chunks(client: httpx.Client, body: Any, **headers: str) -> tuple[httpx.Response, list[bytes]]:
    with client.stream("POST", PREDICT, json=body, headers=headers) as r:
        return r, list(r.iter_raw())


def test_sync_generator_streams_chunked(tmp_path: Path) -> None:
    with ready_server("streaming", tmp_path) as (_, client):
        r, chunks = _chunks(client, {"n": 4})
        assert r.status_code == 200
        assert r.headers["transfer-encoding"] == "chunked"
        assert r.headers["content-type"] == "application/octet-stream"
        assert b"".join(chunks) == b"chunk-0;chunk-1;chunk-2;chunk-3;"
        gathered = client.post(PREDICT, json={"n": 2}, headers={"accept": "application/json"})
        assert gathered.json() == "chunk-0;chunk-1;"
        packed = client.post(
            PREDICT,
            content=msgpack.packb({"n": 2}),
            headers={"accept": "application/json", "content-type": "application/octet-stream"},
        )  # a msgpack request gets the gathered stream back in msgpack, as from Truss
        assert packed.headers["content-type"] == "application/octet-stream"
        assert msgpack.unpackb(packed.content) == "chunk-0;chunk-1;"


def test_async_generator_streams_chunked(tmp_path: Path) -> None:
    with ready_server("async_streaming", tmp_path) as (_, client):
        r, chunks = _chunks(client, {"n": 3})
        assert r.headers["transfer-encoding"] == "chunked"
        assert b"".join(chunks) == b"async-0;async-1;async-2;"


def _parallel_seconds(client_url: str, n: int, seconds: float) -> float:
    def call() -> None:
        with httpx.Client(timeout=30) as c:
            assert c.post(client_url + PREDICT, json={"seconds": seconds}).status_code == 200

    threads = [threading.Thread(target=call) for _ in range(n)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.monotonic() - start


def test_predict_concurrency_one_serialises_slow_predicts(tmp_path: Path) -> None:
    with ready_server("slow_concurrency_1", tmp_path) as (server, _):
        assert _parallel_seconds(server.url, 2, 0.4) >= 0.8


def test_predict_concurrency_two_overlaps_slow_predicts(tmp_path: Path) -> None:
    with ready_server("slow_concurrency_2", tmp_path) as (server, _):
        assert _parallel_seconds(server.url, 2, 0.4) < 0.75


def test_secrets_read_files_and_reject_undeclared(tmp_path: Path) -> None:
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    (secrets_dir / "api_key").write_text("s3cr3t")
    with ready_server("secrets", tmp_path, secrets_dir=secrets_dir) as (_, client):
        assert client.post(PREDICT, json={"name": "api_key"}).json() == {"value": "s3cr3t"}
        assert client.post(PREDICT, json={"name": "with_default"}).json() == {
            "value": "the-default"
        }
        missing = client.post(PREDICT, json={"name": "hf_token"}).json()["missing"]
        assert "'hf_token' is not declared in config.yaml" in missing


def test_preprocess_predict_postprocess_chain(tmp_path: Path) -> None:
    with ready_server("pre_post", tmp_path) as (_, client):
        assert client.post(PREDICT, json={"value": 1}).json() == {
            "value": 20,
            "steps": ["pre", "predict", "post"],
        }


def test_request_only_predict_gets_unparsed_body(tmp_path: Path) -> None:
    with ready_server("request_only", tmp_path) as (_, client):
        r = client.post(PREDICT, content=b"not json at all", headers={"x-custom": "yes"})
        assert r.status_code == 200
        assert r.json() == {
            "raw": "not json at all",
            "header": "yes",
            "method": "POST",
            "disconnected": False,
        }


def test_inputs_and_request_arguments(tmp_path: Path) -> None:
    with ready_server("request_both", tmp_path) as (_, client):
        r = client.post(PREDICT, json={"a": 1}, headers={"X-Baseten-Request-Id": "rid-7"})
        assert r.json() == {"input": {"a": 1}, "path": PREDICT, "id": "rid-7"}


def test_pydantic_input_validated_and_output_serialised(tmp_path: Path) -> None:
    with ready_server("pydantic_types", tmp_path) as (_, client):
        ok = client.post(PREDICT, json={"text": "ab", "times": 2})
        assert ok.json() == {"result": "abab", "length": 4}
        bad = client.post(PREDICT, json={"times": "many"})
        assert bad.status_code == 400
        assert "text" in bad.json()["error"]
        assert "times" in bad.json()["error"]
        schema = client.get("/v1/models/model/schema").json()
        assert schema["input_schema"]["required"] == ["text"]
        assert set(schema["output_schema"]["properties"]) == {"result", "length"}
        assert schema["supports_streaming"] is False


def test_starlette_responses_pass_through(tmp_path: Path) -> None:
    with ready_server("responses", tmp_path) as (_, client):
        plain = client.post(PREDICT, json={"kind": "plain"})
        assert (plain.status_code, plain.text) == (201, "plain text")
        assert plain.headers["x-model"] == "yes"
        assert plain.headers["content-type"].startswith("text/plain")
        err = client.post(PREDICT, json={"kind": "error"})
        assert (err.status_code, err.json()) == (418, {"detail": "teapot"})
        assert err.headers["x-baseten-error-code"] == "700"
        with client.stream("POST", PREDICT, json={"kind": "sse"}) as sse:
            assert sse.headers["content-type"].startswith("text/event-stream")
            assert sse.read() == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
        assert client.post(PREDICT, json={"kind": "plain"}).status_code == 201


def test_openai_routes(tmp_path: Path) -> None:
    with ready_server("openai_model", tmp_path) as (_, client):
        chat = client.post("/v1/chat/completions", json={"messages": []})
        assert chat.json()["choices"][0]["message"]["content"] == "hi"
        with client.stream("POST", "/v1/chat/completions", json={"stream": True}) as r:
            assert r.read() == b"data: hello\n\ndata: world\n\n"
        assert client.post("/v1/embeddings", json={}).json()["data"][0]["embedding"] == [0, 1]
        assert client.post("/v1/completions", json={}).status_code == 404


STREAMING_ENDPOINTS = """
import threading

both = threading.Barrier(2, timeout=10)


class Model:
    def predict(self, model_input):
        return model_input

    def chat_completions(self, model_input):
        def chunks():
            both.wait()  # each stream's first step waits for the other's
            yield "data: met\\n\\n"

        return chunks()
"""


def test_endpoint_streams_step_side_by_side_whatever_predict_concurrency(
    tmp_path: Path,
) -> None:
    # The OpenAI endpoints are outside the predict limit (1 here): two of their sync
    # generators must not share predict's single thread, one step after the other.
    app = tmp_path / "app"
    (app / "model").mkdir(parents=True)
    (app / "config.yaml").write_text("model_name: chat\nruntime:\n  predict_concurrency: 1\n")
    (app / "model" / "model.py").write_text(STREAMING_ENDPOINTS)
    with run_server(app, tmp_path) as server, httpx.Client(timeout=30) as probe:
        server.wait_ready(probe)
        answers: list[tuple[int, bytes]] = []

        def chat() -> None:
            with httpx.Client(base_url=server.url, timeout=30) as client:
                r = client.post("/v1/chat/completions", json={"stream": True})
                answers.append((r.status_code, r.content))

        threads = [threading.Thread(target=chat) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert answers == [(200, b"data: met\n\n")] * 2, server.output()


CHAT_ONLY = """
class Model:
    def chat_completions(self, model_input):
        return {"choices": []}
"""


def test_predict_on_a_model_with_only_openai_methods_is_a_404_once_ready(
    tmp_path: Path,
) -> None:
    # The model is ready: a 503 "not ready" would send a client (or the gateway) waiting
    # for something that never comes.
    app = tmp_path / "app"
    (app / "model").mkdir(parents=True)
    (app / "config.yaml").write_text("model_name: chat\n")
    (app / "model" / "model.py").write_text(CHAT_ONLY)
    with (
        run_server(app, tmp_path) as server,
        httpx.Client(base_url=server.url, timeout=30) as client,
    ):
        server.wait_ready(client)
        assert client.post("/v1/chat/completions", json={}).json() == {"choices": []}
        r = client.post(PREDICT, json={})
        assert r.status_code == 404, r.text
        assert r.json() == {"error": "`predict` is not implemented by this model."}
        assert r.headers["x-baseten-error-source"] == "04"


GENEROUS = {"KINGPOST_SERVER_INLINE_FAST_US": "50000"}
"""Promotion must not hang on the timing of a busy test machine (the rule is unit-tested)."""


def _threads(client: httpx.Client, n: int, **body: Any) -> list[tuple[str, str]]:
    out = []
    for _ in range(n):
        r = client.post(PREDICT, json=body)
        assert r.status_code == 200, r.text
        out.append((r.json()["thread"], r.json()["post_thread"]))
    return out


def _said(server: Any, message: str) -> list[str]:
    return [ln["method"] for ln in server.lines() if ln.get("message") == message]


def test_tiny_sync_methods_move_to_the_loop_and_a_blocking_call_moves_them_back(
    tmp_path: Path,
) -> None:
    with ready_server("placement", tmp_path, env=GENEROUS) as (server, client):
        first = _threads(client, PROVEN_CALLS)
        assert first[0][0] == "predict-0" and first[0][1] != "MainThread"
        assert _threads(client, 3) == [("MainThread", "MainThread")] * 3
        assert sorted(_said(server, "method runs on the event loop")) == ["postprocess", "predict"]
        r = client.post(PREDICT, json={"log": True}, headers={"x-baseten-request-id": "rid-inline"})
        assert r.json()["thread"] == "MainThread"
        ran = [ln for ln in server.lines() if ln.get("message") == "predict ran"]
        assert [ln.get("request_id") for ln in ran] == ["rid-inline"]
        # A call that blocks the loop runs once, then predict is back on its thread for good.
        assert _threads(client, 1, sleep=BLOCK_S + 0.02) == [("MainThread", "MainThread")]
        assert _threads(client, PROVEN_CALLS + 5)[-1] == ("predict-0", "MainThread")
        assert _said(server, "method moves back to the thread pool") == ["predict"]


def test_inline_switch_off_keeps_sync_methods_in_threads(tmp_path: Path) -> None:
    env = {**GENEROUS, "KINGPOST_SERVER_INLINE": "0"}
    with ready_server("placement", tmp_path, env=env) as (_, client):
        calls = _threads(client, PROVEN_CALLS + 5)
        assert all(t == "predict-0" and p != "MainThread" for t, p in calls)


@pytest.mark.parametrize("idiom", ["own_loop", "get_event_loop"])
def test_sync_predicts_that_drive_an_event_loop_work_in_a_thread_and_on_the_loop(
    tmp_path: Path, idiom: str
) -> None:
    with ready_server("placement", tmp_path, env=GENEROUS) as (_, client):
        threads = set()
        for _ in range(PROVEN_CALLS + 5):
            r = client.post(PREDICT, json={idiom: True})
            assert r.status_code == 200, r.text
            assert r.json()["doubled"] == 42
            threads.add(r.json()["thread"])
        assert threads == {"predict-0", "MainThread"}


def test_a_predict_that_runs_work_on_the_server_loop_stays_on_threads(tmp_path: Path) -> None:
    with ready_server("placement", tmp_path, env=GENEROUS) as (server, client):
        for _ in range(PROVEN_CALLS + 5):
            r = client.post(PREDICT, json={"bridge": True})
            assert r.status_code == 200, r.text
            assert r.json() == {
                "thread": "predict-0",
                "doubled": 42,
                "post_thread": r.json()["post_thread"],
            }
        assert _said(server, "method stays on threads") == ["predict"]


def test_bridging_to_the_server_loop_after_promotion_fails_once_instead_of_hanging(
    tmp_path: Path,
) -> None:
    with ready_server("placement", tmp_path, env=GENEROUS) as (server, client):
        _threads(client, PROVEN_CALLS + 1)
        assert _threads(client, 1)[0][0] == "MainThread"
        failed = client.post(PREDICT, json={"bridge": True}, timeout=10)
        assert failed.status_code == 500
        assert "LoopReentryError" in server.output()
        again = client.post(PREDICT, json={"bridge": True}, timeout=10)
        assert again.status_code == 200 and again.json()["thread"] == "predict-0"
        assert _said(server, "method moves back to the thread pool") == ["predict"]
