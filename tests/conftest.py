"""Fixtures shared by the gateway's test files in more than one folder."""

from __future__ import annotations

from collections.abc import Iterator

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
