"""Which ``environment_variables`` reach a replica, and which the platform owns."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kingpost.config.models import TrussConfig

__all__ = ["RESERVED_ENV_HINT", "is_reserved_env", "runtime_environment"]

_RESERVED_NAMES = frozenset({"PORT", "HOST", "HOSTNAME"})
_RESERVED_SUFFIXES = ("_SERVICE_HOST", "_SERVICE_PORT", "PATH")

RESERVED_ENV_HINT = (
    "PORT, HOST, HOSTNAME, names ending in _SERVICE_HOST or _SERVICE_PORT, and names "
    "ending in PATH (PATH, PYTHONPATH, LD_LIBRARY_PATH, MODEL_PATH...) are reserved by the "
    "platform and dropped at run time; rename the variable (e.g. MODEL_DIR instead of "
    "MODEL_PATH) or set it inside your start_command"
)
"""One sentence naming the reserved environment variable names and the fix."""


def is_reserved_env(name: str) -> bool:
    """True for names the platform sets itself and drops from ``environment_variables``."""
    return name in _RESERVED_NAMES or name.endswith(_RESERVED_SUFFIXES)


def runtime_environment(config: TrussConfig) -> tuple[dict[str, str], list[str]]:
    """(variables to inject, names dropped because they are reserved)."""
    env: dict[str, str] = {}
    dropped: list[str] = []
    for name, value in config.environment_variables.items():
        if is_reserved_env(name):
            dropped.append(name)
        else:
            env[name] = value
    return env, dropped
