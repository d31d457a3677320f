"""HTTP/1.1 header framing for the proxy: pure functions and tables, bytes in, bytes out.

What the gateway forwards and what it drops (hop-by-hop headers, those a ``Connection``
header names, the platform's credentials), the request head a replica gets, the lines an
interim response or a replica's header block is passed on with, and the gateway's own
error answers. Nothing here holds state or does I/O; the connection (``proxy.py``) and
the exchange (``forward.py``) call these with what they parsed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Protocol

__all__ = [
    "BODY_UNEXPECTED",
    "CONNECTION_KEPT",
    "CONTINUE",
    "HOP_BY_HOP",
    "IDEMPOTENT",
    "NOT_FORWARDED",
    "NO_BODY_STATUS",
    "RequestHead",
    "connection_tokens",
    "error_body",
    "interim_head",
    "json_answer",
    "named_by_connection",
    "request_head",
    "response_header_lines",
]

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"te",
        b"trailer",
        b"upgrade",
        b"x-baseten-request-id",
        b"x-kingpost-spans",
    }
)
"""Headers for one hop (RFC 9110 7.6.1), the request id the gateway sets itself, and the
model server's spans, which are for the gateway alone (``gateway/tracing.py``)."""
NOT_FORWARDED = HOP_BY_HOP | {
    b"authorization",
    b"proxy-authorization",
    b"content-length",
    b"expect",
    b"x-forwarded-for",  # sent again with the client's address appended
}
"""Request headers a replica never gets as the client sent them."""
BODY_UNEXPECTED = frozenset({b"GET", b"HEAD", b"DELETE", b"OPTIONS", b"TRACE"})
"""Methods whose bodies have no defined meaning (RFC 9110 9.3): many servers never read
one, and parse it as the next request. Forwarded, but the connection is not reused."""
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
"""Methods whose requests may run twice with the effect of once (RFC 9110 9.2.2): a
replica that hung up on one without a byte of answer may have it sent to another."""
NO_BODY_STATUS = frozenset({204, 304})
_CONNECTION_OPTIONS = frozenset({b"close", b"keep-alive", b"upgrade"})
CONNECTION_KEPT = _CONNECTION_OPTIONS | {b"host", b""}
"""``Connection`` tokens that name no header to drop (Host: the gateway must send one)."""
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_REASONS = {
    200: "OK",
    201: "Created",
    202: "Accepted",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    413: "Content Too Large",
    429: "Too Many Requests",
    422: "Unprocessable Content",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    507: "Insufficient Storage",
}


class RequestHead(Protocol):
    """What :func:`request_head` reads of a parsed request."""

    @property
    def method(self) -> bytes: ...
    @property
    def headers(self) -> list[tuple[bytes, bytes]]: ...
    @property
    def hop(self) -> frozenset[bytes] | None:
        """Headers not to forward, when ``Connection`` named more than the usual options
        (None: :data:`NOT_FORWARDED`)."""

    @property
    def upgrade(self) -> bool: ...
    @property
    def forwarded_for(self) -> bytes | None:
        """The client's own ``X-Forwarded-For`` values, joined."""

    @property
    def host(self) -> bytes | None: ...
    @property
    def chunked(self) -> bool: ...
    @property
    def content_length(self) -> bytes | None: ...


def connection_tokens(value: bytes) -> set[bytes] | None:
    """The lowercased tokens of a ``Connection`` header, or None when it is a lone close,
    keep-alive or upgrade (the usual case: it names no other header, and no set is made)."""
    lowered = value.lower()
    if lowered in _CONNECTION_OPTIONS:
        return None
    return {t.strip() for t in lowered.split(b",")}


def named_by_connection(
    tokens: set[bytes], dropped: frozenset[bytes] | None
) -> frozenset[bytes] | None:
    """The request headers not to forward once a ``Connection`` header with ``tokens`` is
    read: those already ``dropped`` (None: :data:`NOT_FORWARDED`) and the ones it names,
    which are for this hop only (RFC 9110 7.6.1); still ``dropped`` when it names none."""
    listed = tokens - CONNECTION_KEPT
    if not listed:
        return dropped
    return (dropped or NOT_FORWARDED) | listed


