"""The gateway's access lines, formatted by hand: valid JSON whatever the client's path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kingpost.gateway.access import AccessLines
from kingpost.gateway.routing import Target
from kingpost.gateway.table import DeploymentRoute, DeploymentState

TARGET = Target(DeploymentRoute("dep1", "mod1", "/p", DeploymentState.SERVING), "/p", "mod1")


@pytest.mark.parametrize(
    "url",
    [
        b"/models/m/production/predict",
        b'/a"b\\c?secret=1',
        b"/caf\xc3\xa9/\x01\x7f",
        b"",
        b"*",
        b"/a%20b/%s%d%%",  # a template's own mark: kept as the client sent it
    ],
)
def test_a_line_is_json_with_every_field(tmp_path: Path, url: bytes) -> None:
    lines = AccessLines(tmp_path, "w", 1 << 20)
    raw = lines._encode("rid-1", 200, "ok", 10.0, 10.25, 1000.0, TARGET,
                        (b"POST", url, 7, 99, "dep1-abcde"))  # fmt: skip
    rec = json.loads(raw)
    path = url.partition(b"?")[0].decode("latin-1")
    assert rec == {
        "ts": 1010.25,
        "level": "INFO",
        "source": "gateway",
        "request_id": "rid-1",
        "model_id": "mod1",
        "deployment_id": "dep1",
        "status": 200,
        "outcome": "ok",
        "duration_ms": 250.0,
        "replica": "dep1-abcde",
        "method": "POST",
        "route": path,
        "bytes_in": 7,
        "bytes_out": 99,
        "message": f"POST {path} 200 ok",
    }
    assert raw.endswith(b"}\n") and b"secret" not in raw


def test_an_error_before_routing_and_a_client_that_left() -> None:
    lines = AccessLines(Path("/nonexistent"), "w", 1 << 20)
    rec = json.loads(lines._encode("r", 431, "invalid_request", 1.0, 1.5, 0.0, None, None))
    assert (rec["level"], rec["status"], rec["model_id"], rec["replica"]) == (
        "WARNING", 431, None, None
    )  # fmt: skip
    assert rec["message"] == "431 invalid_request"
    rec = json.loads(lines._encode("r", 0, "client_left", 1.0, 1.5, 0.0, TARGET, None))
    assert (rec["status"], rec["level"], rec["message"]) == (None, "INFO", "- client_left")
    assert json.loads(lines._encode("r", 503, "unavailable", 1, 2, 0, TARGET, None))["level"] == (
        "ERROR"
    )


def test_a_flush_fills_each_answers_own_figures_into_the_kept_templates(tmp_path: Path) -> None:
    """Answers that share a template (route, status, replica) keep their own ids, times and
    sizes; one without a request shares none of it; the batch is one segment's lines."""
    url = b"/models/m/production/predict"
    lines = AccessLines(tmp_path, "w", 1 << 20)
    lines._lines += [
        ("r1", 200, "ok", 1.0, 1.5, TARGET, (b"POST", url, 3, 30, "dep1-r0")),
        ("r2", 200, "ok", 2.0, 2.25, TARGET, (b"POST", url, 4, 40, "dep1-r0")),
        ("r3", 0, "client_left", 3.0, 3.5, TARGET, None),
    ]
    lines.flush()
    lines._writer.close()
    (segment,) = tmp_path.iterdir()
    recs = [json.loads(line) for line in segment.read_text().splitlines()]
    got = [(r["request_id"], r.get("bytes_in"), r.get("bytes_out"), r["duration_ms"]) for r in recs]
    assert got == [("r1", 3, 30, 500.0), ("r2", 4, 40, 250.0), ("r3", None, None, 500.0)]
    assert recs[1]["ts"] - recs[0]["ts"] == pytest.approx(0.75, abs=1e-5)
    assert recs[2]["message"] == "- client_left" and recs[2]["replica"] is None
