"""Fixtures shared by the gateway's test files in more than one folder."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.gateway import RunningGateway
from helpers.upstream import Upstream, upstream


@pytest.fixture
def gw() -> Iterator[RunningGateway]:
    """A gateway in-process on a free port, with no table yet."""
    running = RunningGateway()
    try:
        yield running
    finally:
        running.close()


@pytest.fixture
def up() -> Iterator[Upstream]:
    """A real upstream HTTP server (``helpers.upstream``)."""
    with upstream() as u:
        yield u


@pytest.fixture
def public_tmp() -> Iterator[Path]:
    """A directory any user of the machine may read (0755, in ``/tmp``), for local weights
    sources: the mirror copies only what any user may read, and pytest's ``tmp_path`` lies
    under a 0700 directory."""
    path = Path(tempfile.mkdtemp(prefix="kp-public-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
