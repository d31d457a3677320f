"""The scaffolded project and examples/echo-model run under the real server."""

from __future__ import annotations

from pathlib import Path

import httpx
from test_server_harness import run_server

from kingpost.config import load_config
from kingpost.server.scaffold import scaffold_project

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "echo-model"
PREDICT = "/v1/models/model:predict"


def test_scaffolded_project_validates_and_serves(tmp_path: Path) -> None:
    project = tmp_path / "hello"
    scaffold_project(project, "hello")
    assert load_config(project).config.model_name == "hello"
    with run_server(project, tmp_path) as server, httpx.Client(base_url=server.url) as client:
        server.wait_ready(client)
        assert client.post(PREDICT, json={"text": "hi"}).json() == {"output": "HI"}


def test_echo_example_serves_and_streams(tmp_path: Path) -> None:
    load_config(EXAMPLE)
    with run_server(EXAMPLE, tmp_path) as server, httpx.Client(base_url=server.url) as client:
        server.wait_ready(client)
        r = client.post(PREDICT, json={"text": "a b"}, headers={"X-Baseten-Request-Id": "r1"})
        assert r.json() == {"model": "echo-model", "echo": "a b", "request_id": "r1"}
        streamed = client.post(PREDICT, json={"text": "a b", "stream": True})
        assert streamed.text == "a b "
