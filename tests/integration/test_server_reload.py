"""The model server's in-place reload (a development deployment's live reload): only the
control plane's token reloads, and a failing reload keeps the last good model serving."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
from test_server_harness import ready_server, run_server

from helpers.platform import wait_for
from kingpost.server.contract import RELOAD_PATH, RELOAD_TOKEN_ENV, RELOAD_TOKEN_HEADER
from kingpost.server.placement import PROVEN_CALLS

PREDICT = "/v1/models/model:predict"
TOKEN = "s3cret-token"


def test_reload_needs_the_token_and_keeps_the_last_good_model(tmp_path: Path) -> None:
    env = {RELOAD_TOKEN_ENV: TOKEN}
    with ready_server("basic", tmp_path, env=env) as (_, client):
        model_py = tmp_path / "apps" / "basic" / "model" / "model.py"
        before = client.post(PREDICT, json={"text": "hi"}).json()
        original = model_py.read_text()
        model_py.write_text(original.replace('"loaded": self._loaded', '"loaded": "again"'))
        for headers in ({}, {RELOAD_TOKEN_HEADER: "wrong"}, {RELOAD_TOKEN_HEADER: ""}):
            assert client.post(RELOAD_PATH, headers=headers).status_code == 404
        assert client.post(PREDICT, json={"text": "hi"}).json() == before

        r = client.post(RELOAD_PATH, headers={RELOAD_TOKEN_HEADER: TOKEN})
        assert r.status_code == 200 and r.json()["ok"], r.text
        assert client.post(PREDICT, json={"text": "hi"}).json()["loaded"] == "again"

        model_py.write_text(original + "\ndef broken(:\n")
        r = client.post(RELOAD_PATH, headers={RELOAD_TOKEN_HEADER: TOKEN})
        result = r.json()
        assert not result["ok"] and result["error"].startswith("SyntaxError")
        assert "model.py" in result["traceback"]
        assert client.post(PREDICT, json={"text": "hi"}).json()["loaded"] == "again"


def test_a_server_without_a_token_never_reloads(tmp_path: Path) -> None:
    with ready_server("basic", tmp_path) as (_, client):
        r = client.post(RELOAD_PATH, headers={RELOAD_TOKEN_HEADER: ""})
        assert r.status_code == 404


FAST = """
class Model:
    def predict(self, x):
        return x
"""

SLOW = """
import time
from pathlib import Path


class Model:
    def predict(self, x):
        Path("predict-started").touch()
        time.sleep(3)
        return "slept"
"""


def test_a_reloaded_predict_starts_on_threads_again(tmp_path: Path) -> None:
    # The old predict proved fast and runs on the event loop; the new code has proven
    # nothing: its first call must run on a worker thread, or a slow one blocks the loop.
    app = tmp_path / "app"
    (app / "model").mkdir(parents=True)
    (app / "config.yaml").write_text("model_name: reloaded\n")
    (app / "model" / "model.py").write_text(FAST)
    # A trivial predict counts as fast however busy the machine is.
    env = {RELOAD_TOKEN_ENV: TOKEN, "KINGPOST_SERVER_INLINE_FAST_US": "20000"}
    with (
        run_server(app, tmp_path, env=env) as server,
        httpx.Client(base_url=server.url, timeout=30) as client,
    ):
        server.wait_ready(client)

        def promoted() -> bool:
            for _ in range(PROVEN_CALLS):
                assert client.post(PREDICT, json="x").json() == "x"
            return "method runs on the event loop" in server.output()

        wait_for(promoted, what="predict to run on the event loop")
        (app / "model" / "model.py").write_text(SLOW)
        r = client.post(RELOAD_PATH, headers={RELOAD_TOKEN_HEADER: TOKEN})
        assert r.status_code == 200 and r.json()["ok"], r.text

        answers: list[httpx.Response] = []

        def slow_predict() -> None:
            with httpx.Client(base_url=server.url, timeout=30) as other:
                answers.append(other.post(PREDICT, json="x"))

        caller = threading.Thread(target=slow_predict)
        caller.start()
        wait_for((app / "predict-started").exists, what="the new predict to start")
        started = time.monotonic()
        assert client.get("/").status_code == 200
        assert time.monotonic() - started < 1.5, "liveness waited for the slow predict"
        assert caller.is_alive()
        caller.join()
        assert answers[0].json() == "slept"
        assert "method moves back to the thread pool" not in server.output()
