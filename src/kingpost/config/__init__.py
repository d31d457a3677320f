"""Truss ``config.yaml``: the schema, loading, validation with line numbers.

``load_config(project_dir)`` / ``parse_config(text)`` return a
:class:`LoadedConfig`; every problem of a file is raised together as one
:class:`kingpost.errors.ConfigError` whose ``details["errors"]`` lists
``{"path", "line", "message", "value"}``.
"""

from kingpost.config.environment import RESERVED_ENV_HINT, is_reserved_env, runtime_environment
from kingpost.config.loader import CONFIG_FILENAME, LoadedConfig, load_config, parse_config
from kingpost.config.models import (
    PYTHON_VERSIONS,
    BaseImage,
    Build,
    DockerAuth,
    DockerAuthMethod,
    DockerServer,
    ModelServer,
    TrussConfig,
)
from kingpost.config.resources import (
    KNOWN_ACCELERATORS,
    Accelerator,
    EgressRestrictions,
    HealthChecks,
    Oidc,
    RemoteSsh,
    Resources,
    Runtime,
    Transport,
    TransportKind,
)
from kingpost.config.rules import NO_BUILD_IGNORED
from kingpost.config.sources import (
    WEIGHTS_SCHEMES,
    CacheInternalEntry,
    ExternalDataItem,
    ModelCacheEntry,
    ModelCacheKind,
    WeightsAuth,
    WeightsAuthMethod,
    WeightsSource,
    source_scheme,
)

__all__ = [
    "CONFIG_FILENAME",
    "KNOWN_ACCELERATORS",
    "NO_BUILD_IGNORED",
    "PYTHON_VERSIONS",
    "RESERVED_ENV_HINT",
    "WEIGHTS_SCHEMES",
    "Accelerator",
    "BaseImage",
    "Build",
    "CacheInternalEntry",
    "DockerAuth",
    "DockerAuthMethod",
    "DockerServer",
    "EgressRestrictions",
    "ExternalDataItem",
    "HealthChecks",
    "LoadedConfig",
    "ModelCacheEntry",
    "ModelCacheKind",
    "ModelServer",
    "Oidc",
    "RemoteSsh",
    "Resources",
    "Runtime",
    "Transport",
    "TransportKind",
    "TrussConfig",
    "WeightsAuth",
    "WeightsAuthMethod",
    "WeightsSource",
    "is_reserved_env",
    "load_config",
    "parse_config",
    "runtime_environment",
    "source_scheme",
]
