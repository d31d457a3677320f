"""The store: every read and write of durable state goes through here.

Methods open one short transaction each and return frozen views.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets as _secrets
import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from kingpost.errors import ConflictError, NotFoundError, ValidationError
from kingpost.secrets_box import SecretBox
from kingpost.store.db import Database
from kingpost.store.models import (
    ApiKey,
    ApiKeyKind,
    Deployment,
    DeploymentStatus,
    DesiredState,
    Environment,
    Model,
    Rollout,
    Secret,
    utcnow,
)
from kingpost.store.rollouts import (
    RUNNING,
    check_not_rolling,
    control,
    latest,
    record,
    roll_or_point,
    rollout_view,
)
from kingpost.store.views import (
    ApiKeyView,
    DeploymentView,
    EnvironmentView,
    ModelView,
    RolloutView,
    SecretView,
)

__all__ = ["KeyScopes", "NewDeployment", "Store", "hash_api_key", "new_id"]

PRODUCTION = "production"
DEVELOPMENT = "development"
"""The name of a model's one development deployment, which no other may take."""
_ALPHABET = string.ascii_lowercase + string.digits
_DEPLOYMENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_ENV_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_SECRET_NAME = re.compile(r"^[A-Za-z0-9._-]{1,200}$")
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,199}$")
_KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,99}$")
_KEY_PREFIX_CHARS = 12
"""``kp_`` and 9 random characters: what names a key in lists and revocations."""
MAX_LABELS_BYTES = 16 * 1024
"""Largest a deployment's labels may be, encoded as JSON: every list call returns them."""


@dataclass(frozen=True)
class KeyScopes:
    """What the gateway needs to check keys: SHA-256 hex digests by kind."""

    admin: frozenset[str] = frozenset()
    """Keys that may call every model."""
    invoke: Mapping[str, frozenset[str]] = field(default_factory=dict)
    """Invoke-only keys -> ids of the models each may call."""


def new_id(length: int = 8) -> str:
    return "".join(_secrets.choice(_ALPHABET) for _ in range(length))


def _free_id(s: Session, table: type[Model] | type[Deployment], length: int) -> str:
    """A new id that is no row's name: a reference is looked up by id first, so a name
    equal to an id would be shadowed by it."""
    while True:
        candidate = new_id(length)
        if s.scalar(select(table.id).where(table.name == candidate)) is None:
            return candidate


def _refuse_an_ids_name(
    s: Session, table: type[Model] | type[Deployment], name: str, field: str
) -> None:
    """A name equal to another row's id would be found as that row (ids win), so that
    deleting or scoping a key "by name" would reach the other one."""
    if s.get(table, name) is not None:
        kind = "model" if table is Model else "deployment"
        raise ConflictError(
            f"{field}: {name!r} is the id of another {kind}, and references by id come "
            "first; choose another name",
            field=field,
            value=name,
        )


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _check(pattern: re.Pattern[str], kind: str, value: str, rule: str) -> None:
    if not pattern.match(value):
        raise ValidationError(
            f"{kind} name {value!r} is not allowed: {rule}", field=f"{kind}_name", value=value
        )


def check_secret_name(name: str) -> None:
    rule = "use letters, digits, '.', '_' and '-' (1-200), not '.' or '..' alone"
    if name in (".", ".."):  # never a secret config.yaml can name, nor a file in /secrets
        raise ValidationError(
            f"secret name {name!r} is not allowed: {rule}", field="secret_name", value=name
        )
    _check(_SECRET_NAME, "secret", name, rule)


def check_labels(labels: Mapping[str, Any]) -> None:
    """Refuse labels that take more than :data:`MAX_LABELS_BYTES` as JSON."""
    size = len(json.dumps(labels, separators=(",", ":"), ensure_ascii=False).encode())
    if size > MAX_LABELS_BYTES:
        raise ValidationError(
            f"labels: {size} bytes as JSON, more than the limit of {MAX_LABELS_BYTES} bytes "
            "(16 KiB); keep labels to short tags and put data in the project",
            field="labels",
            limit_bytes=MAX_LABELS_BYTES,
            value=size,
        )


def check_environment_name(name: str) -> None:
    _check(_ENV_NAME, "environment", name, "lowercase letters, digits, '_' and '-' (max 63)")


