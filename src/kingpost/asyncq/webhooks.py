"""Webhook deliveries: Baseten's payload, its ``X-BASETEN-SIGNATURE`` header, and the
address checks that keep a webhook from reaching the control plane or a metadata service.

The payload is Baseten's async predict result: ``request_id``, ``model_id``,
``deployment_id``, ``type``, ``time``, ``data`` and ``errors``. The signature is
``v1=<hex HMAC-SHA256 of the body>`` per active webhook secret, comma-separated, newest
first, so a receiver verifies with whichever secret it holds (rotation).

A delivery resolves the host once, checks every address it got, and connects to the
first of exactly those (the URL's host replaced by the address; ``Host`` and TLS SNI, and
so certificate verification, keep the name): a name that resolves to a public address for
the check and to a forbidden one for the connection (DNS rebinding) never reaches the
forbidden one.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import socket
from collections.abc import Awaitable, Callable, Collection, Sequence
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import httpx

from kingpost.asyncq.body import forbidden_address
from kingpost.store.asyncq import AsyncRequestView
from kingpost.store.models import AsyncStatus

__all__ = [
    "SIGNATURE_HEADER",
    "check_destination",
    "deliver",
    "payload",
    "pinned",
    "resolve",
    "signature",
    "verify",
]

SIGNATURE_HEADER = "X-BASETEN-SIGNATURE"
RESULT_TYPE = "async_request_completed"
"""Baseten's ``type`` of an async predict result (docs.baseten.co, "Async inference")."""

Resolver = Callable[[str, int], Awaitable[list[str]]]
"""A host and port to the addresses they resolve to."""


def payload(view: AsyncRequestView, now: datetime) -> bytes:
    """The webhook body for a finished request (compact JSON, the bytes that are signed)."""
    data: Any = None
    if view.status == AsyncStatus.SUCCEEDED and view.result is not None:
        data = json.loads(view.result)
    body = {
        "request_id": view.id,
        "model_id": view.model_id,
        "deployment_id": view.deployment_id,
        "type": RESULT_TYPE,
        "time": now.isoformat(),
        "data": data,
        "errors": list(view.errors),
    }
    return json.dumps(body, separators=(",", ":")).encode()


def signature(body: bytes, secrets: Sequence[str]) -> str:
    """The header value: ``v1=<hex>`` per secret, comma-separated."""
    return ",".join("v1=" + hmac.new(s.encode(), body, hashlib.sha256).hexdigest() for s in secrets)


def verify(body: bytes, header: str, secret: str) -> bool:
    """What a receiver does: does any ``v1=`` signature match ``secret``? (for tests and
    receivers written in Python)."""
    want = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return any(
        part.strip().startswith("v1=") and hmac.compare_digest(part.strip()[3:], want)
        for part in header.split(",")
    )


def check_destination(url: str, own_ports: Collection[int], addresses: Sequence[str]) -> str | None:
    """Why a delivery to ``url`` (whose host resolved to ``addresses``) is refused, or
    None: a link-local or metadata address, or this machine on one of the control
    plane's own ports (its API, its gateway)."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    for raw in addresses:
        addr = ipaddress.ip_address(raw.split("%", 1)[0])
        why = forbidden_address(addr)
        if why is not None:
            return f"{parts.hostname} resolves to {why}"
        if port in own_ports and (addr.is_loopback or _is_local(addr)):
            return f"{parts.hostname}:{port} is this control plane's own port (its API or gateway)"
    return None


def _is_local(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    try:
        with socket.socket(
            socket.AF_INET6 if addr.version == 6 else socket.AF_INET, socket.SOCK_DGRAM
        ) as s:
            s.bind((str(addr), 0))  # binds only to an address of this machine
        return True
    except OSError:
        return False


async def resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (sorted, deduplicated)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


def pinned(url: str, address: str) -> tuple[httpx.URL, dict[str, str], dict[str, Any]]:
    """``url`` sent to ``address``: the URL with the address as its host, the ``Host``
    header of the name, and the request extension that keeps the name for TLS (SNI and
    the certificate check)."""
    target = httpx.URL(url)
    name = target.host
    headers = {"host": target.netloc.decode("ascii")}
    extensions: dict[str, Any] = {}
    if not _is_ip(name):
        extensions["sni_hostname"] = name
    return target.copy_with(host=address.split("%", 1)[0]), headers, extensions


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


async def deliver(
    client: httpx.AsyncClient,
    url: str,
    body: bytes,
    secrets: Sequence[str],
    own_ports: Collection[int],
    request_id: str,
    resolver: Resolver = resolve,
) -> tuple[int | None, str]:
    """POST ``body`` once, to an address checked here (the module's docstring). Returns
    the receiver's status (None: no answer, or refused before sending) and an error to
    record ("" on a 2xx); a URL that cannot be parsed, resolved as a name or sent is a
    final refusal (400), recorded as the others. ``client`` must not keep connections
    alive: one kept for an address would carry the next delivery to another name on it."""
    try:  # a URL kept before accepts checked port and host: no later attempt could do better
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        return 400, f"refused: the URL cannot be read ({exc})"  # final, as every refusal
    try:
        addresses = await resolver(parts.hostname or "", port)
    except OSError as exc:
        return None, f"cannot resolve {parts.hostname}: {exc}"
    except ValueError as exc:  # UnicodeError included: a host name IDNA refuses
        return 400, f"refused: {parts.hostname} is not a host name one can resolve ({exc})"
    if not addresses:
        return None, f"cannot resolve {parts.hostname}: no address"
    why = check_destination(url, own_ports, addresses)
    if why is not None:
        return 400, f"refused: {why}"  # final: never retried
    try:
        target, headers, extensions = pinned(url, addresses[0])
    except (httpx.InvalidURL, ValueError) as exc:
        return 400, f"refused: the URL cannot be sent ({exc})"
    headers |= {"content-type": "application/json", "x-baseten-request-id": request_id}
    if secrets:
        headers[SIGNATURE_HEADER] = signature(body, secrets)
    try:
        resp = await client.post(target, content=body, headers=headers, extensions=extensions)
    except httpx.HTTPError as exc:
        return None, f"{type(exc).__name__}: {exc}"[:500]
    if 200 <= resp.status_code < 300:
        return resp.status_code, ""
    return resp.status_code, f"HTTP {resp.status_code}: {resp.text[:300]}"
