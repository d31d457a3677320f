"""``gs://bucket/prefix``: Google Cloud Storage through its JSON API.

Auth is a service-account key (the JSON file Google issues) stored as a Kingpost
secret: a JWT signed with its private key (RS256) is exchanged at its ``token_uri``
for an OAuth access token, refreshed before it expires. ``STORAGE_EMULATOR_HOST``
points the API elsewhere, as it does for Google's own client libraries.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
import time
import urllib.parse
from collections.abc import Mapping
from typing import IO, Any

from kingpost.errors import WeightsError
from kingpost.weights.access import guarded_client
from kingpost.weights.sources import (
    RemoteFile,
    Source,
    WeightsEntry,
    range_header,
    secret_value,
)

__all__ = ["GcsSource", "ServiceAccount", "gcs_source"]

SCOPE = "https://www.googleapis.com/auth/devstorage.read_only"
DEFAULT_ENDPOINT = "https://storage.googleapis.com"
DEFAULT_TOKEN_URI = "https://oauth2.googleapis.com/token"
_REQUIRED = ("client_email", "private_key")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class ServiceAccount:
    """Access tokens for one service-account key, cached (per key, across sources in this
    process) until a minute before they expire."""

    _cache: dict[str, tuple[str, float]] = {}
    _cache_lock = threading.Lock()

    def __init__(self, info: Mapping[str, Any], http: Any, label: str) -> None:
        from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        self.email = str(info["client_email"])
        self.key_id = str(info.get("private_key_id", ""))
        self.token_uri = str(info.get("token_uri") or DEFAULT_TOKEN_URI)
        self._label = label
        try:
            key = load_pem_private_key(str(info["private_key"]).encode(), password=None)
        except (ValueError, TypeError):
            raise WeightsError(f"{label}: private_key is not a PEM-encoded key") from None
        if not isinstance(key, RSAPrivateKey):
            raise WeightsError(f"{label}: private_key must be an RSA key")
        self._key = key
        self._http = http
        self._cache_key = hashlib.sha256(
            json.dumps([self.email, self.token_uri, str(info["private_key"])]).encode()
        ).hexdigest()

    def assertion(self, now: float) -> str:
        """The signed JWT that asks for a read-only storage token."""
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        header = {"alg": "RS256", "typ": "JWT"} | ({"kid": self.key_id} if self.key_id else {})
        claims = {
            "iss": self.email,
            "scope": SCOPE,
            "aud": self.token_uri,
            "iat": int(now),
            "exp": int(now) + 3600,
        }
        signing_input = ".".join(
            _b64url(json.dumps(part, separators=(",", ":")).encode()) for part in (header, claims)
        )
        signature = self._key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64url(signature)}"

    def token(self) -> str:
        with self._cache_lock:
            now = time.time()
            token, expires = self._cache.get(self._cache_key, ("", 0.0))
            if token and now < expires - 60:
                return token
            r = self._http.post(
                self.token_uri,
                data={
                    "grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
                    "assertion": self.assertion(now),
                },
            )
            if r.status_code != 200:
                detail = _error_text(r)
                raise WeightsError(
                    f"{self._label}: the token endpoint refused the service account "
                    f"{self.email}: HTTP {r.status_code}{detail}"
                )
            body = r.json()
            token = str(body["access_token"])
            self._cache[self._cache_key] = (token, now + float(body.get("expires_in", 3600)))
            return token


def _error_text(r: Any) -> str:
    try:
        body = r.json()
    except ValueError:
        return ""
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        err = err.get("message")
    desc = body.get("error_description") if isinstance(body, dict) else None
    text = " ".join(str(x) for x in (err, desc) if x)
    return f" ({text[:200]})" if text else ""


class GcsSource(Source):
    def __init__(self, bucket: str, prefix: str, account: ServiceAccount, http: Any, label: str):
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.account, self._http, self.label = account, http, label
        self.endpoint = os.environ.get("STORAGE_EMULATOR_HOST", DEFAULT_ENDPOINT).rstrip("/")
        if "://" not in self.endpoint:
            self.endpoint = f"http://{self.endpoint}"

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.account.token()}"}

    def _check(self, r: Any, what: str) -> None:
        if r.status_code in (401, 403):
            raise WeightsError(
                f"{self.label}: {what}: HTTP {r.status_code}: the service account "
                f"{self.account.email} may not read gs://{self.bucket}{_error_text(r)}"
            )
        if r.status_code == 404:
            raise WeightsError(f"{self.label}: {what}: not found{_error_text(r)}")
        if r.status_code >= 400:
            raise WeightsError(f"{self.label}: {what}: HTTP {r.status_code}{_error_text(r)}")

    def files(self) -> list[RemoteFile]:
        prefix = f"{self.prefix}/" if self.prefix else ""
        url = f"{self.endpoint}/storage/v1/b/{urllib.parse.quote(self.bucket, safe='')}/o"
        params = {"prefix": prefix, "fields": "items(name,size,md5Hash,generation),nextPageToken"}
        out = []
        while True:
            r = self._http.get(url, params=params, headers=self._headers())
            self._check(r, "cannot list")
            page = r.json()
            for item in page.get("items", []):
                rel = str(item["name"])[len(prefix) :]
                if not rel or rel.endswith("/"):
                    continue
                md5 = item.get("md5Hash")  # absent for composite objects
                md5_hex = base64.b64decode(md5).hex() if md5 else None
                etag = f"{item.get('generation', '')}:{md5_hex or item['size']}"
                out.append(RemoteFile(rel, int(item["size"]), etag, md5=md5_hex))
            token = page.get("nextPageToken")
            if not token:
                break
            params["pageToken"] = token
        return sorted(out, key=lambda f: f.path)

    def fetch(self, f: RemoteFile, out: IO[bytes], start: int = 0, end: int | None = None) -> None:
        name = f"{self.prefix}/{f.path}" if self.prefix else f.path
        url = (
            f"{self.endpoint}/storage/v1/b/{urllib.parse.quote(self.bucket, safe='')}"
            f"/o/{urllib.parse.quote(name, safe='')}"
        )
        headers = self._headers() | range_header(f, start, end)
        with self._http.stream("GET", url, params={"alt": "media"}, headers=headers) as r:
            if r.status_code >= 400:
                r.read()
                self._check(r, f"cannot download {f.path}")
            if "Range" in headers and r.status_code != 206:
                raise WeightsError(f"{self.label}: {f.path}: the server ignored Range")
            for chunk in r.iter_bytes(1024 * 1024):
                out.write(chunk)


def gcs_source(entry: WeightsEntry, secrets: Mapping[str, str]) -> Source:
    import httpx

    name = entry.secret_name
    if not name:
        raise WeightsError(
            f"{entry.source}: no credentials configured: need either OIDC config or secret_id; "
            "add `auth: {auth_method: CUSTOM_SECRET, auth_secret_name: <secret-name>}` whose "
            "secret holds a service-account JSON key"
        )
    try:
        info = json.loads(secret_value(entry, name, secrets))
    except ValueError:
        raise WeightsError(
            f"{entry.source}: secret {name!r} must hold a service-account JSON key"
        ) from None
    if not isinstance(info, dict) or any(k not in info for k in _REQUIRED):
        found = ", ".join(sorted(info)) if isinstance(info, dict) else "not an object"
        raise WeightsError(
            f"{entry.source}: secret {name!r} must be a service-account JSON key with "
            f"{' and '.join(_REQUIRED)} (keys found: {found or 'none'})"
        )
    if info.get("type", "service_account") != "service_account":
        raise WeightsError(
            f"{entry.source}: secret {name!r} has type {info['type']!r}; "
            "only service_account keys are supported"
        )
    label = f"{entry.source} (secret {name!r})"
    http = httpx.Client(timeout=60, follow_redirects=True)
    # The key's `token_uri` is the user's (the API endpoint is the operator's): public
    # addresses only, or the control plane would POST to what a replica cannot reach.
    token_http = guarded_client(timeout=60, follow_redirects=True)
    bucket, _, prefix = entry.source.split("://", 1)[1].partition("/")
    return GcsSource(bucket, prefix, ServiceAccount(info, token_http, label), http, label)
