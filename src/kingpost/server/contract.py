"""Names the platform and the model server agree on; imported by both sides."""

from __future__ import annotations

__all__ = [
    "DYNAMIC_CONFIG_ENV",
    "DYNAMIC_CONFIG_MOUNT",
    "ENVIRONMENT_ENV",
    "ENVIRONMENT_KEY",
    "ENVIRONMENT_POLL_ENV",
    "RELOAD_PATH",
    "RELOAD_TOKEN_ENV",
    "RELOAD_TOKEN_HEADER",
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

RELOAD_TOKEN_ENV = "KINGPOST_RELOAD_TOKEN"
"""A secret the engine gives each model-class replica of a development deployment: only a
request to :data:`RELOAD_PATH` carrying it in :data:`RELOAD_TOKEN_HEADER` reloads the model.
Unset (every other replica): the path answers 404."""

RELOAD_PATH = "/_kingpost/reload"
"""``POST``: re-import the project's modules and ``load()`` a new instance in place. The
gateway never forwards a path under ``/_kingpost/``."""

RELOAD_TOKEN_HEADER = "x-kingpost-reload-token"
