"""The one error hierarchy of Kingpost.

Every error the platform raises on purpose is a :class:`KingpostError`. Each
subclass carries the HTTP status the API answers with, the exit code the CLI
ends with and a stable machine-readable ``code``. Third-party exceptions
(docker, httpx, SQLAlchemy, boto3) are translated at the boundary with
``raise ... from exc`` and never leak past it.

Messages name the thing at fault (file, field, deployment), the rule that was
broken, the value found, and the next step where there is one.
"""

from __future__ import annotations

import errno
from typing import Any, ClassVar

__all__ = [
    "AuthError",
    "BuildError",
    "ConfigError",
    "ConflictError",
    "EngineError",
    "ForbiddenError",
    "InsufficientStorageError",
    "KingpostError",
    "NotFoundError",
    "OverloadedError",
    "PayloadTooLargeError",
    "SecretError",
    "ValidationError",
    "WeightsError",
    "error_from_payload",
    "is_disk_full",
]


class KingpostError(Exception):
    """Root of every error Kingpost raises deliberately."""

    code: ClassVar[str] = "internal_error"
    http_status: ClassVar[int] = 500
    exit_code: ClassVar[int] = 1

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        """The JSON body the API and gateway answer with."""
        return {"error": self.message, "code": self.code, **self.details}

    def __str__(self) -> str:
        return self.message


class ValidationError(KingpostError):
    """A request that breaks a rule: bad JSON, a bad name, a bad flag."""

    code = "invalid_request"
    http_status = 400
    exit_code = 2


class ConfigError(KingpostError):
    """A Truss ``config.yaml`` that cannot be deployed as written."""

    code = "invalid_config"
    http_status = 422
    exit_code = 2


class AuthError(KingpostError):
    """A missing or unknown API key."""

    code = "unauthorized"
    http_status = 401
    exit_code = 5


class ForbiddenError(KingpostError):
    """A valid API key used outside its scope (an invoke-only key on the management API
    or on a model it does not name)."""

    code = "forbidden"
    http_status = 403
    exit_code = 5


class NotFoundError(KingpostError):
    """A model, deployment, environment or secret that does not exist."""

    code = "not_found"
    http_status = 404
    exit_code = 3


class ConflictError(KingpostError):
    """The request contradicts current state (a duplicate name, a busy port)."""

    code = "conflict"
    http_status = 409
    exit_code = 4


class PayloadTooLargeError(KingpostError):
    """A request body past the limit of what the API reads."""

    code = "payload_too_large"
    http_status = 413
    exit_code = 2


class InsufficientStorageError(KingpostError):
    """A disk the platform writes to (projects, the database) is full."""

    code = "insufficient_storage"
    http_status = 507
    exit_code = 7


class OverloadedError(KingpostError):
    """A queue is full; the caller should retry later."""

    code = "overloaded"
    http_status = 429
    exit_code = 6


class SecretError(KingpostError):
    """A secret that is needed but not defined, or cannot be decrypted."""

    code = "secret_error"
    http_status = 422
    exit_code = 2


class EngineError(KingpostError):
    """An engine (process, docker) could not start, poll or stop a replica."""

    code = "engine_error"
    http_status = 500
    exit_code = 7


class BuildError(EngineError):
    """Building a replica's environment or image failed."""

    code = "build_failed"


class WeightsError(KingpostError):
    """Resolving, mirroring or mounting weights failed."""

    code = "weights_error"
    http_status = 422
    exit_code = 8


_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it was raised from) says a disk or quota is full."""
    seen: BaseException | None = exc
    for _ in range(8):  # the chain of causes, and a database driver's own error
        if seen is None:
            return False
        if isinstance(seen, OSError) and seen.errno in _NO_SPACE:
            return True
        text = str(seen)
        # SQLite (SQLITE_FULL) and PostgreSQL (SQLSTATE 53100 disk_full) say it in words.
        if "database or disk is full" in text or "No space left on device" in text:
            return True
        if "53100" in (getattr(seen, "sqlstate", None), getattr(seen, "pgcode", None)):
            return True
        seen = seen.__cause__ or getattr(seen, "orig", None)
    return False


_BY_CODE: dict[str, type[KingpostError]] = {}


def _register(cls: type[KingpostError]) -> None:
    _BY_CODE[cls.code] = cls
    for sub in cls.__subclasses__():
        _register(sub)


_register(KingpostError)


def error_from_payload(status: int, payload: dict[str, Any]) -> KingpostError:
    """Rebuild the error an API answered with, for the client and the CLI."""
    code = str(payload.get("code", ""))
    cls = _BY_CODE.get(code)
    if cls is None:
        cls = {
            400: ValidationError,
            401: AuthError,
            403: ForbiddenError,
            404: NotFoundError,
            409: ConflictError,
            413: PayloadTooLargeError,
            422: ConfigError,
            429: OverloadedError,
            507: InsufficientStorageError,
        }.get(status, KingpostError)
    message = str(payload.get("error") or payload.get("detail") or f"HTTP {status}")
    details = {k: v for k, v in payload.items() if k not in ("error", "code")}
    return cls(message, **details)
