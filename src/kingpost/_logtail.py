"""The last lines of a log file that only grows at its end (build and replica output)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["tail_lines"]


def tail_lines(path: Path, lines: int, window: int) -> list[str]:
    """The last ``lines`` lines of ``path``, reading at most its last ``window`` bytes
    (a line the window cuts is left out). Raises ``FileNotFoundError``."""
    with path.open("rb") as f:
        size = f.seek(0, os.SEEK_END)
        chunk = min(size, window)
        f.seek(size - chunk)
        data = f.read()
    if chunk < size:  # the first line read is likely cut
        data = data[data.find(b"\n") + 1 :]
    return data.decode("utf-8", errors="replace").splitlines()[-lines:]
