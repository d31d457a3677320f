"""Scoped API keys through the whole platform: CLI -> API -> controller -> real gateway."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx

from helpers.platform import EXAMPLES, Platform, wait_answer

ECHO = EXAMPLES / "echo-server"


def test_an_invoke_only_key_calls_its_model_only_and_dies_when_revoked(
    platform: Platform,
) -> None:
    with platform.client() as c:
        a = c.push(ECHO, model_name="keys-a")
        b = c.push(ECHO, model_name="keys-b")
    for pushed in (a, b):
        platform.wait_status(pushed["deployment"]["id"], "ACTIVE")
    made = platform.cli("api-keys", "create", "ci", "--model", "keys-a")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert key.startswith("kp_") and "\n" not in key
    assert "invoke-only" in made.stderr and key not in made.stderr

    listed = platform.cli("api-keys", "list", "--output", "json")
    assert listed.returncode == 0 and key not in listed.stdout
    prefix = next(k["prefix"] for k in json.loads(listed.stdout) if k["name"] == "ci")
    assert key.startswith(prefix)

    invoke = {"Authorization": f"Api-Key {key}"}
    path_a = f"/models/{a['model']['id']}/production/predict"
    path_b = f"/models/{b['model']['id']}/production/predict"
    with httpx.Client(base_url=platform.gateway_url, headers=invoke, timeout=30) as gw:
        assert wait_answer(gw, path_a, 200, {"x": 1}).json()["echo"] == {"x": 1}
        r = gw.post(path_b, json={})
        assert r.status_code == 403 and r.json()["code"] == "forbidden", r.text
        assert (
            gw.post(path_a, json={}, headers={"Authorization": "Api-Key kp_nope"}).status_code
            == 401
        )
        assert gw.post(path_a, json={}, headers={"Authorization": ""}).status_code == 401
    with platform.gateway() as admin:
        assert admin.post(path_b, json={}).status_code == 200
    r = httpx.get(f"{platform.api_url}/v1/models", headers=invoke)
    assert r.status_code == 403 and "invoke-only" in r.json()["error"]
    denied = subprocess.run(
        [sys.executable, "-m", "kingpost.cli", "models", "list"],
        env=platform.env | {"KINGPOST_API_KEY": key},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert denied.returncode == 5 and "invoke-only" in denied.stderr

    revoked = platform.cli("api-keys", "revoke", prefix)
    assert revoked.returncode == 0, revoked.stderr
    # At once, with no wait: the revocation answered only after the gateway had it.
    r = httpx.post(f"{platform.gateway_url}{path_a}", json={}, headers=invoke)
    assert r.status_code == 401, r.text
    again = platform.cli("api-keys", "revoke", prefix)
    assert again.returncode == 3 and "not found" in again.stderr
