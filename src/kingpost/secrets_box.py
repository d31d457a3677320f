"""Encryption of secret values at rest.

The key lives outside the database: ``KINGPOST_SECRET_KEY`` or a 0600 file
``{home}/secret.key`` created on first use. Values are Fernet tokens
(AES-128-CBC + HMAC-SHA256), so a copied database alone reveals nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from kingpost.errors import SecretError

__all__ = ["SecretBox", "load_or_create_key"]


def load_or_create_key(home: Path, env_key: str | None) -> bytes:
    if env_key:
        return env_key.encode()
    path = home / "secret.key"
    if path.exists():
        return path.read_bytes().strip()
    home.mkdir(parents=True, exist_ok=True)
    key = Fernet.generate_key()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key + b"\n")
    return key


class SecretBox:
    def __init__(self, key: bytes) -> None:
        try:
            self._fernet = Fernet(key)
        except ValueError as exc:
            raise SecretError(
                "secret key: not a valid Fernet key (32 url-safe base64 bytes); "
                "fix KINGPOST_SECRET_KEY or the secret.key file"
            ) from exc

    def seal(self, value: str) -> bytes:
        return self._fernet.encrypt(value.encode())

    def open(self, name: str, token: bytes) -> str:
        try:
            return self._fernet.decrypt(token).decode()
        except InvalidToken as exc:
            raise SecretError(
                f"secret {name!r}: cannot be decrypted with the current key; "
                "was the secret key replaced? set the secret again with "
                f"`kingpost secrets set {name}`",
                secret=name,
            ) from exc
