"""What one stored log line holds, how a query selects lines, and how raw output is read.

A record is one JSON object per line in a segment file (``segments.py``):

- ``ts``: seconds since the epoch (float); ``level``: ``DEBUG`` ... ``CRITICAL``;
- ``source``: ``gateway`` (one access line per answer), ``replica`` (its output) or
  ``build`` (a deployment's build output);
- ``model_id``, ``deployment_id``, ``replica``, ``request_id`` where known, and
  ``message``;
- access lines add ``method``, ``route``, ``status``, ``outcome``, ``duration_ms``,
  ``bytes_in`` and ``bytes_out``.

:class:`LogQuery` is the one filter the API, the CLI and the tests use; its fields
combine (all must hold).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kingpost.errors import ValidationError

__all__ = [
    "LEVELS",
    "LogQuery",
    "Position",
    "level_number",
    "parse_level",
    "parse_time",
    "replica_record",
]

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_LEVEL_NUMBER = {name: i for i, name in enumerate(LEVELS)}
_ALIASES = {"WARN": "WARNING", "FATAL": "CRITICAL", "ERR": "ERROR"}
_LEVEL_WORD = re.compile(r"\b(DEBUG|INFO|WARN(?:ING)?|ERROR|CRITICAL|FATAL)\b")
_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)\s*(s|m|h|d)")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_LIMIT = 10_000

Position = tuple[float, int, str, int]
"""Where a line stands in the order queries return lines: its time, then its segment's
start and writer, then its line number there. Stable while the line is kept (a segment's
name holds its start and writer), so a cursor's position pages on across prunes."""


def level_number(level: str) -> int:
    return _LEVEL_NUMBER.get(level, 1)


def parse_level(value: str, field: str = "level") -> str:
    """A level name as stored (case-insensitive, ``warn`` and ``fatal`` accepted)."""
    name = value.strip().upper()
    name = _ALIASES.get(name, name)
    if name not in _LEVEL_NUMBER:
        raise ValidationError(
            f"{field}: must be one of {', '.join(n.lower() for n in LEVELS)}; got {value!r}",
            field=field,
            value=value,
        )
    return name


def parse_time(value: str, field: str, now: float | None = None) -> float:
    """``10m``/``2h``/``30s``/``1d`` ago, an ISO 8601 time (UTC unless it says), or
    seconds since the epoch; as seconds since the epoch."""
    text = value.strip()
    if m := _RELATIVE.fullmatch(text):
        return (time.time() if now is None else now) - float(m[1]) * _UNIT_S[m[2]]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValidationError(
            f"{field}: must be a duration ago like 10m, 2h, 30s or 1d, an ISO 8601 time "
            f"like 2026-12-05T01:00:00Z, or epoch seconds; got {value!r}",
            field=field,
            value=value,
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


@dataclass(frozen=True)
class LogQuery:
    """Which lines to return; every field set must hold. ``limit``: the newest that many."""

    model_id: str | None = None
    deployment_ids: frozenset[str] | None = None
    """None: any deployment; empty: none (an environment that points nowhere)."""
    replica: str | None = None
    since: float | None = None
    until: float | None = None
    level: str | None = None
    """The least level shown (``WARNING`` shows warnings, errors and critical lines)."""
    search: str | None = None
    """Case-insensitive text the message (or, for access lines, the route) contains."""
    request_id: str | None = None
    """Lines of this request: those that carry its id, and replica lines naming it."""
    source: str | None = None
    limit: int = 1000
    oldest_first: bool = False
    """Take the oldest ``limit`` lines rather than the newest (either way returned oldest
    first): with ``after``, the next page of lines in order."""
    after: Position | None = None
    """Only lines past this one in the order lines are returned (``segments.position``
    reads it from a cursor)."""

    def __post_init__(self) -> None:
        if not 1 <= self.limit <= MAX_LIMIT:
            raise ValidationError(
                f"limit: must be between 1 and {MAX_LIMIT}; got {self.limit}",
                field="limit",
                value=self.limit,
            )
        if self.since is not None and self.until is not None and self.since > self.until:
            raise ValidationError(
                f"since: must not be after until; got since {self.since} > until {self.until}",
                field="since",
                value=self.since,
            )

    def prefilter(self, raw: bytes) -> bool:
        """A cheap test on the raw line before it is parsed (false: it cannot match)."""
        if self.request_id is not None and self.request_id.encode() not in raw:
            return False
        return self.replica is None or self.replica.encode() in raw

    def matches(self, rec: dict[str, Any]) -> bool:
        ts = rec.get("ts", 0.0)
        if self.since is not None and ts < self.since:
            return False
        if self.until is not None and ts > self.until:
            return False
        if self.model_id is not None and rec.get("model_id") != self.model_id:
            return False
        if self.deployment_ids is not None and rec.get("deployment_id") not in self.deployment_ids:
            return False
        if self.replica is not None and rec.get("replica") != self.replica:
            return False
        if self.source is not None and rec.get("source") != self.source:
            return False
        if self.level is not None and level_number(rec.get("level", "INFO")) < level_number(
            self.level
        ):
            return False
        message = str(rec.get("message", ""))
        # A custom server logs the header's value in its own words.
        if (
            self.request_id is not None
            and rec.get("request_id") != self.request_id
            and (rec.get("source") != "replica" or not _names(message, self.request_id))
        ):
            return False
        if self.search is not None:
            text = message + " " + str(rec.get("route", ""))
            if self.search.lower() not in text.lower():
                return False
        return True


_ID_CHAR = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-")


def _names(text: str, rid: str) -> bool:
    """``text`` holds ``rid`` as a whole token (not inside a longer id)."""
    start = text.find(rid)
    while start >= 0:
        end = start + len(rid)
        before = text[start - 1] if start else " "
        after = text[end] if end < len(text) else " "
        if before not in _ID_CHAR and (after not in _ID_CHAR or after in ".:"):
            return True  # (an id at the end of a sentence, or before a colon, counts)
        start = text.find(rid, start + 1)
    return False


def _guess_level(text: str) -> str:
    if text.startswith("Traceback (most recent call last)"):
        return "ERROR"
    m = _LEVEL_WORD.search(text, 0, 80)
    if m is None:
        return "INFO"
    word = m[1]
    return _ALIASES.get(word, word)


def _json_time(value: object) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def replica_record(
    text: str, source: str, now: float, replica: str | None, deployment_id: str | None
) -> dict[str, Any]:
    """A stored record for one line of replica or build output, read at ``now``.

    The model server's JSON lines keep their time, level, request id and traceback;
    any other line gets the time it was read and a level guessed from a level word near
    its start (INFO when none)."""
    rec: dict[str, Any] = {
        "ts": now,
        "level": "INFO",
        "source": source,
        "deployment_id": deployment_id,
        "replica": replica,
        "message": text,
    }
    if text.startswith("{") and text.endswith("}"):
        try:
            obj = json.loads(text)
        except ValueError:
            obj = None
        if isinstance(obj, dict) and "message" in obj:
            level = str(obj.get("level", "INFO")).upper()
            rec["level"] = (
                _ALIASES.get(level, level)
                if level in _LEVEL_NUMBER or level in (_ALIASES)
                else "INFO"
            )
            rec["ts"] = _json_time(obj.get("ts")) or now
            message = str(obj["message"])
            if isinstance(obj.get("traceback"), str):
                message += "\n" + obj["traceback"]
            rec["message"] = message
            if isinstance(obj.get("request_id"), str):
                rec["request_id"] = obj["request_id"]
            return rec
    rec["level"] = _guess_level(text)
    return rec