def request_head(req: RequestHead, path: str, rid: str, peer: bytes) -> bytes:
    """The head a replica gets for ``req``, sent to ``path``: the client's headers but those
    not forwarded, the request id, ``X-Forwarded-For`` with ``peer`` (the address that
    connected, b"" when unknown) last, a Host, and the body's framing as parsed."""
    lines = [req.method + b" " + path.encode("latin-1") + b" HTTP/1.1\r\n"]
    drop = NOT_FORWARDED if req.hop is None else req.hop
    upgrade = req.upgrade
    for name, value in req.headers:
        lname = name.lower()
        if upgrade and lname in (b"connection", b"upgrade"):
            lines.append(name + b": " + value + b"\r\n")
            continue
        if lname in drop:
            continue
        lines.append(name + b": " + value + b"\r\n")
    lines.append(b"x-baseten-request-id: " + rid.encode("latin-1") + b"\r\n")
    # What the client said it forwarded for, then the address that connected: the last
    # entry, the one a replica may trust, is never the client's own word.
    ff = req.forwarded_for
    if ff is not None or peer:
        joined = peer if ff is None else (ff + b", " + peer if peer else ff)
        lines.append(b"x-forwarded-for: " + joined + b"\r\n")
    if req.host is None:  # HTTP/1.0 without Host: an HTTP/1.1 request needs one, empty
        lines.append(b"host: \r\n")  # when there is no authority (RFC 9112 3.2)
    if req.chunked:
        lines.append(b"transfer-encoding: chunked\r\n")
    elif req.content_length is not None:
        lines.append(b"content-length: " + req.content_length + b"\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


def response_header_lines(headers: Iterable[tuple[bytes, bytes]], named: set[bytes]) -> bytes:
    """A replica's header lines as passed on when its ``Connection`` header ``named`` other
    headers: without those (they were for its hop only, RFC 9110 7.6.1) and without the
    hop-by-hop ones, but with ``Content-Length``, which frames the body."""
    out = bytearray()
    for name, value in headers:
        lname = name.lower()
        if lname not in HOP_BY_HOP and (lname not in named or lname == b"content-length"):
            out += name + b": " + value + b"\r\n"
    return bytes(out)


def interim_head(status: int, reason: bytes, headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """An interim (1xx) response as passed on to the client, without hop-by-hop headers."""
    out = bytearray(b"HTTP/1.1 %d %s\r\n" % (status, reason or b"Informational"))
    for name, value in headers:
        if name.lower() not in HOP_BY_HOP:
            out += name + b": " + value + b"\r\n"
    out += b"\r\n"
    return bytes(out)


def error_body(
    status: int,
    message: str,
    code: str,
    request_id: str,
    close: bool = False,
    head: bool = False,
) -> bytes:
    """A whole answer from the gateway itself: JSON ``{"error", "code"}`` with the request
    id, and ``connection: close`` when the connection ends with it (``head``: see
    :func:`json_answer`)."""
    return json_answer(status, {"error": message, "code": code}, request_id, close, head)


def json_answer(
    status: int, payload: object, request_id: str, close: bool = False, head: bool = False
) -> bytes:
    """A whole JSON answer from the gateway itself (an error, or a wake's ``{}``); a full
    queue (429) or no replica in time (503) says when to try again. The answer to a HEAD
    request (``head``) has the headers a GET would get, content-length included, and no
    body (RFC 9110 9.3.2): a client reads the next answer right after the head."""
    body = json.dumps(payload).encode()
    reason = _REASONS.get(status, "Error")
    connection = "connection: close\r\n" if close else ""
    retry = "retry-after: 1\r\n" if status in (429, 503) else ""
    return (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nx-baseten-request-id: {request_id}\r\n"
        f"{retry}{connection}\r\n"
    ).encode() + (b"" if head else body)
