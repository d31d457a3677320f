"""The async queue's SQLite hot path writes and reads timestamps with its own codec: the
text must be the one SQLAlchemy's ``UTCDateTime`` writes (the queue's order compares it
as text) and read back to the same value."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy.dialects import sqlite

from kingpost.store.asyncq import sqlite_when_in, sqlite_when_out
from kingpost.store.models import UTCDateTime

_DIALECT = sqlite.dialect()
_IMPL = UTCDateTime().dialect_impl(_DIALECT)  # as the Core statements run it
_BIND = _IMPL.bind_processor(_DIALECT)
_RESULT = _IMPL.result_processor(_DIALECT, None)

VALUES = [
    datetime(2026, 12, 5, 16, 1, 23, 62000, tzinfo=UTC),
    datetime(2026, 12, 5, 16, 1, 23, tzinfo=UTC),  # no microseconds: still six digits
    datetime(2026, 12, 5, 18, 1, 23, 1, tzinfo=timezone(timedelta(hours=2))),  # to UTC
    datetime(2026, 1, 1, 0, 0, 0, 999999),  # naive: kept as it is
    datetime(1, 1, 1, tzinfo=UTC),
    datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
]


@pytest.mark.parametrize("value", VALUES, ids=str)
def test_the_text_is_sqlalchemys_and_reads_back_the_same(value: datetime) -> None:
    assert _BIND is not None and _RESULT is not None
    text = sqlite_when_in(value)
    assert text == _BIND(value)
    back = sqlite_when_out(text)
    assert back == _RESULT(text)
    assert back.tzinfo is UTC
    if value.tzinfo is not None:
        assert back == value


def test_texts_sort_as_their_instants() -> None:
    later = [
        datetime(2026, 12, 5, 16, 0, 0, 0, tzinfo=UTC) + timedelta(microseconds=n)
        for n in (0, 1, 10**6)
    ]
    texts = [sqlite_when_in(v) for v in later]
    assert texts == sorted(texts) and len(set(texts)) == 3
