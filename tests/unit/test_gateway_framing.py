"""The gateway's header framing (one seam, pure): tables of inputs and the exact bytes out."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from kingpost.gateway.framing import (
    HOP_BY_HOP,
    NOT_FORWARDED,
    connection_tokens,
    error_body,
    interim_head,
    json_answer,
    named_by_connection,
    request_head,
    response_header_lines,
)


@dataclass(frozen=True)
class Head:
    """A parsed request as :func:`request_head` reads it (the connection's ``Request``)."""

    headers: list[tuple[bytes, bytes]] = field(default_factory=lambda: [(b"Host", b"gw")])
    method: bytes = b"GET"
    hop: frozenset[bytes] | None = None
    upgrade: bool = False
    forwarded_for: bytes | None = None
    host: bytes | None = b"gw"
    chunked: bool = False
    content_length: bytes | None = None


@pytest.mark.parametrize(
    ("value", "tokens"),
    [
        (b"close", None),  # the usual values name no header, and make no set
        (b"Keep-Alive", None),
        (b"upgrade", None),
        (b"keep-alive, Upgrade", {b"keep-alive", b"upgrade"}),
        (b"close, X-Secret", {b"close", b"x-secret"}),
        (b" TE ,trailer", {b"te", b"trailer"}),
        (b"", {b""}),
    ],
)
def test_connection_tokens(value: bytes, tokens: set[bytes] | None) -> None:
    assert connection_tokens(value) == tokens


@pytest.mark.parametrize(
    ("tokens", "dropped", "expected"),
    [
        ({b"keep-alive", b"upgrade"}, None, None),  # nothing named: the usual set stands
        ({b"host", b""}, None, None),  # Host is never dropped: the replica needs one
        ({b"x-secret"}, None, NOT_FORWARDED | {b"x-secret"}),
        ({b"close", b"x-a"}, None, NOT_FORWARDED | {b"x-a"}),
        # A second Connection header adds to what the first named.
        ({b"x-a"}, NOT_FORWARDED | {b"x-b"}, NOT_FORWARDED | {b"x-a", b"x-b"}),
        ({b"close"}, NOT_FORWARDED | {b"x-b"}, NOT_FORWARDED | {b"x-b"}),
    ],
)
def test_headers_named_by_connection_are_not_forwarded(
    tokens: set[bytes], dropped: frozenset[bytes] | None, expected: frozenset[bytes] | None
) -> None:
    assert named_by_connection(tokens, dropped) == expected


END = b"x-baseten-request-id: r1\r\nx-forwarded-for: 10.0.0.1\r\n\r\n"


@pytest.mark.parametrize(
    ("head", "path", "peer", "expected"),
    [
        pytest.param(
            Head(), "/p", b"10.0.0.1", b"GET /p HTTP/1.1\r\nHost: gw\r\n" + END, id="plain"
        ),
        pytest.param(
            Head(
                headers=[
                    (b"Host", b"gw"),
                    (b"Authorization", b"Api-Key k"),
                    (b"Proxy-Authorization", b"Basic x"),
                    (b"Content-Length", b"999"),
                    (b"Expect", b"100-continue"),
                    (b"X-Baseten-Request-Id", b"from-client"),
                    (b"Keep-Alive", b"timeout=5"),
                    (b"Connection", b"keep-alive"),
                    (b"Transfer-Encoding", b"gzip"),
                    (b"TE", b"trailers"),
                    (b"Accept", b"*/*"),
                ],
                method=b"POST",
                content_length=b"5",
            ),
            "/v1/predict?x=1",
            b"10.0.0.1",
            b"POST /v1/predict?x=1 HTTP/1.1\r\nHost: gw\r\nAccept: */*\r\n"
            b"x-baseten-request-id: r1\r\nx-forwarded-for: 10.0.0.1\r\n"
            b"content-length: 5\r\n\r\n",
            id="credentials-hop-by-hop-and-framing-dropped-then-set",
        ),
        pytest.param(
            Head(
                headers=[(b"Host", b"gw"), (b"X-Forwarded-For", b"1.2.3.4")],
                forwarded_for=b"1.2.3.4",
            ),
            "/p",
            b"10.0.0.1",
            b"GET /p HTTP/1.1\r\nHost: gw\r\nx-baseten-request-id: r1\r\n"
            b"x-forwarded-for: 1.2.3.4, 10.0.0.1\r\n\r\n",
            id="client-forwarded-for-then-peer",
        ),
        pytest.param(
            Head(forwarded_for=b"1.2.3.4, 5.6.7.8"),
            "/p",
            b"",
            b"GET /p HTTP/1.1\r\nHost: gw\r\nx-baseten-request-id: r1\r\n"
            b"x-forwarded-for: 1.2.3.4, 5.6.7.8\r\n\r\n",
            id="no-peer-keeps-client-list",
        ),
        pytest.param(
            Head(),
            "/p",
            b"",
            b"GET /p HTTP/1.1\r\nHost: gw\r\nx-baseten-request-id: r1\r\n\r\n",
            id="no-forwarded-for-at-all",
        ),
        pytest.param(
            Head(
                headers=[(b"Host", b"gw"), (b"X-Secret", b"s"), (b"Connection", b"x-secret")],
                hop=NOT_FORWARDED | {b"x-secret"},
            ),
            "/p",
            b"10.0.0.1",
            b"GET /p HTTP/1.1\r\nHost: gw\r\n" + END,
            id="named-in-connection",
        ),
        pytest.param(
            Head(
                headers=[(b"Host", b"gw"), (b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")],
                upgrade=True,
            ),
            "/ws",
            b"10.0.0.1",
            b"GET /ws HTTP/1.1\r\nHost: gw\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n" + END,
            id="upgrade-keeps-its-handshake",
        ),
        pytest.param(
            Head(headers=[(b"Host", b"gw"), (b"Connection", b"Upgrade"), (b"Upgrade", b"h2c")]),
            "/p",
            b"10.0.0.1",
            b"GET /p HTTP/1.1\r\nHost: gw\r\n" + END,
            id="not-an-upgrade-drops-them",
        ),
        pytest.param(
            Head(headers=[], host=None),
            "/p",
            b"10.0.0.1",
            b"GET /p HTTP/1.1\r\n" + END[:-2] + b"host: \r\n\r\n",
            id="http10-without-host-gets-an-empty-one",
        ),
        pytest.param(
            Head(
                headers=[(b"Host", b"gw"), (b"Transfer-Encoding", b"chunked")],
                method=b"POST",
                chunked=True,
                content_length=b"3",
            ),
            "/p",
            b"10.0.0.1",
            b"POST /p HTTP/1.1\r\nHost: gw\r\n" + END[:-2] + b"transfer-encoding: chunked\r\n\r\n",
            id="chunked-wins-over-a-length",
        ),
    ],
)
def test_request_head(head: Head, path: str, peer: bytes, expected: bytes) -> None:
    assert request_head(head, path, "r1", peer) == expected


@pytest.mark.parametrize("name", sorted(NOT_FORWARDED))
def test_no_header_in_not_forwarded_reaches_a_replica(name: bytes) -> None:
    sent = request_head(Head(headers=[(b"Host", b"gw"), (name.upper(), b"v")]), "/", "r1", b"")
    assert b"\r\n" + name + b": v" not in sent.lower()


@pytest.mark.parametrize(
    ("status", "reason", "headers", "expected"),
    [
        (
            103,
            b"Early Hints",
            [(b"Link", b"</a.css>; rel=preload"), (b"Connection", b"keep-alive")],
            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n",
        ),
        (102, b"", [], b"HTTP/1.1 102 Informational\r\n\r\n"),
        (
            199,
            b"X",
            [(b"X-Baseten-Request-Id", b"spoof"), (b"X-Kept", b"1")],
            b"HTTP/1.1 199 X\r\nX-Kept: 1\r\n\r\n",
        ),
    ],
)
def test_interim_head(
    status: int, reason: bytes, headers: list[tuple[bytes, bytes]], expected: bytes
) -> None:
    assert interim_head(status, reason, headers) == expected


@pytest.mark.parametrize(
    ("headers", "named", "expected"),
    [
        (
            [
                (b"Content-Type", b"text/plain"),
                (b"X-Internal", b"1"),
                (b"Connection", b"x-internal"),
                (b"Content-Length", b"2"),
            ],
            {b"x-internal"},
            b"Content-Type: text/plain\r\nContent-Length: 2\r\n",
        ),
        # Content-Length frames the body: kept even when the replica names it.
        ([(b"Content-Length", b"2")], {b"content-length"}, b"Content-Length: 2\r\n"),
        (
            [(b"Transfer-Encoding", b"chunked"), (b"Keep-Alive", b"5"), (b"X-A", b"a")],
            {b"close"},
            b"X-A: a\r\n",
        ),
    ],
)
def test_response_header_lines(
    headers: list[tuple[bytes, bytes]], named: set[bytes], expected: bytes
) -> None:
    assert response_header_lines(headers, named) == expected


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (400, "Bad Request"),
        (401, "Unauthorized"),
        (404, "Not Found"),
        (408, "Request Timeout"),
        (429, "Too Many Requests"),
        (431, "Request Header Fields Too Large"),
        (501, "Not Implemented"),
        (502, "Bad Gateway"),
        (503, "Service Unavailable"),
        (504, "Gateway Timeout"),
        # The async store's errors (errors.py) and the invoke-only key's refusal.
        (403, "Forbidden"),
        (422, "Unprocessable Content"),
        (500, "Internal Server Error"),
        (507, "Insufficient Storage"),
        (599, "Error"),  # no reason of its own: the status code is what clients read
    ],
)
@pytest.mark.parametrize("close", [False, True])
def test_error_body(status: int, reason: str, close: bool) -> None:
    answer = error_body(status, 'a "quoted" message', "some_code", "rid-1", close=close)
    head, body = answer.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    assert lines[0] == f"HTTP/1.1 {status} {reason}"
    assert lines[1:] == [
        "content-type: application/json",
        f"content-length: {len(body)}",
        "x-baseten-request-id: rid-1",
        *(["retry-after: 1"] if status in (429, 503) else []),  # a full queue, no replica
        *(["connection: close"] if close else []),
    ]
    assert json.loads(body) == {"error": 'a "quoted" message', "code": "some_code"}


@pytest.mark.parametrize("status", [202, 401, 404, 429, 502, 504])
def test_the_answer_to_head_has_the_headers_and_no_body(status: int) -> None:
    """A body after a HEAD answer's head is read by a kept-alive client as the start of
    the next answer (RFC 9110 9.3.2: a HEAD answer has none)."""
    whole = error_body(status, "why", "some_code", "rid-1")
    answer = error_body(status, "why", "some_code", "rid-1", head=True)
    assert answer == whole[: whole.index(b"\r\n\r\n") + 4]  # content-length included
    wake = json_answer(status, {}, "rid-1", head=True)  # a wake's {} on HEAD
    assert b"\r\ncontent-length: 2\r\n" in wake and wake.index(b"\r\n\r\n") == len(wake) - 4


def test_hop_by_hop_headers_are_never_forwarded() -> None:
    assert HOP_BY_HOP <= NOT_FORWARDED
