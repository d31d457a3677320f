"""The log store end to end on the process engine: a request id finds exactly that request's
lines (gateway and replica), filters combine, bad values are named, the lines outlive a
``kill -9`` of the control plane, and a secret's value reaches no line and no answer."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx

from helpers.platform import REPO, Platform, wait_for

FIXTURE = REPO / "tests" / "fixtures" / "models" / "logs_secret"
SECRET = "s3cr3t-PLANTED-value-7781"


def _lines(p: Platform, *args: str) -> list[dict[str, Any]]:
    out = p.cli("logs", *args, "-o", "json")
    assert out.returncode == 0, out.stderr
    records = json.loads(out.stdout)
    assert isinstance(records, list)
    return records


def _request_lines(p: Platform, rid: str) -> list[dict[str, Any]] | None:
    """The request's lines once the gateway's and both replica lines are in."""
    got = _lines(p, "--request-id", rid)
    kinds = [(r["source"], r["level"]) for r in got]
    want = [("gateway", "INFO"), ("replica", "INFO"), ("replica", "WARNING")]
    return got if sorted(kinds) == want else None


def test_logs_by_request_id_filters_restarts_and_no_secret(tmp_path: Path) -> None:
    home = tmp_path / "home"
    p = Platform(home).start()
    seen: list[str] = []  # every answer and output of the flow, checked for the secret
    try:
        out = p.cli("secrets", "set", "token", input=SECRET + "\n")
        assert out.returncode == 0, out.stderr
        with p.client() as c:
            pushed = c.push(FIXTURE)
        seen.append(json.dumps(pushed, default=str))
        dep_id = pushed["deployment"]["id"]
        model_id = pushed["model"]["id"]
        p.wait_status(dep_id, "ACTIVE", timeout=120)
        with p.gateway() as gw:
            for rid, n in (("req-a", 1), ("req-b", 2)):
                r = gw.post(
                    "/models/logs-secret/production/predict",
                    json={"n": n},
                    headers={"X-Baseten-Request-Id": rid},
                )
                assert r.status_code == 200, r.text
                assert r.json() == {"n": n, "token_length": len(SECRET)}
                seen.append(r.text)
            r = gw.post(
                "/models/nope/production/predict", headers={"X-Baseten-Request-Id": "q-404"}
            )
            assert r.status_code == 404 and r.headers["x-baseten-request-id"] == "q-404"
            seen.append(r.text)

        got = wait_for(lambda: _request_lines(p, "req-a"), 30, "req-a's lines in the store")
        # Exactly that request's lines, in time order: the model server's JSON line (its own
        # time) before the gateway's answer; the print is stamped when the file was written.
        assert [r["ts"] for r in got] == sorted(r["ts"] for r in got)
        assert [r["source"] for r in got if r["level"] != "INFO" or "request_id" in r][:2] == [
            "replica",
            "gateway",
        ], got
        access = next(r for r in got if r["source"] == "gateway")
        assert access["request_id"] == "req-a" and access["status"] == 200
        assert access["model_id"] == model_id and access["deployment_id"] == dep_id
        assert access["replica"].startswith(dep_id) and access["method"] == "POST"
        assert access["route"] == "/models/logs-secret/production/predict"
        assert access["bytes_in"] == len(b'{"n":1}') and access["bytes_out"] > 0
        assert access["duration_ms"] > 0
        replica_lines = {r["message"] for r in got if r["source"] == "replica"}
        # the model server's JSON line keeps its request id; the print names it in words
        assert replica_lines == {"predict called with n=1", "custom words about req-a"}
        assert all(r["model_id"] == model_id for r in got)
        # The gateway's own errors are kept too, with the client's id.
        miss = wait_for(lambda: _lines(p, "--request-id", "q-404"), 10, "the 404's line")
        assert [(m["status"], m["level"], m["deployment_id"]) for m in miss] == [
            (404, "WARNING", None)
        ]

        # Filters combine.
        warned = _lines(p, "-m", "logs-secret", "--level", "warning", "--search", "N=2")
        assert [w["message"] for w in warned] == ["predict called with n=2"]
        gateway = _lines(p, "--model", model_id, "--environment", "production", "--source",
                         "gateway", "--since", "10m")  # fmt: skip
        assert sorted(g["request_id"] for g in gateway) == ["req-a", "req-b"]
        assert _lines(p, "-m", "logs-secret", "--until", "2000-01-01T00:00:00Z") == []
        replica = access["replica"]
        assert {r["replica"] for r in _lines(p, "--replica", replica)} == {replica}
        text = p.cli("logs", "--request-id", "req-b")
        assert text.returncode == 0 and "custom words about req-b" in text.stdout
        assert "rid=req-b" in text.stdout and "req-a" not in text.stdout
        seen += [text.stdout, json.dumps(gateway)]

        # Bad values name the field, the rule and the value.
        bad = p.cli("logs", "--since", "yesterday")
        assert bad.returncode == 2 and "since" in bad.stderr and "'yesterday'" in bad.stderr
        bad = p.cli("logs", "--environment", "production")
        assert bad.returncode == 2 and "environment: needs a model" in bad.stderr
        api = httpx.get(
            f"{p.api_url}/v1/logs",
            params={"level": "loud"},
            headers={"Authorization": f"Api-Key {p.api_key}"},
        )
        assert api.status_code == 400 and api.json()["field"] == "level"
        assert "'loud'" in api.json()["error"]

        # The old form is unchanged: the deployment's output as the engine keeps it.
        plain = p.cli("logs", "--deployment", dep_id)
        assert plain.returncode == 0 and f"[{replica}]" in plain.stdout
        seen.append(plain.stdout)
        with p.client() as c:
            seen.append(json.dumps(c.deployment(dep_id), default=str))
            seen.append(json.dumps(c.log_query(limit=10_000)))
        # The deployment's route takes the store's filters too.
        with p.client() as c:
            body = c._call(
                "GET", f"/v1/deployments/{dep_id}/logs", params={"level": "warning", "tail": 1}
            )
        assert [ln["message"] for ln in body["lines"]] == ["predict called with n=2"]

        # --follow prints lines as they are stored.
        follow = subprocess.Popen(
            [sys.executable, "-m", "kingpost.cli", "logs", "--request-id", "req-f", "-f",
             "-o", "json"],
            env=p.env, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            with p.gateway() as gw:
                r = gw.post(
                    "/models/logs-secret/production/predict",
                    json={"n": 3},
                    headers={"X-Baseten-Request-Id": "req-f"},
                )
            assert r.status_code == 200
            out = follow.stdout
            assert out is not None
            followed: list[dict[str, Any]] = []
            reader = threading.Thread(
                target=lambda: followed.extend(json.loads(out.readline()) for _ in range(3)),
                daemon=True,
            )
            reader.start()  # the gateway's line and the replica's two
            reader.join(30)
            assert len(followed) == 3, followed
            assert {f["request_id"] for f in followed if "request_id" in f} == {"req-f"}
            assert {f["source"] for f in followed} == {"gateway", "replica"}
        finally:
            follow.terminate()
            follow.wait(10)

        before = _request_lines(p, "req-a")
        assert before is not None

        # kill -9 of the control plane: the lines are still there after a restart.
        p.stop(signal.SIGKILL)
        p = Platform(home).start()
        after = _lines(p, "--request-id", "req-a")
        assert [(r["source"], r["message"]) for r in after] == [
            (r["source"], r["message"]) for r in before
        ]
        seen.append(json.dumps(_lines(p, "--tail", "10000")))
    finally:
        p.stop()
    seen.append(p.output())
    # The secret reached the model (its length came back) and no log line or answer.
    for text in seen:
        assert SECRET not in text
    for path in (home / "logs").iterdir():
        assert SECRET.encode() not in path.read_bytes(), path
    for path in (home / "replicas").glob("*/output.log"):
        assert SECRET.encode() not in path.read_bytes(), path
