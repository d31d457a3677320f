"""The ``/async_predict`` body (Baseten's fields) read and checked: every refusal names
the field, the rule and the value found.

Hand-written rather than pydantic: the gateway parses it on its hot path, and the whole
check costs one ``json.loads``.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from kingpost.asyncq.policy import DEFAULT_MAX_TIME_IN_QUEUE_S, RetryConfig
from kingpost.errors import ValidationError

__all__ = [
    "DEFAULT_PAYLOAD_LIMIT",
    "AsyncInput",
    "check_webhook_url",
    "forbidden_address",
    "parse_async_body",
]

DEFAULT_PAYLOAD_LIMIT = 256 * 1024
"""Baseten's limit on an ``/async_predict`` body: 256 KiB."""
_FIELDS = (
    "model_input",
    "webhook_endpoint",
    "priority",
    "max_time_in_queue_seconds",
    "inference_retry_config",
)
_RETRY_FIELDS = {
    # name: (lowest, highest, default)
    "max_attempts": (1, 10, 1),
    "initial_delay_ms": (0, 10_000, 1000),
    "max_delay_ms": (0, 60_000, 5000),
}
_METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata", "instance-data"})


@dataclass(frozen=True)
class AsyncInput:
    model_input: str
    """``model_input`` as compact JSON text: what the replica's predict gets."""
    webhook_endpoint: str | None = None
    priority: int = 0
    max_time_in_queue_seconds: int = DEFAULT_MAX_TIME_IN_QUEUE_S
    retry: RetryConfig = field(default_factory=RetryConfig)


def _bad(name: str, rule: str, value: Any) -> ValidationError:
    shown = value if isinstance(value, (int, float, str, bool)) or value is None else repr(value)
    return ValidationError(
        f"{name}: {rule}; got {json.dumps(shown)[:200]}", field=name, rule=rule, value=shown
    )


def _int(body: dict[str, Any], name: str, low: int, high: int, default: int, where: str) -> int:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(where + name, f"must be an integer from {low} to {high}", value)
    if not low <= value <= high:
        raise _bad(where + name, f"must be from {low} to {high}", value)
    return value


def _retry(value: Any) -> RetryConfig:
    if value is None:
        return RetryConfig()
    name = "inference_retry_config"
    if not isinstance(value, dict):
        raise _bad(
            name, "must be an object with max_attempts, initial_delay_ms, max_delay_ms", value
        )
    unknown = sorted(set(value) - set(_RETRY_FIELDS))
    if unknown:
        raise _bad(
            f"{name}.{unknown[0]}", f"is not a field; use {', '.join(_RETRY_FIELDS)}", unknown[0]
        )
    got = {k: _int(value, k, lo, hi, d, name + ".") for k, (lo, hi, d) in _RETRY_FIELDS.items()}
    if got["max_delay_ms"] < got["initial_delay_ms"]:
        raise _bad(
            f"{name}.max_delay_ms",
            f"must be at least initial_delay_ms ({got['initial_delay_ms']})",
            got["max_delay_ms"],
        )
    return RetryConfig(**got)


