"""The model server calls ``setup_environment`` again when the environment file changes
while it runs (a promotion), as Truss's server does with its dynamic config."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest
from test_server_harness import run_server

from helpers.platform import wait_for

PREDICT = "/v1/models/model:predict"

MODEL = """
import asyncio, threading


class Model:
    def __init__(self, environment):
        self.at_init = environment
        self.told = []

    {kind}def setup_environment(self, environment):
        if environment.get("name") == "broken":
            raise RuntimeError("cannot set up for broken")
        self.told.append([environment, threading.current_thread().name])

    def predict(self, inputs):
        return {{"at_init": self.at_init, "told": [e for e, _ in self.told],
                "threads": sorted({{t for _, t in self.told}})}}
"""


def _replace(directory: Path, text: str) -> None:
    tmp = directory / ".environment.tmp"
    tmp.write_text(text)
    os.replace(tmp, directory / "environment")


@pytest.mark.parametrize("kind", ["", "async "])
def test_a_running_model_is_told_each_new_environment(tmp_path: Path, kind: str) -> None:
    app = tmp_path / "app"
    (app / "model").mkdir(parents=True)
    (app / "config.yaml").write_text("model_name: env-watch\n")
    (app / "model" / "model.py").write_text(MODEL.format(kind=kind))
    dynamic = tmp_path / "dynamic"
    dynamic.mkdir()
    _replace(dynamic, json.dumps({"name": "staging"}))
    env = {
        "KINGPOST_DYNAMIC_CONFIG_DIR": str(dynamic),
        "KINGPOST_ENVIRONMENT": json.dumps({"name": "stale"}),  # the file is newer
        "KINGPOST_ENVIRONMENT_POLL_S": "0.05",
    }
    staging, production = {"name": "staging"}, {"name": "production"}
    with (
        run_server(app, tmp_path, env=env) as server,
        httpx.Client(base_url=server.url, timeout=10) as client,
    ):
        server.wait_ready(client)

        def told() -> list[object]:
            return list(client.post(PREDICT, json={}).json()["told"])

        assert client.post(PREDICT, json={}).json()["at_init"] == staging
        assert told() == [staging]  # before load(), from the file

        _replace(dynamic, json.dumps(production))
        wait_for(lambda: told() == [staging, production] or None, 10, "production")
        _replace(dynamic, json.dumps(production))  # rewritten, same environment
        _replace(dynamic, "")  # in no environment: not told
        _replace(dynamic, json.dumps({"name": "broken"}))  # the hook raises
        wait_for(lambda: "cannot set up for broken" in server.output() or None, 10, "log")
        r = client.post(PREDICT, json={})
        assert r.status_code == 200 and r.json()["told"] == [staging, production]
        _replace(dynamic, json.dumps({"name": "canary"}))
        wait_for(lambda: told() == [staging, production, {"name": "canary"}] or None, 10, "canary")
        threads = client.post(PREDICT, json={}).json()["threads"]
        if kind:  # an async hook runs on the server's loop, like every async method
            assert threads == ["MainThread"]
        else:  # a sync one off it, so serving goes on meanwhile
            assert "MainThread" not in threads
