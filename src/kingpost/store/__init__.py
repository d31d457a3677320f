"""Durable state: SQLAlchemy tables, Alembic migrations, the store."""

from kingpost.store.db import Database
from kingpost.store.models import ApiKeyKind, DeploymentStatus, DesiredState, RolloutStatus
from kingpost.store.repo import (
    PRODUCTION,
    KeyScopes,
    NewDeployment,
    Store,
    hash_api_key,
    new_id,
)
from kingpost.store.views import (
    ApiKeyView,
    DeploymentView,
    EnvironmentView,
    ModelView,
    RolloutView,
    SecretView,
)

__all__ = [
    "PRODUCTION",
    "ApiKeyKind",
    "ApiKeyView",
    "Database",
    "DeploymentStatus",
    "DeploymentView",
    "DesiredState",
    "EnvironmentView",
    "KeyScopes",
    "ModelView",
    "NewDeployment",
    "RolloutStatus",
    "RolloutView",
    "SecretView",
    "Store",
    "hash_api_key",
    "new_id",
]
