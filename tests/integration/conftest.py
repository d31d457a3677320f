from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.platform import Platform


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    p = Platform(tmp_path_factory.mktemp("kingpost-home")).start()
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture
def fresh_platform(tmp_path: Path) -> Iterator[Platform]:
    p = Platform(tmp_path / "home").start()
    try:
        yield p
    finally:
        p.stop()
