"""Frozen views of stored rows: what leaves the store (never ORM objects)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from kingpost.store.models import ApiKeyKind, DeploymentStatus, DesiredState, RolloutStatus

__all__ = [
    "ApiKeyView",
    "DeploymentView",
    "EnvironmentView",
    "ModelView",
    "RolloutView",
    "SecretView",
]


@dataclass(frozen=True)
class ModelView:
    id: str
    name: str
    created_at: datetime
    deployment_count: int = 0
    production_deployment_id: str | None = None
    development_deployment_id: str | None = None


@dataclass(frozen=True)
class DeploymentView:
    id: str
    model_id: str
    name: str
    number: int
    status: DeploymentStatus
    desired_state: DesiredState
    message: str
    labels: dict[str, Any]
    project_hash: str
    config: dict[str, Any]
    engine: str
    is_development: bool
    min_replicas: int
    max_replicas: int
    created_at: datetime
    updated_at: datetime
    environments: tuple[str, ...] = field(default=())
    activation: int = 1
    """See ``Deployment.activation``."""
    autoscaling_settings: dict[str, Any] = field(default_factory=dict)
    """See ``Deployment.autoscaling_settings`` (the bounds are ``min/max_replicas``)."""


@dataclass(frozen=True)
class EnvironmentView:
    id: str
    model_id: str
    name: str
    deployment_id: str | None
    updated_at: datetime
    promotion_settings: dict[str, Any] = field(default_factory=dict)
    """As stored: ``{}`` means the defaults (promotions do not roll)."""
    autoscaling_settings: dict[str, Any] | None = None
    """Settings for the deployment it points at; None: that deployment's own."""
    created_at: datetime | None = None


@dataclass(frozen=True)
class RolloutView:
    """A promotion into an environment that served traffic (see ``store.models.Rollout``)."""

    id: str
    model_id: str
    environment: str
    previous_deployment_id: str
    candidate_deployment_id: str
    rolling: bool
    status: RolloutStatus
    phase: str
    step: int
    steps: int
    target_replicas: int
    previous_initial_replicas: int
    candidate_replicas: int
    previous_replicas: int
    candidate_traffic_percent: float
    requested: str | None
    message: str
    settings: dict[str, Any]
    phase_since: datetime
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None


@dataclass(frozen=True)
class SecretView:
    name: str
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class ApiKeyView:
    id: str
    name: str
    prefix: str
    created_at: datetime
    kind: ApiKeyKind = ApiKeyKind.ADMIN
    model_ids: tuple[str, ...] = ()
    """For an invoke key: the models it may call."""
