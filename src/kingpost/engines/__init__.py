"""Engines: what starts replicas. Selected by name; heavy SDKs import lazily."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kingpost._optional import optional_attr
from kingpost.engines.base import (
    BuildLog,
    Endpoint,
    Engine,
    LogLine,
    Prepared,
    Probes,
    ReplicaPhase,
    ReplicaSpec,
    ReplicaStatus,
    ServerKind,
    WeightMount,
)
from kingpost.errors import EngineError, ValidationError

if TYPE_CHECKING:
    from kingpost.settings import Settings

__all__ = [
    "ENGINE_NAMES",
    "BuildLog",
    "Endpoint",
    "Engine",
    "LogLine",
    "Prepared",
    "Probes",
    "ReplicaPhase",
    "ReplicaSpec",
    "ReplicaStatus",
    "ServerKind",
    "WeightMount",
    "create_engine",
]

ENGINE_NAMES = ("process", "docker", "fake")


def create_engine(name: str, settings: Settings) -> Engine:
    """Build the engine registered under ``name``."""
    if name == "process":
        from kingpost.engines.process import ProcessEngine

        return ProcessEngine(settings)
    if name == "docker":
        docker_engine = optional_attr("kingpost.engines.docker", "DockerEngine")
        if docker_engine is None:
            raise EngineError(
                "engine: the docker engine is not part of this build yet; deploy with "
                "--engine process (the default)",
                field="engine",
                value=name,
            )
        engine: Engine = docker_engine(settings)
        return engine
    if name == "fake":
        from kingpost.engines.fake import FakeEngine

        return FakeEngine()
    raise ValidationError(
        f"engine: unknown engine {name!r}; choose one of {', '.join(ENGINE_NAMES)}",
        field="engine",
        value=name,
    )