def forbidden_address(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why a webhook may not go to ``addr`` whatever the port: link-local (cloud metadata
    services live there) and unspecified addresses; None when it may."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if addr.is_link_local:
        return f"{addr} is link-local (cloud metadata services answer there)"
    if addr.is_unspecified or addr.is_multicast:
        return f"{addr} is not a host address"
    if str(addr) == "fd00:ec2::254":
        return f"{addr} is the EC2 metadata service"
    return None


def _unsendable(url: str) -> str | None:
    """Why ``url`` cannot be stored or sent as it is, whatever it names: text that does
    not encode as UTF-8 (a lone surrogate: SQLite refuses it) or holds a control
    character (PostgreSQL refuses NUL; an HTTP client, any) or whitespace. None when
    it can."""
    try:
        url.encode("utf-8")
    except UnicodeEncodeError:
        return "must be UTF-8 text (it holds a lone surrogate)"
    for ch in url:
        if ch.isspace():
            return "must not contain whitespace (percent-encode it: %20)"
        if ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0:
            return f"must not contain control characters (U+{ord(ch):04X})"
    return None


def _host_and_port(url: str) -> tuple[str, int | None]:
    """The host and port of ``url`` as a delivery reads them (``urlsplit``), or a
    :class:`ValueError` saying what is wrong: an unclosed or misplaced ``[``, a port that
    is not a number from 1 to 65535, text after an IPv6 address's ``]`` that is not a
    port."""
    parts = urlsplit(url)  # ValueError: "Invalid IPv6 URL", a bracketed name
    hostport = parts.netloc.rpartition("@")[2]
    if hostport.startswith("[") and hostport.partition("]")[2][:1] not in ("", ":"):
        raise ValueError(f"{hostport!r} has text after the IPv6 address's ]")
    port = parts.port  # ValueError: not a number, or past 65535
    if port == 0:
        raise ValueError("port 0 is not a port one can connect to")
    return (parts.hostname or "").lower(), port


def check_webhook_url(url: Any, *, allow_http: bool) -> str:
    """A webhook URL as a request may name it. The host is resolved and checked again at
    each delivery (``asyncq/webhooks.py``): a name may point anywhere later. What is
    checked here is what no later moment could fix: a URL the store cannot keep, or
    that no delivery could parse, resolve or connect to, is refused now rather than
    kept and retried."""
    name = "webhook_endpoint"
    if not isinstance(url, str) or not url:
        raise _bad(name, "must be a URL string", url)
    if len(url) > 2048:
        raise _bad(name, "must be at most 2048 characters", f"{_shown(url[:60])}…")
    why = _unsendable(url)
    if why is not None:
        raise _bad(name, why, _shown(url))
    try:
        host, _ = _host_and_port(url)
    except ValueError as exc:
        rule = f"must be a valid URL: a host, and a port from 1 to 65535 if any ({exc})"
        raise _bad(name, rule, url) from None
    parts = urlsplit(url)
    schemes = ("https", "http") if allow_http else ("https",)
    if parts.scheme not in schemes:
        rule = (
            "must be an http(s) URL"
            if allow_http
            else "must be an https:// URL (set KINGPOST_ASYNC_WEBHOOK_ALLOW_HTTP=true for "
            "plain http on loopback or private networks)"
        )
        raise _bad(name, rule, url)
    if not host:
        raise _bad(name, "must name a host", url)
    if parts.username or parts.password:
        raise _bad(name, "must not carry credentials", url)
    if host in _METADATA_HOSTS:
        raise _bad(name, "must not name a cloud metadata service", url)
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        try:
            host.encode("idna")  # what the resolver does with it at each delivery
        except UnicodeError as exc:
            rule = f"must name a valid host (IDNA: labels of 1 to 63 characters; {exc})"
            raise _bad(name, rule, url) from None
        return url
    why = forbidden_address(addr)
    if why is not None:
        raise _bad(name, f"must not point at {why}", url)
    return url


def _shown(text: str) -> str:
    """``text`` as an error may quote it: what is not UTF-8 (a lone surrogate) escaped,
    so the error itself can be encoded and answered."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def parse_async_body(raw: bytes, *, allow_http: bool = False) -> AsyncInput:
    """Read an ``/async_predict`` body, or raise :class:`ValidationError` (400)."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValidationError(
            f"body: must be a JSON object; it is not JSON ({exc})", field="body", rule="JSON object"
        ) from exc
    if not isinstance(body, dict):
        raise _bad("body", "must be a JSON object with model_input", type(body).__name__)
    unknown = sorted(set(body) - set(_FIELDS))
    if unknown:
        raise _bad(
            unknown[0], f"is not a field of async_predict; use {', '.join(_FIELDS)}", unknown[0]
        )
    if "model_input" not in body:
        raise _bad("model_input", "is required (the JSON your model's predict takes)", None)
    webhook = body.get("webhook_endpoint")
    return AsyncInput(
        model_input=json.dumps(body["model_input"], separators=(",", ":")),
        webhook_endpoint=None
        if webhook in (None, "")
        else check_webhook_url(webhook, allow_http=allow_http),
        priority=_int(body, "priority", 0, 2, 0, ""),
        max_time_in_queue_seconds=_int(
            body, "max_time_in_queue_seconds", 10, 72 * 3600, DEFAULT_MAX_TIME_IN_QUEUE_S, ""
        ),
        retry=_retry(body.get("inference_retry_config")),
    )
