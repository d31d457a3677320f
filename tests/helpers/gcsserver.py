"""A small server speaking the part of Google Cloud Storage a mirror needs, with
Google's OAuth service-account flow in front of it:

- ``POST /token``: a JWT-bearer grant; the JWT's RS256 signature is checked against the
  public key registered for its ``iss``, and its ``aud``, ``scope`` and ``exp`` too;
- ``GET /storage/v1/b/{bucket}/o``: list (prefix, paginated, ``md5Hash`` base64);
- ``GET /storage/v1/b/{bucket}/o/{object}?alt=media``: download, with ``Range``.

Buckets list the service accounts allowed to read them (403 otherwise).
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

from helpers.httpd import QuietHandler, serving

PAGE_SIZE = 2  # small, so listings are paginated in tests


@dataclass
class Bucket:
    objects: dict[str, bytes] = field(default_factory=dict)
    readers: set[str] = field(default_factory=set)
    """Service-account emails allowed to read."""


class Gcs:
    def __init__(self) -> None:
        self.buckets: dict[str, Bucket] = {}
        self.public_keys: dict[str, Any] = {}
        """client_email -> RSA public key (cryptography)."""
        self.tokens: dict[str, str] = {}
        """Access token -> client_email."""
        self.downloads: Counter[str] = Counter()
        self.ranges: list[str] = []
        self.token_requests = 0
        self.url = ""

    def service_account(self, email: str) -> dict[str, str]:
        """A new key for ``email``, as the JSON Google issues; its public half is trusted."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.public_keys[email] = key.public_key()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        return {
            "type": "service_account",
            "project_id": "test-project",
            "private_key_id": secrets.token_hex(8),
            "private_key": pem,
            "client_email": email,
            "token_uri": f"{self.url}/token",
        }


def _unb64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def _handler(gcs: Gcs) -> type[BaseHTTPRequestHandler]:
    class Handler(QuietHandler):
        def _error(self, status: int, message: str) -> None:
            body = {"error": {"code": status, "message": message}}
            self._send(status, json.dumps(body).encode())

        def _grant(self, assertion: str) -> str | None:
            """The email a valid assertion is for, or None."""
            from cryptography.exceptions import InvalidSignature
            from cryptography.hazmat.primitives import hashes
            from cryptography.hazmat.primitives.asymmetric import padding

            try:
                head, claims_b64, sig = assertion.split(".")
                header, claims = json.loads(_unb64(head)), json.loads(_unb64(claims_b64))
            except ValueError:
                return None
            key = gcs.public_keys.get(claims.get("iss"))
            if header.get("alg") != "RS256" or key is None:
                return None
            try:
                key.verify(
                    _unb64(sig),
                    f"{head}.{claims_b64}".encode(),
                    padding.PKCS1v15(),
                    hashes.SHA256(),
                )
            except InvalidSignature:
                return None
            ok = (
                claims.get("aud") == f"{gcs.url}/token"
                and "devstorage" in claims.get("scope", "")
                and claims.get("iat", 0) - 60 <= time.time() < claims.get("exp", 0)
            )
            return str(claims["iss"]) if ok else None

        def do_POST(self) -> None:
            if self.path != "/token":
                self._error(404, "Not Found")
                return
            gcs.token_requests += 1
            length = int(self.headers.get("Content-Length", 0))
            form = urllib.parse.parse_qs(self.rfile.read(length).decode())
            grant = form.get("grant_type", [""])[0]
            email = self._grant(form.get("assertion", [""])[0])
            if grant != "urn:ietf:params:oauth:grant-type:jwt-bearer" or email is None:
                body = {"error": "invalid_grant", "error_description": "Invalid JWT Signature."}
                self._send(400, json.dumps(body).encode())
                return
            token = secrets.token_urlsafe(24)
            gcs.tokens[token] = email
            body = {"access_token": token, "expires_in": 3599, "token_type": "Bearer"}
            self._send(200, json.dumps(body).encode())

        def do_GET(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            parts = url.path.split("/")
            # ['', 'storage', 'v1', 'b', bucket, 'o', (object)]
            if len(parts) < 6 or parts[1:4] != ["storage", "v1", "b"] or parts[5] != "o":
                self._error(404, "Not Found")
                return
            auth = self.headers.get("Authorization", "")
            email = gcs.tokens.get(auth.removeprefix("Bearer "))
            if email is None:
                self._error(401, "Invalid Credentials")
                return
            bucket = gcs.buckets.get(urllib.parse.unquote(parts[4]))
            if bucket is None:
                self._error(404, "The specified bucket does not exist.")
                return
            if email not in bucket.readers:
                self._error(403, f"{email} does not have storage.objects.get access")
                return
            query = urllib.parse.parse_qs(url.query)
            if len(parts) == 6:
                self._list(bucket, query)
            else:
                self._media(bucket, urllib.parse.unquote("/".join(parts[6:])))

        def _list(self, bucket: Bucket, query: dict[str, list[str]]) -> None:
            prefix = query.get("prefix", [""])[0]
            names = sorted(n for n in bucket.objects if n.startswith(prefix))
            start = int(query.get("pageToken", ["0"])[0])
            page = names[start : start + PAGE_SIZE]
            items = [
                {
                    "name": n,
                    "size": str(len(bucket.objects[n])),
                    "md5Hash": base64.b64encode(hashlib.md5(bucket.objects[n]).digest()).decode(),
                    "generation": "1700000000000000",
                }
                for n in page
            ]
            body: dict[str, Any] = {"kind": "storage#objects", "items": items}
            if start + PAGE_SIZE < len(names):
                body["nextPageToken"] = str(start + PAGE_SIZE)
            self._send(200, json.dumps(body).encode())

        def _media(self, bucket: Bucket, name: str) -> None:
            data = bucket.objects.get(name)
            if data is None:
                self._error(404, f"No such object: {name}")
                return
            gcs.downloads[name] += 1
            rng = self.headers.get("Range")
            if rng:
                gcs.ranges.append(rng)
            self._send_bytes(data)

    return Handler


@contextmanager
def gcs_server() -> Iterator[Gcs]:
    gcs = Gcs()
    with serving(_handler(gcs)) as server:
        gcs.url = f"http://127.0.0.1:{server.server_address[1]}"
        yield gcs
