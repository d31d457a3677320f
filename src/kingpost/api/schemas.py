"""Request and response bodies of the control-plane API."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationInfo, field_validator

from kingpost.controller.rollout import PromotionSettings
from kingpost.store import (
    ApiKeyKind,
    ApiKeyView,
    DeploymentView,
    EnvironmentView,
    ModelView,
    RolloutView,
    SecretView,
)

__all__ = [
    "ApiKeyCreated",
    "ApiKeyIn",
    "ApiKeyOut",
    "ApiKeyTombstone",
    "ApiKeysOut",
    "DeploymentOut",
    "DeploymentsOut",
    "DevelopmentSyncIn",
    "DevelopmentSyncOut",
    "EnvironmentIn",
    "EnvironmentOut",
    "EnvironmentPatch",
    "EnvironmentPromoteIn",
    "EnvironmentsOut",
    "ModelOut",
    "ModelsOut",
    "PromoteIn",
    "PushIn",
    "PushOut",
    "RolloutOut",
    "SecretIn",
    "SecretOut",
    "SecretsOut",
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
    development: bool = False
    """Create (or replace) the model's development deployment, for live reload."""

    @field_validator("max_replicas")
    @classmethod
    def _not_below_min(cls, value: int | None, info: ValidationInfo) -> int | None:
        low = info.data.get("min_replicas")
        if value is not None and low is not None and value < low:
            raise ValueError(f"must be at least min_replicas ({low})")  # the value: added
        return value


class DevelopmentSyncIn(_In):
    project_hash: str = Field(pattern=r"^[0-9a-f]{64}$")


class PromoteIn(_In):
    """Baseten's promote-to-production body, and Kingpost's ``environment``."""

    environment: str = "production"
    scale_down_previous_production: bool | None = None
    """Deactivate the deployment this one replaces once it is out of the environment
    (unless another points at it); false keeps it running; left out: after a rolling
    promotion only, as Kingpost did before (Baseten's default is true)."""


class DeploymentPatch(_In):
    """A deployment's new name and/or labels; what is left out stays as it is."""

    name: str | None = None
    labels: dict[str, Any] | None = None


class EnvironmentIn(_In):
    name: str


class SecretIn(_In):
    name: str
    value: str


class ModelOut(BaseModel):
    id: str
    name: str
    created_at: datetime
    deployments_count: int
    """Baseten's name; ``deployment_count`` is the same number, kept for older scripts."""
    deployment_count: int
    production_deployment_id: str | None
    development_deployment_id: str | None

    @classmethod
    def of(cls, v: ModelView) -> ModelOut:
        return cls(**v.__dict__, deployments_count=v.deployment_count)


class ModelsOut(BaseModel):
    """Baseten's list shape: the items under a key, so that fields can be added beside."""

    models: list[ModelOut]


class ReplicaOut(BaseModel):
    """One running replica of a deployment, as its engine reports it now."""

    id: str
    deployment_id: str
    status: str
    """``STARTING``, ``READY``, ``NOT_READY``, ``RESTARTING``, ``FAILED`` or ``STOPPED``."""
    restarts: int
    message: str
    started_at: datetime | None
    generation: int
    address: str | None
    """``host:port`` the gateway reaches it on (inside its network namespace, if any)."""
    gpus: list[str] = Field(default_factory=list)


class ReplicasOut(BaseModel):
    replicas: list[ReplicaOut]


