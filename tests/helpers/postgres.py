"""The PostgreSQL server the tests use: KINGPOST_TEST_POSTGRES_URL names it (CI starts one;
under CI=true it is required, elsewhere tests skip without it).

The suite runs in several pytest processes (pytest-xdist), so no two test files may share a
database they reset: each process gets a database of its own, named after the URL's with the
process's worker id appended, created on first use.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import create_engine, make_url, text

from kingpost.store import Database
from kingpost.store.models import Base

POSTGRES_URL = os.environ.get("KINGPOST_TEST_POSTGRES_URL")


def server_url() -> str:
    """The configured URL; skips the test when none is set (fails it under CI=true)."""
    if not POSTGRES_URL:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but KINGPOST_TEST_POSTGRES_URL is not set")
        pytest.skip("set KINGPOST_TEST_POSTGRES_URL to test against PostgreSQL")
    return POSTGRES_URL


def _create(url: str, name: str, exist_ok: bool) -> str:
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            found = conn.execute(
                text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}
            ).first()
            if found is None or not exist_ok:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        admin.dispose()
    return make_url(url).set(database=name).render_as_string(hide_password=False)


def worker_url() -> str:
    """This pytest process's own database on the server (created once, kept between runs)."""
    url = server_url()
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not worker:
        return url
    return _create(url, f"{make_url(url).database}_{worker}", exist_ok=True)


def reset(db: Database) -> None:
    """Drop every Kingpost table, and Alembic's, so the next migrate starts from nothing."""
    with db.engine.begin() as conn:
        Base.metadata.drop_all(conn)
        conn.execute(text("DROP TABLE IF EXISTS alembic_version"))


@contextmanager
def worker_database() -> Iterator[Database]:
    """A reset database of this process's own, reset again after."""
    db = Database(worker_url())
    reset(db)
    try:
        yield db
    finally:
        reset(db)
        db.close()


@contextmanager
def fresh_database(prefix: str) -> Iterator[str]:
    """The URL of a new database with a random name, dropped (with its sessions) after."""
    url = server_url()
    name = f"{prefix}_{secrets.token_hex(4)}"
    yield_url = _create(url, name, exist_ok=False)
    try:
        yield yield_url
    finally:
        admin = create_engine(url, isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        finally:
            admin.dispose()
