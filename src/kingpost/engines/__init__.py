"""Engines: what starts replicas. Selected by name; heavy SDKs import lazily."""

from __future__ import annotations

from kingpost.engines.base import (
    BuildLog,
    Endpoint,
    Engine,
    LogLine,
    Prepared,
    Probes,
    Reload,
    ReplicaPhase,
    ReplicaSpec,
    ReplicaStatus,
    ServerKind,
    WeightMount,
)
from kingpost.engines.registry import (
    EngineKind,
    create_engine,
    engine_config_warnings,
    engine_kind,
    engine_names,
    register,
)

__all__ = [
    "BuildLog",
    "Endpoint",
    "Engine",
    "EngineKind",
    "LogLine",
    "Prepared",
    "Probes",
    "Reload",
    "ReplicaPhase",
    "ReplicaSpec",
    "ReplicaStatus",
    "ServerKind",
    "WeightMount",
    "create_engine",
    "engine_config_warnings",
    "engine_kind",
    "engine_names",
    "register",
]
