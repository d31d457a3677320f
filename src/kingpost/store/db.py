"""Database engine, migrations and session scope."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from kingpost.errors import InsufficientStorageError, is_disk_full

__all__ = ["Database"]

_MIGRATIONS = Path(__file__).parent / "migrations"


@contextmanager
def full_disk_is_507() -> Iterator[None]:
    """A database write that fails for want of disk space raises an
    :class:`InsufficientStorageError` (507), not a bare database error (a plain-text 500):
    SQLAlchemy's, or the SQLite driver's own where a caller uses its cursor."""
    try:
        yield
    except (OperationalError, sqlite3.OperationalError) as exc:
        if is_disk_full(exc):
            raise InsufficientStorageError(
                "the database could not write: its disk is full; free space on the disk "
                "of KINGPOST_HOME (or the database server's), e.g. with `kingpost "
                "weights gc` and `kingpost venvs gc`, then retry",
                cause="database disk full",
            ) from exc
        raise


def _alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # pysqlite opens a transaction only before a write, so the reads of a read-modify-write
    # (a model's next deployment number) saw no lock and two writers raced: SQLAlchemy's
    # recipe, we emit BEGIN ourselves (``_sqlite_begin``).
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=5000")
    cur.close()


def _sqlite_begin(conn: Any) -> None:
    """Every transaction takes SQLite's write lock at once (others wait, busy_timeout), so
    what it read is still true when it writes; they are all short."""
    conn.exec_driver_sql("BEGIN IMMEDIATE")


class Database:
    """One SQLAlchemy engine plus a session factory."""

    def __init__(self, url: str) -> None:
        self.url = url
        kwargs: dict[str, Any] = {}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"check_same_thread": False}
            path = url.split("///", 1)[-1]
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.engine: Engine = create_engine(url, **kwargs)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
            event.listen(self.engine, "begin", _sqlite_begin)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def migrate(self) -> None:
        """Bring the schema to the newest revision (idempotent)."""
        cfg = _alembic_config(self.url)
        with self.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    def current_revision(self) -> str | None:
        with self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    @staticmethod
    def head_revision() -> str | None:
        return ScriptDirectory.from_config(_alembic_config("sqlite://")).get_current_head()

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A transaction: committed on success, rolled back on error. A write that fails
        for want of disk space is an :class:`InsufficientStorageError` (507), not a bare
        database error (a plain-text 500)."""
        with full_disk_is_507(), self._sessions() as session, session.begin():
            yield session

    def close(self) -> None:
        self.engine.dispose()
