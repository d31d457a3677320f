"""Subsystems that are not in every build (the docker engine, the weights mirror).

Looked up by name so that a build without them type-checks and fails with a clear
message instead of an ImportError.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["optional_attr"]


def optional_attr(module: str, name: str) -> Any | None:
    """``module.name``, or None when the module is not part of this build."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module.startswith(exc.name):
            return None
        raise
    return getattr(mod, name, None)
