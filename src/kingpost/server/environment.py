"""The environment a deployment serves, as the replica learns it.

At start the control plane passes it in ``KINGPOST_ENVIRONMENT``; while the replica runs
it keeps a file current in ``KINGPOST_DYNAMIC_CONFIG_DIR`` (see
:mod:`kingpost.server.contract`). Truss's server likewise reads its dynamic-config file
and calls ``setup_environment`` again when a promotion changes it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from kingpost.server.contract import (
    DYNAMIC_CONFIG_ENV,
    ENVIRONMENT_ENV,
    ENVIRONMENT_KEY,
    ENVIRONMENT_POLL_ENV,
)

__all__ = ["EnvironmentWatch", "poll_interval"]

log = logging.getLogger(__name__)
DEFAULT_POLL_S = 5.0


def poll_interval() -> float:
    """Seconds between looks at the file: ``KINGPOST_ENVIRONMENT_POLL_S``, default 5."""
    try:
        value = float(os.environ.get(ENVIRONMENT_POLL_ENV, DEFAULT_POLL_S))
    except ValueError:
        return DEFAULT_POLL_S
    return value if value > 0 else DEFAULT_POLL_S


def _parse(text: str | None, where: str) -> Any:
    if not text or not text.strip():
        return None
    try:
        return json.loads(text)
    except ValueError:
        log.warning("ignoring the environment in %s: not JSON: %r", where, text[:200])
        return None


class EnvironmentWatch:
    """Reads the environment file when it was replaced since the last look."""

    def __init__(self, directory: str | None = None) -> None:
        directory = directory if directory is not None else os.environ.get(DYNAMIC_CONFIG_ENV)
        self.path = Path(directory) / ENVIRONMENT_KEY if directory else None
        self._stamp: tuple[int, int, int] | None = None

    def initial(self) -> Any:
        """The environment to start with: the file's if it names one, else the variable's."""
        current = self.poll()
        if current is None:
            current = _parse(os.environ.get(ENVIRONMENT_ENV), ENVIRONMENT_ENV)
        return current

    def poll(self) -> Any:
        """The file's environment if the file changed since the last call, else None.

        An empty file (the deployment is in no environment) also gives None: as in Truss,
        a model is told of environments, never of leaving one.
        """
        if self.path is None:
            return None
        try:
            # The stamp comes from the open file, so it describes exactly the text read even
            # when the controller renames a new file into place meanwhile.
            with self.path.open(encoding="utf-8") as f:
                st = os.fstat(f.fileno())
                stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
                if stamp == self._stamp:
                    return None
                text = f.read()
        except (OSError, ValueError):
            return None
        self._stamp = stamp
        return _parse(text, str(self.path))
