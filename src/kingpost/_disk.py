"""Sizes on disk, for the collectors that report what they removed."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

__all__ = ["tree_size"]


def tree_size(path: Path) -> int:
    """Bytes of the files under ``path`` (links not followed), or of ``path`` itself when it
    is a file or a link; files that vanish meanwhile count nothing."""
    if path.is_symlink() or not path.is_dir():
        with contextlib.suppress(OSError):
            return path.lstat().st_size
        return 0
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total
