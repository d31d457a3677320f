"""Request and response bodies of the control-plane API."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from kingpost.store import DeploymentView, EnvironmentView, ModelView, SecretView

__all__ = [
    "DeploymentOut",
    "EnvironmentIn",
    "EnvironmentOut",
    "ModelOut",
    "PromoteIn",
    "PushIn",
    "PushOut",
    "SecretIn",
    "SecretOut",
]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PushIn(_In):
    project_hash: str = Field(pattern=r"^[0-9a-f]{64}$")
    model_name: str | None = None
    deployment_name: str | None = None
    labels: dict[str, Any] = Field(default_factory=dict)
    promote: bool = False
    environment: str | None = None
    engine: str | None = None
    min_replicas: int = Field(default=1, ge=0, le=64)
    max_replicas: int | None = Field(default=None, ge=1, le=64)

    @field_validator("max_replicas")
    @classmethod
    def _not_below_min(cls, value: int | None, info: ValidationInfo) -> int | None:
        low = info.data.get("min_replicas")
        if value is not None and low is not None and value < low:
            raise ValueError(f"must be at least min_replicas ({low}), got {value}")
        return value


class PromoteIn(_In):
    environment: str = "production"


class EnvironmentIn(_In):
    name: str


class SecretIn(_In):
    name: str
    value: str


class ModelOut(BaseModel):
    id: str
    name: str
    created_at: datetime
    deployment_count: int
    production_deployment_id: str | None

    @classmethod
    def of(cls, v: ModelView) -> ModelOut:
        return cls(**v.__dict__)


class DeploymentOut(BaseModel):
    id: str
    model_id: str
    name: str
    status: str
    desired_state: str
    message: str
    labels: dict[str, Any]
    engine: str
    is_development: bool
    environments: list[str]
    min_replicas: int
    max_replicas: int
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, v: DeploymentView) -> DeploymentOut:
        return cls(
            id=v.id,
            model_id=v.model_id,
            name=v.name,
            status=v.status.value,
            desired_state=v.desired_state.value,
            message=v.message,
            labels=v.labels,
            engine=v.engine,
            is_development=v.is_development,
            environments=list(v.environments),
            min_replicas=v.min_replicas,
            max_replicas=v.max_replicas,
            created_at=v.created_at,
            updated_at=v.updated_at,
        )


class PushOut(BaseModel):
    model: ModelOut
    deployment: DeploymentOut
    warnings: list[str]
    predict_url: str


class EnvironmentOut(BaseModel):
    name: str
    model_id: str
    deployment_id: str | None
    updated_at: datetime

    @classmethod
    def of(cls, v: EnvironmentView) -> EnvironmentOut:
        return cls(
            name=v.name, model_id=v.model_id, deployment_id=v.deployment_id, updated_at=v.updated_at
        )


class SecretOut(BaseModel):
    name: str
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, v: SecretView) -> SecretOut:
        return cls(name=v.name, created_at=v.created_at, updated_at=v.updated_at)