class DeploymentOut(BaseModel):
    id: str
    model_id: str
    name: str
    is_production: bool
    """Baseten's: whether the production environment points at it."""
    environment: str | None
    """Baseten's: the environment it serves (production first), None when in none."""
    active_replica_count: int = 0
    """Baseten's: replicas ready now (the autoscaler's last count)."""
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
    autoscaling_settings: dict[str, int] = Field(default_factory=dict)
    """The settings that govern the deployment (an environment's, or its own)."""
    autoscaling_settings_from: str | None = None
    """The environment they come from; None: the deployment's own."""
    replicas_wanted: int | None = None
    replicas_starting: int | None = None
    replicas_ready: int | None = None
    scaling_reason: str = ""
    """Why the autoscaler last chose ``replicas_wanted``."""
    gpus: dict[str, list[str]] = Field(default_factory=dict)
    """Replica id -> the devices it holds (``index:uuid``)."""

    @classmethod
    def of(cls, v: DeploymentView) -> DeploymentOut:
        envs = sorted(v.environments, key=lambda e: (e != "production", e))
        return cls(
            id=v.id,
            model_id=v.model_id,
            name=v.name,
            is_production="production" in envs,
            environment=envs[0] if envs else None,
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


class DeploymentsOut(BaseModel):
    deployments: list[DeploymentOut]


class DevelopmentSyncOut(BaseModel):
    kind: str
    """``unchanged``, ``reload`` (in place) or ``swap`` (a new replica)."""
    ok: bool
    changed: list[str]
    removed: list[str]
    why: str
    took_s: float
    error: str
    traceback: str
    replicas: list[str]
    deployment: DeploymentOut


class PushOut(BaseModel):
    model: ModelOut
    deployment: DeploymentOut
    warnings: list[str]
    predict_url: str


class AutoscalingIn(BaseModel):
    """Fields left out (or null) stay as they are."""

    model_config = ConfigDict(extra="forbid")
    min_replica: StrictInt | None = None
    max_replica: StrictInt | None = None
    autoscaling_window: StrictInt | None = None
    scale_down_delay: StrictInt | None = None
    concurrency_target: StrictInt | None = None
    target_utilization_percentage: StrictInt | None = None
    max_scale_down_rate: StrictInt | None = None
    target_in_flight_tokens: None = Field(
        default=None,
        description="Baseten's token-based target; Kingpost's autoscaler counts requests, "
        "so only null (unchanged) is accepted",
    )

    @field_validator("target_in_flight_tokens", mode="before")
    @classmethod
    def _no_token_target(cls, value: Any) -> None:
        if value is not None:
            raise ValueError(
                "must be null: Kingpost's autoscaler counts requests in flight, not tokens; "
                "use concurrency_target"
            )


class EnvironmentPatch(_In):
    """Baseten's PATCH of an environment: its promotion settings, its autoscaling settings,
    or both; what is left out stays as it is."""

    promotion_settings: dict[str, Any] | None = None
    autoscaling_settings: AutoscalingIn | None = None


class EnvironmentPromoteIn(_In):
    """Baseten's promote-to-environment body."""

    deployment_id: str
    scale_down_previous_deployment: bool | None = None
    """As ``PromoteIn.scale_down_previous_production``."""
    preserve_env_instance_type: Literal[True] | None = None
    """Baseten's choice between the environment's instance type and the deployment's.
    Kingpost has no instance types apart from the config: a replica runs on the resources
    its deployment's config names, so only true (or null) is accepted."""


class RolloutOut(BaseModel):
    """A promotion into an environment that served traffic, and where it stands."""

    id: str
    model_id: str
    environment: str
    status: str
    previous_deployment_id: str
    candidate_deployment_id: str
    rolling: bool
    phase: str
    step: int
    steps: int
    candidate_traffic_percent: float
    previous_traffic_percent: float
    candidate_replicas: int
    previous_replicas: int
    target_replicas: int
    requested: str | None
    message: str
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None

    @classmethod
    def of(cls, v: RolloutView) -> RolloutOut:
        return cls(
            id=v.id,
            model_id=v.model_id,
            environment=v.environment,
            status=v.status.value,
            previous_deployment_id=v.previous_deployment_id,
            candidate_deployment_id=v.candidate_deployment_id,
            rolling=v.rolling,
            phase=v.phase,
            step=v.step,
            steps=v.steps,
            candidate_traffic_percent=v.candidate_traffic_percent,
            previous_traffic_percent=round(100.0 - v.candidate_traffic_percent, 2),
            candidate_replicas=v.candidate_replicas,
            previous_replicas=v.previous_replicas,
            target_replicas=v.target_replicas,
            requested=v.requested,
            message=v.message,
            created_at=v.created_at,
            updated_at=v.updated_at,
            finished_at=v.finished_at,
        )


class EnvironmentOut(BaseModel):
    name: str
    model_id: str
    deployment_id: str | None
    current_deployment: DeploymentOut | None = None
    """Baseten's: the deployment it points at, whole."""
    created_at: datetime | None = None
    updated_at: datetime
    promotion_settings: dict[str, Any] = Field(default_factory=dict)
    """Baseten's shape, defaults filled in."""
    rollout: RolloutOut | None = None
    """The last promotion that rolled into it (running or finished), when asked for."""
    autoscaling_settings: dict[str, int] | None = None
    """Settings for the deployment it points at; None: that deployment's own."""

    @classmethod
    def of(
        cls,
        v: EnvironmentView,
        rollout: RolloutView | None = None,
        current: DeploymentOut | None = None,
    ) -> EnvironmentOut:
        return cls(
            name=v.name,
            model_id=v.model_id,
            deployment_id=v.deployment_id,
            current_deployment=current,
            created_at=v.created_at,
            updated_at=v.updated_at,
            promotion_settings=PromotionSettings.from_api(v.promotion_settings).to_api(),
            rollout=RolloutOut.of(rollout) if rollout is not None else None,
            autoscaling_settings=v.autoscaling_settings,
        )


class EnvironmentsOut(BaseModel):
    environments: list[EnvironmentOut]


class EnvironmentUpdateOut(EnvironmentOut):
    """The environment after a PATCH, with Baseten's ``status`` (ACCEPTED or UNCHANGED)
    and ``message``."""

    status: str
    message: str


class SecretOut(BaseModel):
    name: str
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, v: SecretView) -> SecretOut:
        return cls(name=v.name, created_at=v.created_at, updated_at=v.updated_at)


