"""A webhook is delivered to the address that was checked, not to whatever its name
resolves to a moment later (DNS rebinding), over TLS with the name kept for SNI, Host
and the certificate check. Real TLS receivers on two loopback addresses; the one seam
faked is the system resolver, which answers the checked address first and the other
one after."""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from helpers.platform import free_port
from kingpost.asyncq.webhooks import deliver

NAME = "hook.test"


def _certificate(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, NAME)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(NAME)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


class Receiver:
    """A TLS webhook receiver on ``address``: what it got (SNI, Host, body)."""

    def __init__(self, address: str, port: int, cert: Path, key: Path) -> None:
        self.got: list[tuple[str | None, str | None, bytes]] = []
        sni: list[str | None] = []
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        ctx.sni_callback = lambda _sock, name, _ctx: sni.append(name)  # type: ignore[assignment,func-returns-value]
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                outer.got.append((sni[-1] if sni else None, self.headers["host"], body))
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer((address, port), Handler)
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receivers(tmp_path: Path) -> Iterator[tuple[Receiver, Receiver, Path, int]]:
    cert, key = _certificate(tmp_path)
    port = free_port()
    checked = Receiver("127.0.0.1", port, cert, key)
    other = Receiver("127.0.0.2", port, cert, key)  # where a rebound name would lead
    try:
        yield checked, other, cert, port
    finally:
        checked.close()
        other.close()


def test_delivery_goes_to_the_checked_address_with_sni_and_host(
    receivers: tuple[Receiver, Receiver, Path, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    checked, other, cert, port = receivers
    answers = iter(["127.0.0.1"])  # the first answer is checked; every later one rebinds
    asked: list[str] = []
    real = socket.getaddrinfo

    def rebinding(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host != NAME:
            return real(host, *args, **kwargs)
        asked.append(host)
        address = next(answers, "127.0.0.2")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    trust = ssl.create_default_context(cafile=str(cert))

    async def send() -> tuple[int | None, str]:
        limits = httpx.Limits(max_keepalive_connections=0)
        async with httpx.AsyncClient(verify=trust, limits=limits) as client:
            return await deliver(client, f"https://{NAME}:{port}/hook", b"{}", [], (), "r1")

    status, error = asyncio.run(send())
    assert (status, error) == (200, "")
    assert other.got == []  # the rebound address was never reached
    assert checked.got == [(NAME, f"{NAME}:{port}", b"{}")]  # SNI and Host name the host
    assert asked == [NAME]  # resolved once
