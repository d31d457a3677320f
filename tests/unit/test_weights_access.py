"""The weights URL guard's transport: one resolution, checked, and the connection pinned
to the checked address with the name kept for Host and TLS (seam test: the resolver and
the underlying transport stand in; no network here reaches a public address)."""

from __future__ import annotations

import socket
from typing import Any

import httpx
import pytest

from kingpost.errors import WeightsError
from kingpost.weights import access


def _resolving(monkeypatch: pytest.MonkeyPatch, *addresses: str) -> None:
    def fake(host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in addresses]

    monkeypatch.setattr(access.socket, "getaddrinfo", fake)


def test_a_public_name_is_fetched_from_its_checked_address_with_its_name_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _resolving(monkeypatch, "93.184.216.34")
    sent: list[httpx.Request] = []

    def send(self: httpx.HTTPTransport, request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200, request=request)

    monkeypatch.setattr(httpx.HTTPTransport, "handle_request", send)
    request = httpx.Request("GET", "https://weights.example:8443/m/a.bin?x=1")
    access._GuardedTransport().handle_request(request)
    (out,) = sent
    assert str(out.url) == "https://93.184.216.34:8443/m/a.bin?x=1"
    assert out.headers["host"] == "weights.example:8443"
    assert out.extensions["sni_hostname"] == "weights.example"


def test_a_name_with_any_private_address_is_refused_before_a_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _resolving(monkeypatch, "93.184.216.34", "169.254.169.254")
    monkeypatch.setattr(httpx.HTTPTransport, "handle_request", lambda *a: pytest.fail("sent"))
    with pytest.raises(WeightsError, match=r"refused: weights\.example resolves to"):
        access._GuardedTransport().handle_request(httpx.Request("GET", "https://weights.example/"))
