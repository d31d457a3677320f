"""Names the platform and the model server agree on; imported by both sides."""

from __future__ import annotations

__all__ = [
    "DYNAMIC_CONFIG_ENV",
    "DYNAMIC_CONFIG_MOUNT",
    "ENVIRONMENT_ENV",
    "ENVIRONMENT_KEY",
    "ENVIRONMENT_POLL_ENV",
    "SERVER_ARGS",
]

ENVIRONMENT_ENV = "KINGPOST_ENVIRONMENT"
"""JSON (``{"name": "production"}``) of the environment the deployment was promoted to
when the replica started; unset for a deployment in no environment."""

DYNAMIC_CONFIG_ENV = "KINGPOST_DYNAMIC_CONFIG_DIR"
"""A directory the control plane keeps current while the replica runs (read-only to it).
Its file :data:`ENVIRONMENT_KEY` holds the same JSON as :data:`ENVIRONMENT_ENV`, or nothing
once the deployment is in no environment; it is replaced whole (rename), never edited."""

DYNAMIC_CONFIG_MOUNT = "/etc/b10_dynamic_config"
"""Where a container sees that directory: the path Truss's own server reads."""

ENVIRONMENT_KEY = "environment"

ENVIRONMENT_POLL_ENV = "KINGPOST_ENVIRONMENT_POLL_S"
"""How often the model server looks at the environment file (seconds, default 5)."""

SERVER_ARGS = ("-P", "-m", "kingpost.server")
"""The interpreter arguments that start the model server. ``-P``: the working directory
(the project) is not put first on ``sys.path``, where a project file named ``yaml.py`` or
``secrets.py`` would replace what the server and the standard library import."""
