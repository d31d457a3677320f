"""Console sessions: an API key exchanged for an opaque session id, kept in the database.

The browser holds only the session id (an HttpOnly, SameSite=Strict cookie). The
database holds the id's SHA-256 (a copied database opens no session), the API key
sealed with the secrets key (the console calls the API and the gateway with it, so the
API alone decides what a session may do), a CSRF token and the expiry. A session ends
at its expiry or when signed out; expired rows are removed as new sessions are made.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, select

from kingpost.errors import SecretError
from kingpost.secrets_box import SecretBox
from kingpost.store.db import Database
from kingpost.store.models import ConsoleSession

__all__ = ["ConsoleSessions", "SessionInfo", "csrf_matches"]


@dataclass(frozen=True)
class SessionInfo:
    """A live session as a request sees it."""

    api_key: str
    key_prefix: str
    csrf_token: str
    expires_at: datetime


def _hash(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


def csrf_matches(expected: str, given: str | None) -> bool:
    """Constant-time comparison; a missing or empty token never matches."""
    return bool(given) and hmac.compare_digest(expected.encode(), (given or "").encode())


class ConsoleSessions:
    """Create, look up and end sessions; ``now`` is injected so tests move time."""

    def __init__(
        self,
        db: Database,
        box: SecretBox,
        ttl_s: float,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._db = db
        self._box = box
        self._ttl = timedelta(seconds=ttl_s)
        self._now = now

    def create(self, api_key: str, key_prefix: str) -> tuple[str, SessionInfo]:
        """A new session for a key the API has accepted: (session id, its info)."""
        session_id = secrets.token_urlsafe(32)
        now = self._now()
        info = SessionInfo(api_key, key_prefix, secrets.token_urlsafe(32), now + self._ttl)
        with self._db.session() as s:
            s.execute(delete(ConsoleSession).where(ConsoleSession.expires_at <= now))
            s.add(
                ConsoleSession(
                    id_hash=_hash(session_id),
                    key_ciphertext=self._box.seal(api_key),
                    key_prefix=key_prefix,
                    csrf_token=info.csrf_token,
                    created_at=now,
                    expires_at=info.expires_at,
                )
            )
        return session_id, info

    def get(self, session_id: str | None) -> SessionInfo | None:
        """The session, or None: unknown, ended, expired, or sealed with another key."""
        if not session_id:
            return None
        with self._db.session() as s:
            found = select(ConsoleSession).where(ConsoleSession.id_hash == _hash(session_id))
            row = s.scalar(found)
            if row is None:
                return None
            if row.expires_at <= self._now():
                s.delete(row)
                return None
            try:
                key = self._box.open("console session", row.key_ciphertext)
            except SecretError:  # the secrets key was replaced: sign in again
                s.delete(row)
                return None
            return SessionInfo(key, row.key_prefix, row.csrf_token, row.expires_at)

    def end(self, session_id: str | None) -> None:
        """Sign out: the row is gone, so the id opens nothing from now on."""
        if not session_id:
            return
        with self._db.session() as s:
            s.execute(delete(ConsoleSession).where(ConsoleSession.id_hash == _hash(session_id)))
