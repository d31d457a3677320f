"""What a run came to (classify), the webhook payload and signature, and the addresses
a webhook may not reach."""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import UTC, datetime

import pytest

from kingpost.asyncq.outcome import Verdict, classify
from kingpost.asyncq.policy import RetryConfig
from kingpost.asyncq.webhooks import check_destination, payload, signature, verify
from kingpost.controller.autoscale import Sample
from kingpost.controller.scaling import Scaler
from kingpost.gateway.stats import GatewayStats
from kingpost.store.asyncq import AsyncRequestView
from kingpost.store.models import AsyncStatus, WebhookStatus

JSON = {"content-type": "application/json", "content-length": "9"}


@pytest.mark.parametrize(
    ("status", "headers", "body", "verdict", "code"),
    [
        (200, JSON, b'{"y": 1}', Verdict.SUCCEEDED, None),
        (
            200,
            {"content-type": "text/plain", "content-length": "2"},
            b"hi",
            Verdict.SUCCEEDED,
            None,
        ),
        (
            200,
            {"content-type": "text/event-stream"},
            b"",
            Verdict.FINAL,
            "ASYNC_REQUEST_NOT_SUPPORTED",
        ),
        (
            200,
            {"content-type": "application/octet-stream"},
            b"..",
            Verdict.FINAL,
            "ASYNC_REQUEST_NOT_SUPPORTED",
        ),
        (500, JSON, b'{"error": "x"}', Verdict.MODEL_ERROR, "MODEL_PREDICT_ERROR"),
        (
            502,
            JSON,
            b'{"error": "x", "code": "bad_gateway"}',
            Verdict.MODEL_ERROR,
            "MODEL_PREDICT_ERROR",
        ),
        (504, JSON, b"{}", Verdict.MODEL_ERROR, "MODEL_PREDICT_TIMEOUT"),
        (400, JSON, b'{"error": "no"}', Verdict.FINAL, "MODEL_INVALID_INPUT"),
        (
            404,
            JSON,
            b'{"error": "gone", "code": "not_found"}',
            Verdict.FINAL,
            "MODEL_DOES_NOT_EXIST",
        ),
        # the gateway's "not now": no replica in time, a full queue; not the model's fault
        (503, JSON, b'{"error": "w", "code": "unavailable"}', Verdict.NOT_RUN, "MODEL_NOT_READY"),
        (429, JSON, b'{"error": "w", "code": "overloaded"}', Verdict.NOT_RUN, "MODEL_NOT_READY"),
        (None, {}, b"", Verdict.NOT_RUN, "MODEL_UNAVAILABLE"),
    ],
)
def test_classify(
    status: int | None, headers: dict[str, str], body: bytes, verdict: Verdict, code: str | None
) -> None:
    got = classify(status, headers, body)
    assert got.verdict == verdict
    assert (got.errors[0]["code"] if got.errors else None) == code


@pytest.mark.parametrize(
    ("error", "verdict", "code"),
    [
        # no gateway, or it went away: not the model's doing; run again, no attempt counted
        ("ConnectionRefusedError: [Errno 111]", Verdict.NOT_RUN, "MODEL_UNAVAILABLE"),
        ("ConnectTimeout", Verdict.NOT_RUN, "MODEL_UNAVAILABLE"),
        ("EOFError: the gateway closed the connection", Verdict.NOT_RUN, "MODEL_UNAVAILABLE"),
        # sent, and no answer within the hop's timeout: the model may have run it
        ("ReadTimeout", Verdict.MODEL_ERROR, "MODEL_PREDICT_TIMEOUT"),
    ],
)
def test_no_answer(error: str, verdict: Verdict, code: str) -> None:
    got = classify(None, {}, b"", error)
    assert got.verdict == verdict
    assert (got.errors[0]["code"] if got.errors else None) == code


def test_a_plain_text_answer_is_kept_as_a_json_string() -> None:
    got = classify(200, {"content-type": "text/plain", "content-length": "2"}, b"hi")
    assert got.result is not None and json.loads(got.result) == "hi"


def view(status: AsyncStatus = AsyncStatus.SUCCEEDED) -> AsyncRequestView:
    t = datetime(2026, 12, 5, tzinfo=UTC)
    return AsyncRequestView(
        "r1",
        "m1",
        "d1",
        None,
        0,
        "{}",
        "https://h.example/",
        RetryConfig(),
        600,
        status,
        WebhookStatus.PENDING,
        1,
        '{"y":1}',
        (),
        0,
        "",
        t,
        t,
        t,
        t,
    )


def test_payload_has_basetens_fields_and_signature_is_hmac_sha256() -> None:
    now = datetime(2026, 12, 5, 1, tzinfo=UTC)
    body = payload(view(), now)
    sent = json.loads(body)
    assert set(sent) == {
        "request_id",
        "model_id",
        "deployment_id",
        "type",
        "time",
        "data",
        "errors",
    }
    assert (sent["request_id"], sent["data"], sent["time"]) == ("r1", {"y": 1}, now.isoformat())
    header = signature(body, ["whsec_new", "whsec_old"])
    want = hmac.new(b"whsec_old", body, hashlib.sha256).hexdigest()
    assert header.split(",")[1] == "v1=" + want
    assert verify(body, header, "whsec_new") and verify(body, header, "whsec_old")
    assert not verify(body + b" ", header, "whsec_new")
    assert json.loads(payload(view(AsyncStatus.FAILED), now))["data"] is None


@pytest.mark.parametrize(
    ("url", "addresses", "refused"),
    [
        ("https://hooks.example/x", ["93.184.216.34"], None),
        ("https://hooks.example/x", ["169.254.169.254"], "link-local"),
        ("https://hooks.example/x", ["fe80::1%eth0"], "link-local"),
        ("https://hooks.example/x", ["::ffff:169.254.169.254"], "link-local"),
        ("http://localhost:8090/v1/health", ["127.0.0.1"], "own port"),
        ("http://localhost:9999/hook", ["127.0.0.1"], None),  # loopback on another port
        ("http://10.0.0.5:8090/hook", ["10.0.0.5"], None),  # not this machine
    ],
)
def test_destinations(url: str, addresses: list[str], refused: str | None) -> None:
    why = check_destination(url, (8090, 8080), addresses)
    assert (why is None) if refused is None else (why is not None and refused in why)


def test_async_backlog_is_demand_for_the_autoscaler() -> None:
    scaler = Scaler()
    scaler.backlog = {"d1": 7}
    scaler.observe(GatewayStats({}), ["d1", "d2"], 10.0)
    samples = scaler._samples
    assert samples["d1"][-1] == Sample(10.0, 0, 7, 0)
    assert samples["d2"][-1].demand == 0
