"""SQLAlchemy tables: the durable truth of the control plane.

Schema changes go through Alembic migrations in ``migrations/versions``; these
classes must always match the newest revision (a test checks it).
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "ApiKey",
    "ApiKeyKind",
    "Base",
    "Deployment",
    "DeploymentStatus",
    "DesiredState",
    "Environment",
    "GpuAssignment",
    "Model",
    "Rollout",
    "RolloutStatus",
    "Secret",
    "utcnow",
]


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that reads back timezone-aware (UTC) on every database.

    SQLite stores no offset, so a plain ``DateTime(timezone=True)`` comes back naive
    there, and ``.timestamp()`` of a naive value counts it as local time."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return value.astimezone(UTC) if value is not None and value.tzinfo else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return value.replace(tzinfo=UTC) if value is not None and not value.tzinfo else value


class DeploymentStatus(enum.StrEnum):
    """What the controller last observed of a deployment."""

    BUILDING = "BUILDING"  # preparing its environment or image
    WAITING_FOR_WEIGHTS = "WAITING_FOR_WEIGHTS"  # weights are being mirrored
    DEPLOYING = "DEPLOYING"  # replicas started, none ready yet
    ACTIVE = "ACTIVE"  # at least one replica ready
    UNHEALTHY = "UNHEALTHY"  # was active, no replica ready now
    SCALED_TO_ZERO = "SCALED_TO_ZERO"  # active with zero replicas; a request wakes it
    INACTIVE = "INACTIVE"  # deactivated by a user; no replicas
    FAILED = "FAILED"  # replicas crash or cannot start; message says why
    BUILD_FAILED = "BUILD_FAILED"  # the environment or image could not be built
    DELETED = "DELETED"  # removed; kept for history


class RolloutStatus(enum.StrEnum):
    """Where a promotion into an environment that serves traffic stands (Baseten's names)."""

    IN_PROGRESS = "IN_PROGRESS"  # moving replicas and traffic to the candidate step by step
    PAUSED = "PAUSED"  # stopped between steps by a user; resume continues
    SUCCEEDED = "SUCCEEDED"  # the candidate serves the environment alone
    FAILED = "FAILED"  # the candidate never got ready or crashed; traffic is back on the previous
    CANCELED = "CANCELED"  # a user canceled; traffic and replicas are back on the previous


class DesiredState(enum.StrEnum):
    """What a user asked a deployment to be."""

    ACTIVE = "active"  # run replicas and serve
    INACTIVE = "inactive"  # keep config, run nothing, answer 404
    DELETED = "deleted"  # gone for good


class ApiKeyKind(enum.StrEnum):
    """What an API key may do."""

    ADMIN = "admin"  # everything: the management API and every model
    INVOKE = "invoke"  # call the named models through the gateway; no management API


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON}


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    kind: Mapped[ApiKeyKind] = mapped_column(String(16), default=ApiKeyKind.ADMIN)
    model_ids: Mapped[list[str]] = mapped_column(JSON, default=list)
    """For an invoke key: the ids of the models it may call."""


class Model(Base):
    __tablename__ = "models"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    next_number: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Deployment(Base):
    __tablename__ = "deployments"
    __table_args__ = (UniqueConstraint("model_id", "name"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    number: Mapped[int] = mapped_column(Integer)
    status: Mapped[DeploymentStatus] = mapped_column(String(32))
    desired_state: Mapped[DesiredState] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(Text, default="")
    labels: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    project_hash: Mapped[str] = mapped_column(String(64))
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    engine: Mapped[str] = mapped_column(String(32))
    is_development: Mapped[bool] = mapped_column(Boolean, default=False)
    min_replicas: Mapped[int] = mapped_column(Integer, default=1)
    max_replicas: Mapped[int] = mapped_column(Integer, default=1)
    activation: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    """Counts re-activations after a failure or a deactivation; replicas carry the one
    they were started for (``ReplicaSpec.generation``)."""
    autoscaling_settings: Mapped[dict[str, Any]] = mapped_column(
        JSON, default=dict, server_default="{}"
    )
    """Autoscaling settings but the replica bounds (columns above); missing: defaults."""
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Environment(Base):
    __tablename__ = "environments"
    __table_args__ = (UniqueConstraint("model_id", "name"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    deployment_id: Mapped[str | None] = mapped_column(ForeignKey("deployments.id"), nullable=True)
    promotion_settings: Mapped[dict[str, Any]] = mapped_column(
        JSON, default=dict, server_default="{}"
    )
    """Baseten's ``promotion_settings`` as stored (validated by the API); ``{}``: defaults."""
    autoscaling_settings: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    """Settings for whichever deployment the environment points at (None: its own)."""
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Secret(Base):
    __tablename__ = "secrets"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Rollout(Base):
    """A promotion into an environment that serves traffic: the durable state of its state
    machine (``controller/rollout.py`` decides, the loop applies and records here)."""

    __tablename__ = "rollouts"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"), index=True)
    environment: Mapped[str] = mapped_column(String(100))
    previous_deployment_id: Mapped[str] = mapped_column(String(32))
    candidate_deployment_id: Mapped[str] = mapped_column(String(32))
    rolling: Mapped[bool] = mapped_column(Boolean, default=False)
    status: Mapped[RolloutStatus] = mapped_column(String(16))
    phase: Mapped[str] = mapped_column(String(16))
    step: Mapped[int] = mapped_column(Integer, default=0)
    steps: Mapped[int] = mapped_column(Integer, default=1)
    target_replicas: Mapped[int] = mapped_column(Integer)
    """The candidate's replicas at the end."""
    previous_initial_replicas: Mapped[int] = mapped_column(Integer)
    candidate_replicas: Mapped[int] = mapped_column(Integer, default=0)
    """Replicas the candidate runs at this step."""
    previous_replicas: Mapped[int] = mapped_column(Integer)
    """Replicas the previous deployment runs at this step."""
    candidate_traffic_percent: Mapped[float] = mapped_column(Float, default=0.0)
    requested: Mapped[str | None] = mapped_column(String(16), nullable=True)
    """A user's control waiting for the loop: pause, cancel or force_complete."""
    message: Mapped[str] = mapped_column(Text, default="")
    settings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    """The environment's promotion settings when the promotion began."""
    phase_since: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class GpuAssignment(Base):
    """The devices (UUIDs) a live replica holds; released when the replica is gone."""

    __tablename__ = "gpu_assignments"

    replica_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    deployment_id: Mapped[str] = mapped_column(String(32))
    devices: Mapped[list[str]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