class SecretsOut(BaseModel):
    secrets: list[SecretOut]


# Baseten's management API names: `WORKSPACE_MANAGE_ALL` and `WORKSPACE_INVOKE` keys.
# Baseten's PERSONAL key (tied to a user) is a full-access key here: Kingpost has no users.
KEY_TYPES: dict[str, ApiKeyKind] = {
    "WORKSPACE_MANAGE_ALL": ApiKeyKind.ADMIN,
    "WORKSPACE_INVOKE": ApiKeyKind.INVOKE,
    "PERSONAL": ApiKeyKind.ADMIN,
}
_TYPE_OF = {ApiKeyKind.ADMIN: "WORKSPACE_MANAGE_ALL", ApiKeyKind.INVOKE: "WORKSPACE_INVOKE"}
KeyType = Literal["WORKSPACE_MANAGE_ALL", "WORKSPACE_INVOKE"]


class ApiKeyIn(_In):
    name: str | None = Field(default=None, max_length=100)
    """Optional, as on Baseten; a key without one is listed by its prefix alone."""
    type: Literal["WORKSPACE_MANAGE_ALL", "WORKSPACE_INVOKE", "PERSONAL"] = "WORKSPACE_MANAGE_ALL"
    model_ids: list[str] | None = Field(default=None, max_length=1000)
    """For ``WORKSPACE_INVOKE``: the models (ids or names) the key may call."""


class ApiKeyOut(BaseModel):
    prefix: str
    name: str
    type: KeyType
    model_ids: list[str]
    created_at: datetime

    @classmethod
    def of(cls, v: ApiKeyView) -> ApiKeyOut:
        return cls(
            prefix=v.prefix,
            name=v.name,
            type=_TYPE_OF[v.kind],
            model_ids=list(v.model_ids),
            created_at=v.created_at,
        )


class ApiKeyCreated(ApiKeyOut):
    api_key: str
    """The key itself: shown in this answer only, never stored."""


class ApiKeysOut(BaseModel):
    keys: list[ApiKeyOut]


class ApiKeyTombstone(BaseModel):
    prefix: str
