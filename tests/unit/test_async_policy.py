"""Async inference decisions: order, expiry, backoff, slots, and the body's checks."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from kingpost.asyncq.body import parse_async_body
from kingpost.asyncq.policy import (
    Candidate,
    RetryConfig,
    async_slots,
    choose,
    model_error_retryable,
    pick_size,
    retry_delay_ms,
    webhook_delay_s,
    webhook_retryable,
)
from kingpost.errors import ValidationError

T0 = datetime(2026, 12, 5, tzinfo=UTC)


def c(
    id: str,
    prio: int = 0,
    age_s: float = 0,
    *,
    wait_s: int = 600,
    after_s: float = 0,
    attempts: int = 0,
) -> Candidate:
    created = T0 - timedelta(seconds=age_s)
    return Candidate(id, prio, created, T0 + timedelta(seconds=after_s), wait_s, attempts)


@pytest.mark.parametrize(
    ("cands", "free", "run", "expire"),
    [
        ([], 3, (), ()),
        # highest priority (lowest number) first, then oldest
        ([c("a", 2, 9), c("b", 0, 1), c("c", 0, 5), c("d", 1, 50)], 4, ("c", "b", "d", "a"), ()),
        ([c("a", 1, 9), c("b", 0, 1)], 1, ("b",), ()),
        ([c("a"), c("b")], 0, (), ()),
        # a retry's backoff holds it back until not_before
        ([c("a", 0, 9, after_s=1), c("b", 1, 1)], 2, ("b",), ()),
        # past max_time_in_queue_seconds: expired, never run
        ([c("old", 0, 20, wait_s=10), c("new", 0, 1, wait_s=10)], 5, ("new",), ("old",)),
        ([c("edge", 0, 10, wait_s=10)], 1, (), ("edge",)),
        # a retry (it ran once) does not expire: its error must be recorded
        ([c("r", 0, 20, wait_s=10, attempts=1)], 1, ("r",), ()),
    ],
)
def test_choose(
    cands: list[Candidate], free: int, run: tuple[str, ...], expire: tuple[str, ...]
) -> None:
    got = choose(cands, T0, free)
    assert (got.run, got.expire) == (run, expire)


@pytest.mark.parametrize(
    ("cfg", "attempt", "delay"),
    [
        (RetryConfig(3, 1000, 5000), 1, 1000),
        (RetryConfig(3, 1000, 5000), 2, 2000),
        (RetryConfig(3, 1000, 5000), 3, 4000),
        (RetryConfig(9, 1000, 5000), 4, 5000),
        (RetryConfig(3, 0, 0), 2, 0),
        (RetryConfig(3, 100, 150), 2, 150),
    ],
)
def test_retry_backoff(cfg: RetryConfig, attempt: int, delay: int) -> None:
    assert retry_delay_ms(cfg, attempt) == delay


@pytest.mark.parametrize(
    ("status", "model", "webhook"),
    [
        (None, True, True),
        (500, True, True),
        (503, True, True),
        (429, True, True),
        (400, False, False),
        (404, False, False),
        (200, False, False),
    ],
)
def test_what_is_retried(status: int | None, model: bool, webhook: bool) -> None:
    assert (model_error_retryable(status), webhook_retryable(status)) == (model, webhook)


def test_webhook_backoff_doubles_and_caps() -> None:
    assert [webhook_delay_s(0.5, a, cap_s=3) for a in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 3.0]


@pytest.mark.parametrize(
    ("replicas", "conc", "share", "busy", "slots"),
    [
        (2, 4, 0.5, 0, 4),  # half of 8 predict slots
        (2, 4, 0.5, 3, 1),
        (2, 4, 0.5, 4, 0),
        (1, 1, 0.5, 0, 1),  # a share below one slot still drains the queue
        (1, 1, 0.5, 1, 0),
        (0, 4, 0.5, 0, 1),  # at zero: one request waits in the gateway for the wake
        (0, 4, 0.5, 1, 0),
        (3, 2, 1.0, 0, 6),
    ],
)
def test_async_slots(replicas: int, conc: int, share: float, busy: int, slots: int) -> None:
    assert async_slots(replicas, conc, share, busy) == slots


@pytest.mark.parametrize(
    ("slots", "ended", "pick"),
    [
        (8, 0, 16),  # idle or slow: two per slot
        (8, 3, 16),  # 2 * 3 + 8 = 14, under the least
        (8, 5, 18),  # between: what ended twice, and a run per slot
        (8, 28, 64),  # 64 exactly: the most
        (8, 29, 64),  # past it: eight per slot
        (8, 1000, 64),
        (1, 0, 2),
        (1, 2, 5),
        (0, 10, 0),  # no slot (inactive): nothing picked
    ],
)
def test_pick_size(slots: int, ended: int, pick: int) -> None:
    assert pick_size(slots, ended) == pick


def body(**kw: object) -> bytes:
    return json.dumps({"model_input": {"x": 1}, **kw}).encode()


def test_body_defaults() -> None:
    got = parse_async_body(body())
    assert (got.model_input, got.priority, got.max_time_in_queue_seconds) == ('{"x":1}', 0, 600)
    assert got.retry == RetryConfig(1, 1000, 5000) and got.webhook_endpoint is None


def test_body_full() -> None:
    got = parse_async_body(
        body(
            webhook_endpoint="https://hooks.example.com/x",
            priority=2,
            max_time_in_queue_seconds=10,
            inference_retry_config={"max_attempts": 3, "initial_delay_ms": 10, "max_delay_ms": 20},
        )
    )
    assert got.webhook_endpoint == "https://hooks.example.com/x"
    assert (got.priority, got.max_time_in_queue_seconds, got.retry) == (
        2,
        10,
        RetryConfig(3, 10, 20),
    )


@pytest.mark.parametrize(
    ("raw", "field", "words"),
    [
        (b"not json", "body", "JSON"),
        (b"[1]", "body", "JSON object"),
        (json.dumps({"priority": 1}).encode(), "model_input", "required"),
        (body(priority=3), "priority", "from 0 to 2"),
        (body(priority=-1), "priority", "from 0 to 2"),
        (body(priority="1"), "priority", "integer"),
        (body(priority=True), "priority", "integer"),
        (body(max_time_in_queue_seconds=9), "max_time_in_queue_seconds", "from 10 to 259200"),
        (body(max_time_in_queue_seconds=259201), "max_time_in_queue_seconds", "259200"),
        (body(webhook_url="https://x"), "webhook_url", "not a field"),
        (body(webhook_endpoint="http://hooks.example.com"), "webhook_endpoint", "https://"),
        (body(webhook_endpoint="ftp://x"), "webhook_endpoint", "https://"),
        (body(webhook_endpoint="https://169.254.169.254/latest"), "webhook_endpoint", "link-local"),
        (body(webhook_endpoint="https://[fe80::1]/"), "webhook_endpoint", "link-local"),
        (
            body(webhook_endpoint="https://metadata.google.internal/"),
            "webhook_endpoint",
            "metadata",
        ),
        (body(webhook_endpoint="https://u:p@x.example/"), "webhook_endpoint", "credentials"),
        (body(webhook_endpoint=5), "webhook_endpoint", "URL string"),
        (body(inference_retry_config=[]), "inference_retry_config", "object"),
        (
            body(inference_retry_config={"max_attempts": 0}),
            "inference_retry_config.max_attempts",
            "from 1 to 10",
        ),
        (body(inference_retry_config={"tries": 2}), "inference_retry_config.tries", "not a field"),
        (
            body(inference_retry_config={"initial_delay_ms": 500, "max_delay_ms": 100}),
            "inference_retry_config.max_delay_ms",
            "at least initial_delay_ms",
        ),
    ],
)
def test_body_refusals_name_field_rule_and_value(raw: bytes, field: str, words: str) -> None:
    with pytest.raises(ValidationError, match=words) as info:
        parse_async_body(raw)
    assert info.value.details["field"] == field
    assert str(info.value).startswith(field + ":")


@pytest.mark.parametrize(
    ("url", "words"),
    [
        # What the store cannot keep (SQLite: a lone surrogate; PostgreSQL: NUL), accepted
        # before and then blocking every insert after it.
        ("https://h.example/\ud800", "UTF-8"),
        ("https://h.example/\u0000", "control characters"),
        ("https://h.example/a\tb", "whitespace"),
        ("https://h.exa mple/", "whitespace"),
        ("https://h.example/\u0085", "whitespace"),
        ("https://h.example/\u009b", "control characters"),
        # What no delivery can parse or resolve, kept and retried at every poll before.
        ("https://h.example:99999/h", "port from 1 to 65535"),
        ("https://h.example:abc/h", "could not be cast"),
        ("https://h.example:0/h", "port 0"),
        ("https://[::1", "Invalid IPv6"),
        ("https://[::1]x/", "after the IPv6"),
        ("https://[h.example]/", "IPv4 or IPv6"),
        ("https://" + "a" * 64 + ".example/", "IDNA"),
        ("https://a..example/", "IDNA"),
    ],
)
def test_webhook_urls_no_store_or_delivery_could_use_are_refused(url: str, words: str) -> None:
    raw = json.dumps({"model_input": 1, "webhook_endpoint": url}).encode()  # as JSON escapes
    with pytest.raises(ValidationError, match=words) as info:
        parse_async_body(raw)
    assert info.value.details["field"] == "webhook_endpoint"
    assert info.value.details["value"].encode("utf-8")  # the error itself can be answered


@pytest.mark.parametrize(
    "url",
    ["https://[2001:db8::1]:8443/h", "https://h.example:443/h?a=%20", "https://bücher.example/"],
)
def test_webhook_urls_that_are_kept(url: str) -> None:
    assert parse_async_body(body(webhook_endpoint=url)).webhook_endpoint == url


def test_model_input_with_a_lone_surrogate_is_kept_escaped() -> None:
    """JSON text may hold ``\\ud800``; ``model_input`` is kept as ASCII JSON, so the
    store takes it and the model gets the same escape the caller sent."""
    got = parse_async_body(b'{"model_input": {"t": "\\ud800\\u0000"}}')
    assert got.model_input == '{"t":"\\ud800\\u0000"}'
    got.model_input.encode("ascii")


def test_plain_http_webhook_when_allowed() -> None:
    got = parse_async_body(body(webhook_endpoint="http://127.0.0.1:9/x"), allow_http=True)
    assert got.webhook_endpoint == "http://127.0.0.1:9/x"
