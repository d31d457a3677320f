"""The model server's in-place reload (a development deployment's live reload): only the
control plane's token reloads, and a failing reload keeps the last good model serving."""

from __future__ import annotations

from pathlib import Path

from test_server_harness import ready_server

from kingpost.server.contract import RELOAD_PATH, RELOAD_TOKEN_ENV, RELOAD_TOKEN_HEADER

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
