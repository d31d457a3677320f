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
    "AsyncRequest",
    "AsyncStatus",
    "Base",
    "ConsoleSession",
    "Deployment",
    "DeploymentStatus",
    "DesiredState",
    "Environment",
    "GpuAssignment",
    "Model",
    "Rollout",
    "RolloutStatus",
    "Secret",
    "WebhookSecret",
    "WebhookStatus",
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
    scale_down_previous: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    """Deactivate the previous deployment once this succeeds (Baseten's promote field);
    None: as the promotion settings go (after a rolling promotion only)."""
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


class AsyncStatus(enum.StrEnum):
    """Where an async request stands (Baseten's names)."""

    QUEUED = "QUEUED"  # accepted, waiting for a worker (or for its retry's backoff)
    IN_PROGRESS = "IN_PROGRESS"  # a worker sent it to a replica; no outcome recorded yet
    SUCCEEDED = "SUCCEEDED"  # the model answered; the result is stored
    FAILED = "FAILED"  # the model failed on every attempt; the last error is stored
    EXPIRED = "EXPIRED"  # waited longer than its max_time_in_queue_seconds
    CANCELED = "CANCELED"  # canceled by a user while queued
    WEBHOOK_FAILED = "WEBHOOK_FAILED"  # ran, but its webhook failed every delivery attempt


class WebhookStatus(enum.StrEnum):
    """Where the delivery of an async request's outcome to its webhook stands (Baseten's)."""

    PENDING = "PENDING"  # not delivered yet (the request runs, or a delivery is due)
    SUCCEEDED = "SUCCEEDED"  # the receiver answered 2xx
    FAILED = "FAILED"  # every delivery attempt failed; the result stays readable
    CANCELED = "CANCELED"  # the request was canceled or expired before it ran
    NO_WEBHOOK_PROVIDED = "NO_WEBHOOK_PROVIDED"  # the request named no webhook


class AsyncRequest(Base):
    """One async inference request: its input, how to run it, and its outcome. The queue
    the gateway writes to and the control plane's workers take from (``store/asyncq.py``)."""

    __tablename__ = "async_requests"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    model_id: Mapped[str] = mapped_column(String(32), index=True)
    deployment_id: Mapped[str] = mapped_column(String(32))
    environment: Mapped[str | None] = mapped_column(String(100), nullable=True)
    """The environment the request named (None: a deployment or development route)."""
    priority: Mapped[int] = mapped_column(Integer, default=0)
    model_input: Mapped[str] = mapped_column(Text)
    """The ``model_input`` as JSON text, sent to the replica as the predict body."""
    webhook_endpoint: Mapped[str | None] = mapped_column(Text, nullable=True)
    max_attempts: Mapped[int] = mapped_column(Integer, default=1)
    initial_delay_ms: Mapped[int] = mapped_column(Integer, default=1000)
    max_delay_ms: Mapped[int] = mapped_column(Integer, default=5000)
    max_time_in_queue_seconds: Mapped[int] = mapped_column(Integer, default=600)
    status: Mapped[AsyncStatus] = mapped_column(String(16))
    webhook_status: Mapped[WebhookStatus] = mapped_column(String(24))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    """Runs begun (a run cut short by a control-plane crash counts too)."""
    not_before: Mapped[datetime] = mapped_column(UTCDateTime)
    """A queued request is not taken before this (its retry's backoff)."""
    result: Mapped[str | None] = mapped_column(Text, nullable=True)
    """The model's answer as JSON text."""
    errors: Mapped[list[Any]] = mapped_column(JSON, default=list)
    """Baseten's ``errors``: ``[{"code": ..., "message": ...}]``."""
    webhook_attempts: Mapped[int] = mapped_column(Integer, default=0)
    webhook_error: Mapped[str] = mapped_column(Text, default="")
    webhook_not_before: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    status_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class WebhookSecret(Base):
    """A webhook signing secret (Fernet-sealed, as secrets are); every one active signs."""

    __tablename__ = "webhook_secrets"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ConsoleSession(Base):
    """A web console sign-in (``console/sessions.py``): the browser holds the session id,
    this row only its SHA-256 and the API key it was made from, sealed like secrets."""

    __tablename__ = "console_sessions"

    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    key_ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    """The API key the user signed in with (Fernet-sealed): the console calls the API and
    the gateway with it, so the API decides what the session may do."""
    key_prefix: Mapped[str] = mapped_column(String(16))
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
