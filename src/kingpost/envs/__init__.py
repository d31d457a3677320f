"""Per-deployment Python environments for model-class and custom-server projects.

``ensure_environment(config, app_dir, envs_dir, log)`` builds (or reuses) a
virtualenv holding the project's requirements plus the model server's own
small dependency set, keyed by a hash of every input, and returns its
interpreter; ``ensure_custom_server_environment`` does the same for a custom
server's requirements alone. See :mod:`kingpost.envs.builder` for how the
server is isolated from user packages.
"""

from kingpost.envs.builder import (
    SERVER_REQUIREMENTS,
    EnvironmentResult,
    ModelEnvMode,
    ModelEnvPolicy,
    ensure_custom_server_environment,
    ensure_environment,
    environment_hash,
)

__all__ = [
    "SERVER_REQUIREMENTS",
    "EnvironmentResult",
    "ModelEnvMode",
    "ModelEnvPolicy",
    "ensure_custom_server_environment",
    "ensure_environment",
    "environment_hash",
]
