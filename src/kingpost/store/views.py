"""Frozen views of stored rows: what leaves the store (never ORM objects)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from kingpost.store.models import ApiKeyKind, DeploymentStatus, DesiredState

__all__ = ["ApiKeyView", "DeploymentView", "EnvironmentView", "ModelView", "SecretView"]


@dataclass(frozen=True)
class ModelView:
    id: str
    name: str
    created_at: datetime
    deployment_count: int = 0
    production_deployment_id: str | None = None


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
    autoscaling_settings: dict[str, Any] | None = None
    """Settings for the deployment it points at; None: that deployment's own."""


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