def _model_view(s: Session, m: Model) -> ModelView:
    count = s.scalar(
        select(func.count()).where(
            Deployment.model_id == m.id, Deployment.desired_state != DesiredState.DELETED
        )
    )
    prod = s.scalar(
        select(Environment.deployment_id).where(
            Environment.model_id == m.id, Environment.name == PRODUCTION
        )
    )
    development = s.scalar(
        select(Deployment.id).where(
            Deployment.model_id == m.id,
            Deployment.is_development.is_(True),
            Deployment.desired_state != DesiredState.DELETED,
        )
    )
    return ModelView(m.id, m.name, m.created_at, int(count or 0), prod, development)


def _key_view(k: ApiKey) -> ApiKeyView:
    return ApiKeyView(
        k.id, k.name, k.prefix, k.created_at, ApiKeyKind(k.kind), tuple(k.model_ids or ())
    )


def _env_view(e: Environment) -> EnvironmentView:
    autoscaling = dict(e.autoscaling_settings) if e.autoscaling_settings is not None else None
    return EnvironmentView(
        e.id,
        e.model_id,
        e.name,
        e.deployment_id,
        e.updated_at,
        dict(e.promotion_settings or {}),
        autoscaling,
        e.created_at,
    )


def _deployment_view(d: Deployment, envs: Iterable[str] = ()) -> DeploymentView:
    return DeploymentView(
        id=d.id,
        model_id=d.model_id,
        name=d.name,
        number=d.number,
        status=DeploymentStatus(d.status),
        desired_state=DesiredState(d.desired_state),
        message=d.message,
        labels=dict(d.labels or {}),
        project_hash=d.project_hash,
        config=dict(d.config),
        engine=d.engine,
        is_development=d.is_development,
        min_replicas=d.min_replicas,
        max_replicas=d.max_replicas,
        created_at=d.created_at,
        updated_at=d.updated_at,
        environments=tuple(sorted(envs)),
        activation=d.activation or 1,
        autoscaling_settings=dict(d.autoscaling_settings or {}),
    )


class NewDeployment:
    """What a push asks for; plain attributes, validated by :meth:`Store.create_deployment`."""

    def __init__(
        self,
        *,
        model_name: str,
        project_hash: str,
        config: Mapping[str, Any],
        engine: str,
        name: str | None = None,
        labels: Mapping[str, Any] | None = None,
        environment: str | None = None,
        min_replicas: int = 1,
        max_replicas: int = 1,
        development: bool = False,
        scale_down_previous: bool | None = None,
    ) -> None:
        self.scale_down_previous = scale_down_previous
        """For ``environment``: see :func:`store.rollouts.roll_or_point`."""
        self.model_name = model_name
        self.project_hash = project_hash
        self.config = dict(config)
        self.engine = engine
        self.name = name
        self.labels = dict(labels or {})
        self.environment = environment
        self.min_replicas = min_replicas
        self.max_replicas = max_replicas
        self.development = development
        """The model's one development deployment: created, or replaced when it exists."""


class Store:
    def __init__(self, db: Database, box: SecretBox) -> None:
        self.db = db
        self.box = box

    # -- API keys ---------------------------------------------------------------
    def create_api_key(
        self, name: str, kind: ApiKeyKind = ApiKeyKind.ADMIN, models: Sequence[str] = ()
    ) -> tuple[ApiKeyView, str]:
        """Create a key; the plain key is returned once and never stored. An invoke key
        names the models (by id or name) it may call; they must exist."""
        _check(_KEY_NAME, "api_key", name, "letters, digits, space, '.', '_', '-' (max 100)")
        if kind == ApiKeyKind.INVOKE and not models:
            raise ValidationError(
                "model_ids: an invoke-only key needs at least one model to call; name one "
                "(`--model NAME`), or create an admin key",
                field="model_ids",
                value=[],
            )
        if kind == ApiKeyKind.ADMIN and models:
            raise ValidationError(
                f"model_ids: an admin key may call every model, so it takes none (got "
                f"{list(models)!r}); create an invoke-only key to limit it to models",
                field="model_ids",
                value=list(models),
            )
        with self.db.session() as s:
            model_ids = sorted({self._model(s, ref).id for ref in models})
            while True:
                key = "kp_" + _secrets.token_urlsafe(32)
                prefix = key[:_KEY_PREFIX_CHARS]
                if s.scalar(select(ApiKey.id).where(ApiKey.prefix == prefix)) is None:
                    break  # the prefix names the key: never two alike
            row = ApiKey(
                id=new_id(12),
                name=name,
                key_hash=hash_api_key(key),
                prefix=prefix,
                kind=kind,
                model_ids=model_ids,
            )
            s.add(row)
            s.flush()
            return _key_view(row), key

    def list_api_keys(self) -> list[ApiKeyView]:
        with self.db.session() as s:
            return [_key_view(r) for r in s.scalars(select(ApiKey).order_by(ApiKey.created_at))]

    def revoke_api_key(self, prefix: str) -> ApiKeyView:
        """Delete the key that ``prefix`` names; the last admin key cannot go."""
        with self.db.session() as s:
            rows = list(s.scalars(select(ApiKey).where(ApiKey.prefix == prefix)))
            if not rows:
                raise NotFoundError(
                    f"API key {prefix!r} not found; `kingpost api-keys list` shows each "
                    "key's prefix",
                    api_key_prefix=prefix,
                )
            if len(rows) > 1:  # only keys made before prefixes were unique
                raise ConflictError(
                    f"API key prefix {prefix!r} names {len(rows)} keys made before prefixes "
                    "were unique, and none is revoked rather than all; create new keys to "
                    "replace them",
                    api_key_prefix=prefix,
                )
            (row,) = rows
            if row.kind == ApiKeyKind.ADMIN:
                admins = s.scalar(
                    select(func.count()).select_from(ApiKey).where(ApiKey.kind == ApiKeyKind.ADMIN)
                )
                if admins == 1:
                    raise ConflictError(
                        f"API key {prefix!r} is the last admin key; create another admin "
                        "key first (`kingpost api-keys create NAME`), then revoke this one",
                        api_key_prefix=prefix,
                    )
            view = _key_view(row)
            s.delete(row)
            return view

    def api_key_scopes(self) -> KeyScopes:
        with self.db.session() as s:
            admin: set[str] = set()
            invoke: dict[str, frozenset[str]] = {}
            for row in s.scalars(select(ApiKey)):
                if row.kind == ApiKeyKind.ADMIN:
                    admin.add(row.key_hash)
                else:
                    invoke[row.key_hash] = frozenset(row.model_ids or ())
            return KeyScopes(frozenset(admin), invoke)

    def has_api_keys(self) -> bool:
        with self.db.session() as s:
            return s.scalar(select(func.count()).select_from(ApiKey)) != 0

    def find_api_key(self, key: str) -> ApiKeyView | None:
        """The key's view, or None for a key that is unknown (or revoked)."""
        with self.db.session() as s:
            row = s.scalar(select(ApiKey).where(ApiKey.key_hash == hash_api_key(key)))
            return _key_view(row) if row is not None else None

    def verify_api_key(self, key: str) -> bool:
        return self.find_api_key(key) is not None

    # -- models -----------------------------------------------------------------
    def list_models(self) -> list[ModelView]:
        with self.db.session() as s:
            return [_model_view(s, m) for m in s.scalars(select(Model).order_by(Model.created_at))]

    def _model(self, s: Session, ref: str, *, lock: bool = False) -> Model:
        """``ref`` by id or name. With ``lock``, its row is held until the transaction ends
        (PostgreSQL's ``FOR UPDATE``), as a push holds it: a change that may add one of
        the model's environments takes it first, since the insert's foreign key check
        waits for it, and a push that waited for the inserted environment meanwhile
        would deadlock with it."""
        by_name = select(Model).where(Model.name == ref)
        m = s.get(Model, ref, with_for_update=lock) or s.scalar(
            by_name.with_for_update() if lock else by_name
        )
        if m is None:
            raise NotFoundError(f"model {ref!r} not found (by id or name)", model=ref)
        return m

    def delete_model(self, ref: str) -> ModelView:
        """Remove a model with every deployment and environment of it, for good.

        The rows go (deleted deployments' too), so the controller stops what the
        deployments ran at its next pass, as for strays, and the name can be pushed
        anew. Its row is locked first, as a push and a promotion lock it, so neither
        interleaves: a push that waited creates a new model."""
        with self.db.session() as s:
            model = self._model(s, ref, lock=True)
            view = _model_view(s, model)
            s.execute(delete(Rollout).where(Rollout.model_id == model.id))
            s.execute(delete(Environment).where(Environment.model_id == model.id))
            s.execute(delete(Deployment).where(Deployment.model_id == model.id))
            s.delete(model)
            return view

    def get_model(self, ref: str) -> ModelView:
        with self.db.session() as s:
            return _model_view(s, self._model(s, ref))

    # -- deployments ------------------------------------------------------------
    def create_deployment(self, new: NewDeployment) -> DeploymentView:
        """Create the model on first push, then ``deployment-N`` (or ``new.name``).

        The first deployment of a model, and any with ``new.environment`` set, is
        pointed at by that environment (``production`` by default).
        """
        _check(_MODEL_NAME, "model", new.model_name, "letters, digits, space, '.', '_', '-'")
        if new.name is not None:
            _check(_DEPLOYMENT_NAME, "deployment", new.name, "letters, digits, '.', '_', '-'")
            if new.name == DEVELOPMENT and not new.development:
                raise ValidationError(
                    f"deployment name {DEVELOPMENT!r} is reserved for the development "
                    "deployment; push with --watch to create it, or choose another name",
                    field="deployment_name",
                    value=new.name,
                )
        if new.development and (new.name not in (None, DEVELOPMENT) or new.environment):
            raise ValidationError(
                "the development deployment is always named 'development' and is in no "
                "environment; push it without a deployment name, --promote or --environment",
                field="development",
            )
        if new.environment is not None:
            check_environment_name(new.environment)
        check_labels(new.labels)
        for _ in range(3):
            try:
                return self._create_deployment(new)
            except IntegrityError:
                continue  # a concurrent push created the model or took the name: look again
        raise ConflictError(
            f"model {new.model_name!r} is being pushed concurrently; push again",
            model=new.model_name,
        )

    def _create_deployment(self, new: NewDeployment) -> DeploymentView:
        with self.db.session() as s:
            # Locked (PostgreSQL; SQLite locks the database): concurrent pushes to one
            # model take their numbers one after the other.
            model = s.scalar(select(Model).where(Model.name == new.model_name).with_for_update())
            first = model is None
            if model is None:
                _refuse_an_ids_name(s, Model, new.model_name, "model_name")
                model = Model(id=_free_id(s, Model, 8), name=new.model_name, next_number=1)
                s.add(model)
                s.flush()
                s.add(Environment(id=new_id(12), model_id=model.id, name=PRODUCTION))
            if new.development:
                return self._replace_development(s, model, new)
            number = model.next_number

            def taken(name: str) -> bool:
                return (
                    s.scalar(
                        select(Deployment.id).where(
                            Deployment.model_id == model.id, Deployment.name == name
                        )
                    )
                    is not None
                )

            if new.name is None:
                # A push named ahead of the numbering (`deployment-3` at 3) took a name
                # that the numbering would give next: move past it.
                while taken(f"deployment-{number}"):
                    number += 1
            name = new.name or f"deployment-{number}"
            if new.name is not None and taken(name):
                raise ConflictError(
                    f"deployment name {name!r} already exists on model {model.name!r}; "
                    "choose another with --deployment-name",
                    deployment_name=name,
                )
            if new.name is not None:
                _refuse_an_ids_name(s, Deployment, name, "deployment_name")
            model.next_number = number + 1
            dep = Deployment(
                id=_free_id(s, Deployment, 7),
                model_id=model.id,
                name=name,
                number=number,
                status=DeploymentStatus.DEPLOYING,
                desired_state=DesiredState.ACTIVE,
                message="",
                labels=new.labels,
                project_hash=new.project_hash,
                config=new.config,
                engine=new.engine,
                min_replicas=new.min_replicas,
                max_replicas=new.max_replicas,
            )
            s.add(dep)
            s.flush()
            if first:
                self._point(s, model.id, new.environment or PRODUCTION, dep.id)
            elif new.environment is not None:
                self._promote_into(s, model, new.environment, dep, new.scale_down_previous)
            return self._view(s, dep)

    def _replace_development(self, s: Session, model: Model, new: NewDeployment) -> DeploymentView:
        """The model's development deployment, created, or given the new project (its
        replicas are replaced: a new activation)."""
        dep = s.scalar(
            select(Deployment).where(
                Deployment.model_id == model.id,
                Deployment.is_development.is_(True),
                Deployment.desired_state != DesiredState.DELETED,
            )
        )
        if dep is None:
            # A deleted one keeps its row (names are never reused): it gives up the name.
            for gone in s.scalars(
                select(Deployment).where(
                    Deployment.model_id == model.id, Deployment.name == DEVELOPMENT
                )
            ):
                gone.name = f"{DEVELOPMENT}-deleted-{gone.id}"
            s.flush()
            dep = Deployment(
                id=new_id(7),
                model_id=model.id,
                name=DEVELOPMENT,
                number=0,
                is_development=True,
                message="",
                activation=1,
            )
            s.add(dep)
        else:
            dep.activation = (dep.activation or 1) + 1
        dep.status, dep.desired_state = DeploymentStatus.DEPLOYING, DesiredState.ACTIVE
        dep.labels, dep.project_hash, dep.config = new.labels, new.project_hash, new.config
        # One replica, and none while idle: it scales to zero like any min_replica 0
        # deployment (after the autoscaling window and scale_down_delay without a request).
        dep.engine, dep.min_replicas, dep.max_replicas = new.engine, 0, 1
        dep.updated_at = utcnow()
        s.flush()
        return self._view(s, dep)

    def set_development_project(
        self, deployment_id: str, project_hash: str, config: Mapping[str, Any], activation: int
    ) -> DeploymentView:
        """What the development deployment now runs (after a live reload, or a swap, which
        gives it a new ``activation``)."""
        with self.db.session() as s:
            dep = self._deployment(s, deployment_id, lock=True)
            if not dep.is_development:
                raise ConflictError(
                    f"deployment {dep.name!r} is not a development deployment", deployment=dep.id
                )
            if activation != dep.activation:  # new replicas: whatever failed is past
                dep.status, dep.message = DeploymentStatus.DEPLOYING, ""
            dep.project_hash, dep.config, dep.activation = project_hash, dict(config), activation
            dep.updated_at = utcnow()
            return self._view(s, dep)

    def _point(self, s: Session, model_id: str, env_name: str, deployment_id: str) -> None:
        env = s.scalar(
            select(Environment).where(
                Environment.model_id == model_id, Environment.name == env_name
            )
        )
        if env is None:
            env = Environment(id=new_id(12), model_id=model_id, name=env_name)
            s.add(env)
        env.deployment_id = deployment_id
        env.updated_at = utcnow()

    def _promote_into(
        self,
        s: Session,
        model: Model,
        env_name: str,
        dep: Deployment,
        scale_down_previous: bool | None = None,
    ) -> None:
        """Point the environment at ``dep``, or begin a rollout when one serves there."""
        env = s.scalar(
            select(Environment).where(
                Environment.model_id == model.id, Environment.name == env_name
            )
        )
        if env is None:
            self._point(s, model.id, env_name, dep.id)
            return
        roll_or_point(s, env, dep, model.name, scale_down_previous)

    def _view(self, s: Session, d: Deployment) -> DeploymentView:
        envs = s.scalars(select(Environment.name).where(Environment.deployment_id == d.id))
        return _deployment_view(d, envs)

    def _deployment(
        self, s: Session, ref: str, model_ref: str | None = None, *, lock: bool = False
    ) -> Deployment:
        """``ref`` by id, or by name within ``model_ref``. With ``lock``, its row is held
        until the transaction ends (PostgreSQL's ``FOR UPDATE``; SQLite's transactions
        hold the whole database): a change that checks the deployment's state, or what
        points to it, must see the last committed one, not a state a concurrent
        transaction is about to change (a delete racing a promotion)."""
        d = s.get(Deployment, ref, with_for_update=lock)
        if d is None and model_ref is not None:
            model = self._model(s, model_ref)
            query = select(Deployment).where(
                Deployment.model_id == model.id, Deployment.name == ref
            )
            d = s.scalar(query.with_for_update() if lock else query)
            if d is None and ref == PRODUCTION:
                # Baseten's `.../deployments/production/...` routes: the deployment the
                # production environment points at (a deployment named so comes first).
                current = s.scalar(
                    select(Environment.deployment_id).where(
                        Environment.model_id == model.id, Environment.name == PRODUCTION
                    )
                )
                if current is not None:
                    d = s.get(Deployment, current, with_for_update=lock)
        if d is None or d.desired_state == DesiredState.DELETED:
            raise NotFoundError(f"deployment {ref!r} not found", deployment=ref)
        if model_ref is not None and d.model_id != self._model(s, model_ref).id:
            raise NotFoundError(
                f"deployment {ref!r} does not belong to model {model_ref!r}", deployment=ref
            )
        return d

    def get_deployment(self, ref: str, model_ref: str | None = None) -> DeploymentView:
        with self.db.session() as s:
            return self._view(s, self._deployment(s, ref, model_ref))

    def list_deployments(
        self, model_ref: str | None = None, *, include_deleted: bool = False
    ) -> list[DeploymentView]:
        with self.db.session() as s:
            q = select(Deployment).order_by(Deployment.created_at, Deployment.number)
            if model_ref is not None:
                q = q.where(Deployment.model_id == self._model(s, model_ref).id)
            if not include_deleted:
                q = q.where(Deployment.desired_state != DesiredState.DELETED)
            envs: dict[str, list[str]] = {}
            for env in s.scalars(select(Environment).where(Environment.deployment_id.is_not(None))):
                envs.setdefault(str(env.deployment_id), []).append(env.name)
            return [_deployment_view(d, envs.get(d.id, ())) for d in s.scalars(q)]

    def set_status(
        self,
        deployment_id: str,
        status: DeploymentStatus,
        message: str = "",
        *,
        seen: tuple[int, DesiredState] | None = None,
    ) -> bool:
        """Record what the controller observed; returns whether anything changed.

        ``seen``: the (activation, desired state) the controller decided from. When the
        user re-activated or deactivated the deployment since, that decision is stale and
        nothing is written (the next pass decides again), so a re-activation made during
        a pass is never overwritten by that pass's FAILED."""
        with self.db.session() as s:
            d = s.get(Deployment, deployment_id, with_for_update=seen is not None)
            if d is None or (d.status == status and d.message == message):
                return False
            if seen is not None and ((d.activation or 1), d.desired_state) != seen:
                return False
            d.status, d.message, d.updated_at = status, message, utcnow()
            return True

    def set_desired(
        self, deployment_id: str, desired: DesiredState, model_ref: str | None = None
    ) -> DeploymentView:
        with self.db.session() as s:
            d = self._deployment(s, deployment_id, model_ref, lock=True)
            if desired == DesiredState.DELETED:
                envs = list(
                    s.scalars(select(Environment.name).where(Environment.deployment_id == d.id))
                )
                if envs:
                    raise ConflictError(
                        f"deployment {d.name!r} is promoted to {', '.join(envs)}; promote another "
                        "deployment there before deleting it",
                        deployment=d.id,
                        environments=envs,
                    )
                check_not_rolling(s, d, self._model(s, d.model_id).name)
            d.desired_state, d.updated_at = desired, utcnow()
            if desired == DesiredState.ACTIVE and d.status in (
                DeploymentStatus.INACTIVE,
                DeploymentStatus.FAILED,
                DeploymentStatus.BUILD_FAILED,  # the controller builds it again
            ):
                d.status, d.message = DeploymentStatus.DEPLOYING, ""
                d.activation = (d.activation or 1) + 1  # its failed replicas are replaced
            return self._view(s, d)

    def update_deployment(
        self,
        deployment_ref: str,
        model_ref: str,
        *,
        name: str | None = None,
        labels: Mapping[str, Any] | None = None,
    ) -> DeploymentView:
        """Rename a deployment and/or replace its labels; ``None`` leaves one as it is.
        Neither changes what runs (``updated_at`` stays: replicas are not restarted)."""
        if name is not None:
            _check(_DEPLOYMENT_NAME, "deployment", name, "letters, digits, '.', '_', '-'")
        if labels is not None:
            check_labels(labels)
        with self.db.session() as s:
            model = self._model(s, model_ref, lock=True)  # first, as a push takes it
            d = self._deployment(s, deployment_ref, model.id, lock=True)
            if name is not None and name != d.name:
                if DEVELOPMENT in (name, d.name):
                    raise ValidationError(
                        f"deployment name: the name {DEVELOPMENT!r} belongs to the model's "
                        f"development deployment alone; it cannot be renamed to or from it "
                        f"(got {d.name!r} -> {name!r})",
                        field="deployment_name",
                        value=name,
                    )
                taken = s.scalar(
                    select(Deployment.id).where(
                        Deployment.model_id == model.id, Deployment.name == name
                    )
                )
                if taken is not None:
                    raise ConflictError(
                        f"deployment name {name!r} is taken in model {model.name!r} (by "
                        f"deployment {taken}, deleted ones included); choose another",
                        field="deployment_name",
                        value=name,
                    )
                if name != d.id:  # its own id names it either way
                    _refuse_an_ids_name(s, Deployment, name, "deployment_name")
                d.name = name
            if labels is not None:
                d.labels = dict(labels)
            return self._view(s, d)

    def promote(
        self,
        model_ref: str,
        deployment_ref: str,
        env_name: str,
        scale_down_previous: bool | None = None,
    ) -> DeploymentView:
        """Point ``env_name`` at the deployment, or begin the rollout that will; see
        :func:`store.rollouts.roll_or_point` for ``scale_down_previous``."""
        check_environment_name(env_name)
        with self.db.session() as s:
            model = self._model(s, model_ref, lock=True)  # first, as a push takes it
            d = self._deployment(s, deployment_ref, model.id, lock=True)
            if d.desired_state != DesiredState.ACTIVE:
                raise ConflictError(
                    f"deployment {d.name!r} is {d.desired_state}; activate it before promoting",
                    deployment=d.id,
                )
            if d.status in (DeploymentStatus.FAILED, DeploymentStatus.BUILD_FAILED):
                raise ConflictError(
                    f"deployment {d.name!r} is {d.status}: it cannot serve; fix it and "
                    f"re-activate it (`kingpost deployments activate {model.name} {d.name}`), "
                    "then promote it",
                    deployment=d.id,
                    status=str(d.status),
                )
            if d.is_development:
                raise ConflictError(
                    "the development deployment cannot be in an environment; promoting it "
                    "publishes a new deployment from its files "
                    f"(`kingpost deployments promote {model.name} development`)",
                    deployment=d.id,
                )
            self._promote_into(s, model, env_name, d, scale_down_previous)
            s.flush()
            return self._view(s, d)

    def list_environments(self, model_ref: str) -> list[EnvironmentView]:
        with self.db.session() as s:
            model = self._model(s, model_ref)
            rows = s.scalars(
                select(Environment)
                .where(Environment.model_id == model.id)
                .order_by(Environment.name)
            )
            return [_env_view(e) for e in rows]

    def create_environment(self, model_ref: str, env_name: str) -> EnvironmentView:
        check_environment_name(env_name)
        with self.db.session() as s:
            model = self._model(s, model_ref, lock=True)
            exists = s.scalar(
                select(Environment.id).where(
                    Environment.model_id == model.id, Environment.name == env_name
                )
            )
            if exists is not None:
                raise ConflictError(
                    f"environment {env_name!r} already exists", environment=env_name
                )
            e = Environment(id=new_id(12), model_id=model.id, name=env_name)
            s.add(e)
            s.flush()
            return _env_view(e)

    def _environment(self, s: Session, model: Model, env_name: str) -> Environment:
        env = s.scalar(
            select(Environment).where(
                Environment.model_id == model.id, Environment.name == env_name
            )
        )
        if env is None:
            raise NotFoundError(
                f"environment {env_name!r} of model {model.name!r} not found; "
                f"`kingpost environments list {model.name}` shows its environments",
                environment=env_name,
            )
        return env

    def get_environment(self, model_ref: str, env_name: str) -> EnvironmentView:
        with self.db.session() as s:
            return _env_view(self._environment(s, self._model(s, model_ref), env_name))

    def set_promotion_settings(
        self,
        model_ref: str,
        env_name: str,
        settings: Mapping[str, Any] | Callable[[Mapping[str, Any]], Mapping[str, Any]],
    ) -> EnvironmentView:
        """Store an environment's promotion settings (validated by the caller), or what a
        function makes of the stored ones, under the model's lock so that two changes
        made at once both count; the next promotion into it uses them, one under way
        keeps those it began with."""
        with self.db.session() as s:
            env = self._environment(s, self._model(s, model_ref, lock=True), env_name)
            new = settings(dict(env.promotion_settings or {})) if callable(settings) else settings
            env.promotion_settings, env.updated_at = dict(new), utcnow()
            s.flush()
            return _env_view(env)

    # -- rollouts ---------------------------------------------------------------
    def running_rollouts(self) -> list[RolloutView]:
        with self.db.session() as s:
            rows = s.scalars(select(Rollout).where(Rollout.status.in_(RUNNING)))
            return [rollout_view(r) for r in rows]

    def latest_rollout(self, model_ref: str, env_name: str) -> RolloutView | None:
        """The environment's last rollout (running or finished); 404 for an unknown
        model or environment."""
        with self.db.session() as s:
            model = self._model(s, model_ref)
            self._environment(s, model, env_name)
            r = latest(s, model.id, env_name)
            return rollout_view(r) if r is not None else None

    def control_rollout(self, model_ref: str, env_name: str, action: str) -> RolloutView:
        with self.db.session() as s:
            model = self._model(s, model_ref, lock=True)
            self._environment(s, model, env_name)
            r = control(s, model.id, env_name, model.name, action)
            s.flush()
            return rollout_view(r)

    def record_rollout(
        self, rollout_id: str, fields: Mapping[str, Any], seen: tuple[str, str | None]
    ) -> RolloutView | None:
        """The controller's next state of a rollout, as written (None: a user changed it
        since; see :func:`store.rollouts.record`)."""
        with self.db.session() as s:
            r = record(s, rollout_id, fields, seen)
            return rollout_view(r) if r is not None else None

    def routing_snapshot(
        self,
    ) -> tuple[list[ModelView], list[DeploymentView], list[EnvironmentView]]:
        """Everything the controller needs for one reconcile pass, in one transaction."""
        with self.db.session() as s:
            models = [ModelView(m.id, m.name, m.created_at) for m in s.scalars(select(Model))]
            envs = [_env_view(e) for e in s.scalars(select(Environment))]
            deps = [
                _deployment_view(d)
                for d in s.scalars(
                    select(Deployment).where(Deployment.desired_state != DesiredState.DELETED)
                )
            ]
            return models, deps, envs

    # -- secrets ----------------------------------------------------------------
    def set_secret(self, name: str, value: str) -> SecretView:
        check_secret_name(name)
        with self.db.session() as s:
            row = s.get(Secret, name)
            if row is None:
                row = Secret(name=name, ciphertext=self.box.seal(value))
                s.add(row)
            else:
                row.ciphertext, row.updated_at = self.box.seal(value), utcnow()
            s.flush()
            return SecretView(row.name, row.created_at, row.updated_at)

    def list_secrets(self) -> list[SecretView]:
        with self.db.session() as s:
            return [
                SecretView(r.name, r.created_at, r.updated_at)
                for r in s.scalars(select(Secret).order_by(Secret.name))
            ]

    def delete_secret(self, name: str) -> None:
        with self.db.session() as s:
            row = s.get(Secret, name)
            if row is None:
                raise NotFoundError(f"secret {name!r} not found", secret=name)
            s.delete(row)

    def secret_names(self) -> set[str]:
        with self.db.session() as s:
            return set(s.scalars(select(Secret.name)))

    def reveal_secrets(self, names: Iterable[str]) -> dict[str, str]:
        """Decrypt the named secrets (for replicas only); missing names are left out."""
        wanted = list(names)
        with self.db.session() as s:
            if not wanted:
                return {}
            rows = s.scalars(select(Secret).where(Secret.name.in_(wanted)))
            return {r.name: self.box.open(r.name, r.ciphertext) for r in rows}
