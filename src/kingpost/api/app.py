"""The control-plane HTTP API (FastAPI; OpenAPI at ``/docs``).

Every ``/v1`` route but ``/v1/health`` needs ``Authorization: Api-Key <key>``. Errors are
JSON ``{"error": ..., "code": ...}`` with the status of the KingpostError raised.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import re
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool

from kingpost.api.autoscaling import autoscaling_routes, describe, describe_all, environment_out
from kingpost.api.development import development_routes
from kingpost.api.development import promote as promote_deployment
from kingpost.api.engines import engine_routes
from kingpost.api.gpus import check_accelerator, gpu_routes, replica_devices
from kingpost.api.limits import BodyLimit
from kingpost.api.logs import log_routes
from kingpost.api.rollouts import rollout_routes
from kingpost.api.schemas import (
    KEY_TYPES,
    ApiKeyCreated,
    ApiKeyIn,
    ApiKeyOut,
    ApiKeysOut,
    ApiKeyTombstone,
    DeploymentOut,
    DeploymentPatch,
    DeploymentsOut,
    EnvironmentIn,
    EnvironmentOut,
    EnvironmentsOut,
    ModelOut,
    ModelsOut,
    PromoteIn,
    PushIn,
    PushOut,
    ReplicaOut,
    ReplicasOut,
    SecretIn,
    SecretOut,
    SecretsOut,
)
from kingpost.api.webhooks import webhook_routes
from kingpost.config._yaml import format_path
from kingpost.console import console_routes
from kingpost.controller.loop import Controller
from kingpost.controller.specs import missing_secrets, missing_weights_secrets
from kingpost.engines.registry import EngineKind, engine_kind
from kingpost.errors import (
    AuthError,
    ConfigError,
    ForbiddenError,
    KingpostError,
    NotFoundError,
    SecretError,
    ValidationError,
    is_disk_full,
)
from kingpost.packaging import MAX_PROJECT_BYTES, no_space_for_projects, unpack_project
from kingpost.settings import Settings
from kingpost.store import ApiKeyKind, DesiredState, NewDeployment, Store
from kingpost.store.repo import check_labels

if TYPE_CHECKING:
    from kingpost.config import TrussConfig
    from kingpost.console.history import History
    from kingpost.weights import WeightsManager

__all__ = ["ControlPlane", "create_app"]


@dataclass
class ControlPlane:
    settings: Settings
    store: Store
    controller: Controller
    history: History | None = None
    """The console's last hour of request figures (``kingpost server`` samples it)."""


def _api_key(authorization: str | None) -> str:
    if authorization:
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() in ("api-key", "bearer") and key.strip():
            return key.strip()
    raise AuthError("missing API key: send `Authorization: Api-Key <key>`")


def create_app(plane: ControlPlane) -> FastAPI:
    app = FastAPI(title="Kingpost control plane", version="0.1.0")
    app.add_middleware(BodyLimit)

    @app.exception_handler(KingpostError)
    async def _kingpost_error(_: Request, exc: KingpostError) -> JSONResponse:
        return JSONResponse(exc.to_dict(), status_code=exc.http_status)

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        # Logged by the server with its traceback; the caller gets JSON, never plain text.
        return JSONResponse(
            {"error": "internal error; the server's log says more", "code": "internal_error"},
            status_code=500,
        )

    @app.exception_handler(RequestValidationError)
    async def _bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors: list[dict[str, Any]] = []
        for e in exc.errors():
            # loc starts with where the value came from ("body", "query"); a missing body
            # has nothing after it.
            field = ".".join(str(p) for p in e["loc"][1:]) or str(e["loc"][0])
            error = {"field": field, "message": e["msg"]}
            if e["type"] == "json_invalid":  # loc is ("body", character position)
                error = {"field": "body", "message": f"{e['msg']} at character {e['loc'][-1]}"}
            elif e["type"] != "missing" and "input" in e:
                error["value"] = e["input"]  # the value found, as the errors of a push say
            errors.append(error)
        text = "; ".join(
            f"{e['field']}: {e['message']}" + (f", got {e['value']!r}" if "value" in e else "")
            for e in errors
        )
        body: dict[str, Any] = {"error": f"invalid request: {text}", "code": "invalid_request"}
        if len(errors) == 1:  # as a KingpostError names its one field
            body["field"] = errors[0]["field"]
        return JSONResponse({**body, "errors": errors}, status_code=400)

    def auth(authorization: Annotated[str | None, Header()] = None) -> None:
        found = plane.store.find_api_key(_api_key(authorization))
        if found is None:
            raise AuthError("unknown API key")
        if found.kind != ApiKeyKind.ADMIN:
            raise ForbiddenError(
                f"API key {found.prefix!r} is invoke-only: it may call its models through "
                "the gateway, not the management API; use an admin key here",
                api_key_prefix=found.prefix,
            )

    @app.get("/v1/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "table_version": plane.controller.table.version}

    @app.get("/metrics", dependencies=[Depends(auth)], response_class=PlainTextResponse)
    def metrics() -> PlainTextResponse:
        """Prometheus text: the platform, the gateway (every worker) and the replicas."""
        from kingpost.metrics.platform import exposition
        from kingpost.metrics.text import CONTENT_TYPE

        text = exposition(plane.controller, plane.store)
        return PlainTextResponse(text, media_type=CONTENT_TYPE)

    router = APIRouter(prefix="/v1", dependencies=[Depends(auth)])
    _project_routes(router, plane)
    _model_routes(router, plane)
    development_routes(router, plane)
    _secret_routes(router, plane)
    webhook_routes(router, plane)
    _weights_routes(router, plane)
    _venv_routes(router, plane)
    _api_key_routes(router, plane)
    rollout_routes(router, plane)
    autoscaling_routes(router, plane)
    log_routes(router, plane)
    gpu_routes(router, plane)
    engine_routes(router, plane)
    app.include_router(router)
    console_routes(app, plane)  # the web console at /console: pages over this same API
    return app


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _project_routes(router: APIRouter, plane: ControlPlane) -> None:
    projects = plane.settings.projects_dir

    @router.head("/projects/{sha}")
    def has_project(sha: str) -> Response:
        path = projects / sha
        if not _SHA256.fullmatch(sha) or not path.is_dir():
            return Response(status_code=404)
        # A push that found its project here comes next: the disk gc's grace counts anew.
        with contextlib.suppress(OSError):
            os.utime(path)
        return Response(status_code=200)

    @router.put("/projects/{sha}", status_code=201)
    async def upload(sha: str, request: Request) -> dict[str, str]:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_PROJECT_BYTES:
            _too_large(int(declared))
        try:
            projects.mkdir(parents=True, exist_ok=True)
            await _spool_and_unpack(request, projects, sha)
        except OSError as exc:  # the spool: unpack_project translates its own
            if is_disk_full(exc):
                raise no_space_for_projects() from exc
            raise
        return {"project_hash": sha}

    @router.post("/push", response_model=PushOut)
    def push(body: PushIn) -> PushOut:
        return _push(plane, body)


async def _spool_and_unpack(request: Request, projects: Path, sha: str) -> None:
    # Spooled to disk while it is hashed: the archive is never held in memory.
    digest, size = hashlib.sha256(), 0
    with tempfile.NamedTemporaryFile(dir=projects, prefix=".upload-") as spool:
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_PROJECT_BYTES:
                _too_large(size)
            digest.update(chunk)
            await run_in_threadpool(spool.write, chunk)
        if digest.hexdigest() != sha:
            raise ValidationError(
                f"project archive hash mismatch: path says {sha}, "
                f"body hashes to {digest.hexdigest()}",
                field="sha256",
            )
        await run_in_threadpool(spool.flush)
        await run_in_threadpool(unpack_project, Path(spool.name), projects / sha)


def _too_large(size: int) -> None:
    raise ValidationError(
        f"project archive larger than 2 GiB ({size} bytes); move big files to weights",
        field="project",
        value=size,
    )


def _push(plane: ControlPlane, body: PushIn) -> PushOut:
    from kingpost.config import load_config

    app_dir = plane.settings.projects_dir / body.project_hash
    if not app_dir.is_dir():
        raise NotFoundError(
            f"project {body.project_hash} was not uploaded; PUT /v1/projects/{{sha}} first",
            project_hash=body.project_hash,
        )
    check_labels(body.labels)  # before the config is even read
    engine = body.engine or plane.settings.engine
    kind = engine_kind(engine, all_kinds=False)  # 400 naming the choices
    # ConfigError (422) before anything is created
    loaded = load_config(app_dir, engine=engine)
    config = loaded.config
    warnings = list(loaded.warnings)
    check_pushable(plane, config, app_dir, kind, " and push again")
    warnings += check_accelerator(plane, config)  # 422 for devices this host lacks
    if kind.check_at_push:
        plane.controller.engine(engine)  # EngineError now, if e.g. dockerd is unreachable
    model_name = body.model_name or config.model_name
    if not model_name:
        raise ValidationError(
            "model_name: config.yaml has none; send model_name (`kingpost push` sends the "
            "project's folder name)",
            field="model_name",
        )
    environment = body.environment or ("production" if body.promote else None)
    dep = plane.store.create_deployment(
        NewDeployment(
            model_name=model_name,
            project_hash=body.project_hash,
            config=loaded.document(),
            engine=engine,
            name=body.deployment_name,
            labels=body.labels,
            environment=environment,
            min_replicas=body.min_replicas,
            max_replicas=body.max_replicas or max(1, body.min_replicas),
            development=body.development,
        )
    )
    if dep.is_development:  # a replaced one prepares its new project
        plane.controller.builds.prepare_again(dep.id)
    plane.controller.wake()
    model = plane.store.get_model(dep.model_id)
    # A promotion into an environment that serves now is a rollout: it moves there once
    # ready, and the environment's URL is the one to call meanwhile too.
    env = environment or (dep.environments[0] if dep.environments else None)
    path = f"environments/{env}/predict" if env else f"deployment/{dep.id}/predict"
    if dep.is_development:
        path = "development/predict"
    url = f"{plane.settings.gateway_url}/models/{model.id}/{path}"
    return PushOut(
        model=ModelOut.of(model),
        deployment=DeploymentOut.of(dep),
        warnings=warnings,
        predict_url=url,
    )


def check_pushable(
    plane: ControlPlane, config: TrussConfig, app_dir: Path, kind: EngineKind, then: str = ""
) -> None:
    """What a push (and the development deployment's sync) refuses before anything is
    created: weights sources, files the config names, secrets not stored, a server the
    engine cannot run. ``then`` ends the missing-secrets message."""
    _check_weights(config, plane.settings.home)
    _check_project_files(config, app_dir)
    stored = plane.store.secret_names()
    missing = missing_secrets(config, stored)
    if missing:
        raise SecretError(
            f"config.yaml: secrets: {', '.join(missing)} not defined on this server; "
            f"set each with `kingpost secrets set NAME`{then}",
            secrets=missing,
        )
    _check_weights_secrets(config, stored)
    _check_runnable(config, kind)


def _check_runnable(config: TrussConfig, kind: EngineKind) -> None:
    """What the engine cannot run at all (the process engine runs no image, say)."""
    issues = kind.refusals(config)
    if not issues:
        return
    errors = [{"path": format_path(i.path), "message": i.message} for i in issues]
    what = "; ".join(f"{e['path']}: {e['message']}" for e in errors)
    raise ConfigError(f"config.yaml: {what}", errors=errors)


def _check_weights_secrets(config: TrussConfig, stored: set[str]) -> None:
    """The secrets weights are mirrored with: the mirror starts only once the deployment
    exists, and would fail there on a name that is not stored."""
    missing = missing_weights_secrets(config, stored)
    if not missing:
        return
    what = "; ".join(
        f"{path}: secret `{name}` is not defined on this server" for path, name in missing
    )
    raise SecretError(
        f"config.yaml: {what}; set each with `kingpost secrets set NAME` and push again",
        secrets=sorted({name for _, name in missing}),
        errors=[
            {"path": path, "message": f"secret `{name}` is not defined on this server",
             "value": name}
            for path, name in missing
        ],
    )  # fmt: skip


def _project_file_problems(config: TrussConfig, app_dir: Path) -> list[tuple[str, str, str]]:
    """(key path, value, message) for each file the config names that the project lacks:
    the build or the model server would fail on it only after the deployment exists."""
    root = app_dir.resolve()

    def inside(rel: str) -> bool:
        path = (root / rel).resolve()
        return path.is_relative_to(root) and path.is_file()

    problems = []
    name = (config.requirements_file or "").strip()
    if name and not config.no_build and not inside(name):
        problems.append(
            ("requirements_file", config.requirements_file or name,
             f"requirements_file `{name}` is not a file in the project; add the file or "
             "fix the path")
        )  # fmt: skip
    if config.docker_server is None:  # a model class: the server imports this file
        rel = posixpath.join(config.model_module_dir.strip("/"), config.model_class_filename)
        if not inside(rel):
            field = (
                "model_module_dir"
                if "model_module_dir" in config.model_fields_set
                and "model_class_filename" not in config.model_fields_set
                else "model_class_filename"
            )
            problems.append(
                (field, rel, f"the model file `{rel}` is not in the project; add it, or set "
                 "`model_module_dir` and `model_class_filename` to where the model class is")
            )  # fmt: skip
    return problems


def _check_project_files(config: TrussConfig, app_dir: Path) -> None:
    problems = _project_file_problems(config, app_dir)
    if problems:
        raise ConfigError(
            "config.yaml: " + "; ".join(f"{path}: {msg}" for path, _, msg in problems),
            errors=[{"path": p, "message": m, "value": v} for p, v, m in problems],
        )


def _check_weights(config: TrussConfig, home: Path) -> None:
    if not config.weights:
        return
    from kingpost.weights import validate_weights

    errors = validate_weights(config.weights, home)
    if errors:
        lines = "\n".join(f"  {path}: {msg}" for path, msg in errors)
        raise ConfigError(
            f"config.yaml: invalid weights:\n{lines}",
            errors=[{"path": p, "message": m} for p, m in errors],
        )


def _model_routes(router: APIRouter, plane: ControlPlane) -> None:
    store = plane.store

    def changed() -> None:
        plane.controller.wake()

    @router.get("/models", response_model=ModelsOut)
    def list_models() -> ModelsOut:
        return ModelsOut(models=[ModelOut.of(m) for m in store.list_models()])

    @router.get("/models/{model}", response_model=ModelOut)
    def get_model(model: str) -> ModelOut:
        return ModelOut.of(store.get_model(model))

    @router.delete("/models/{model}", response_model=ModelOut)
    def delete_model(model: str) -> ModelOut:
        out = ModelOut.of(store.delete_model(model))
        changed()
        return out

    @router.get("/models/{model}/deployments", response_model=DeploymentsOut)
    def list_model_deployments(model: str) -> DeploymentsOut:
        return DeploymentsOut(deployments=describe_all(plane, store.list_deployments(model)))

    @router.get("/deployments", response_model=DeploymentsOut)
    def list_deployments() -> DeploymentsOut:
        return DeploymentsOut(deployments=describe_all(plane, store.list_deployments()))

    @router.get("/models/{model}/deployments/{dep}", response_model=DeploymentOut)
    def get_deployment(model: str, dep: str) -> DeploymentOut:
        return describe(plane, store.get_deployment(dep, model))

    @router.get("/deployments/{dep}", response_model=DeploymentOut)
    def get_deployment_by_id(dep: str) -> DeploymentOut:
        return describe(plane, store.get_deployment(dep))

    @router.patch("/models/{model}/deployments/{dep}", response_model=DeploymentOut)
    def update_deployment(model: str, dep: str, body: DeploymentPatch) -> DeploymentOut:
        """Rename and/or relabel; what runs is untouched."""
        view = store.update_deployment(dep, model, name=body.name, labels=body.labels)
        return describe(plane, view)

    @router.get("/models/{model}/deployments/{dep}/replicas", response_model=ReplicasOut)
    def list_replicas(model: str, dep: str) -> ReplicasOut:
        """The deployment's replicas now, oldest first (as Baseten's route orders them).
        Kingpost keeps no history of stopped ones: what the engines run is what is listed."""
        view = store.get_deployment(dep, model)
        devices = replica_devices(plane, view.id)
        rows = sorted(
            (r for r in plane.controller.current_replicas() if r.deployment_id == view.id),
            key=lambda r: (r.started_at, r.replica_id),
        )
        return ReplicasOut(
            replicas=[
                ReplicaOut(
                    id=r.replica_id,
                    deployment_id=r.deployment_id,
                    status=r.phase.value.upper(),
                    restarts=r.restarts,
                    message=r.message,
                    started_at=(
                        datetime.fromtimestamp(r.started_at, UTC) if r.started_at else None
                    ),
                    generation=r.generation,
                    address=f"{r.endpoint.host}:{r.endpoint.port}" if r.endpoint else None,
                    gpus=devices.get(r.replica_id, []),
                )
                for r in rows
            ]
        )

    @router.get("/models/{model}/deployments/{dep}/config")
    def get_deployment_config(model: str, dep: str) -> dict[str, Any]:
        """The deployment's config.yaml as parsed at its push (what the web console shows)."""
        return store.get_deployment(dep, model).config

    def desire(model: str, dep: str, state: DesiredState) -> DeploymentOut:
        out = describe(plane, store.set_desired(dep, state, model))
        changed()
        return out

    @router.post("/models/{model}/deployments/{dep}/activate", response_model=DeploymentOut)
    def activate(model: str, dep: str) -> DeploymentOut:
        return desire(model, dep, DesiredState.ACTIVE)

    @router.post("/models/{model}/deployments/{dep}/deactivate", response_model=DeploymentOut)
    def deactivate(model: str, dep: str) -> DeploymentOut:
        return desire(model, dep, DesiredState.INACTIVE)

    @router.delete("/models/{model}/deployments/{dep}", response_model=DeploymentOut)
    def delete(model: str, dep: str) -> DeploymentOut:
        return desire(model, dep, DesiredState.DELETED)

    @router.post("/models/{model}/deployments/{dep}/promote", response_model=DeploymentOut)
    def promote(model: str, dep: str, body: PromoteIn | None = None) -> DeploymentOut:
        """Baseten's promote-to-production; Kingpost's body may name another environment."""
        body = body or PromoteIn()
        down = body.scale_down_previous_production
        out = describe(plane, promote_deployment(plane, model, dep, body.environment, down))
        changed()
        return out

    @router.get("/models/{model}/environments", response_model=EnvironmentsOut)
    def list_environments(model: str) -> EnvironmentsOut:
        envs = store.list_environments(model)
        return EnvironmentsOut(environments=[environment_out(plane, e, envs) for e in envs])

    @router.post("/models/{model}/environments", response_model=EnvironmentOut)
    def create_environment(model: str, body: EnvironmentIn) -> EnvironmentOut:
        """200, as Baseten's create answers."""
        return environment_out(plane, store.create_environment(model, body.name))


def _weights_routes(router: APIRouter, plane: ControlPlane) -> None:
    def manager() -> WeightsManager:
        return plane.controller.builds.weights_manager()

    @router.get("/weights")
    def list_weights() -> list[dict[str, Any]]:
        return [
            {"id": m.id, "source": m.source, "files": len(m.files), "bytes": m.total_bytes}
            for m in manager().list_manifests()
        ]

    @router.get("/deployments/{dep}/weights")
    def weights_status(dep: str) -> dict[str, Any]:
        view = plane.store.get_deployment(dep)
        st = manager().status(view.id)
        return {
            "deployment_id": view.id,
            "state": str(st.state),
            "files_done": st.files_done,
            "files_total": st.files_total,
            "bytes_done": st.bytes_done,
            "bytes_total": st.bytes_total,
            "rate_bytes_per_s": round(st.rate_bytes_per_s),
            "error": st.error,
        }

    @router.post("/weights/gc")
    def weights_gc(budget_bytes: Annotated[int | None, Query(ge=0)] = None) -> dict[str, int]:
        report = manager().gc(budget_bytes)
        return {
            "removed_blobs": report.removed_blobs,
            "removed_bytes": report.removed_bytes,
            "kept_bytes": report.kept_bytes,
        }


def _venv_routes(router: APIRouter, plane: ControlPlane) -> None:
    @router.get("/venvs")
    def list_venvs() -> list[dict[str, Any]]:
        return [
            {
                "hash": v.hash,
                "python": v.python,
                "requirements": list(v.requirements),
                "packages": list(v.packages),
                "custom_server": v.custom_server,
                "ready": v.ready,
                "size_bytes": v.size_bytes,
                "last_used": v.last_used.isoformat() if v.last_used else None,
                "deployments": deployments,
            }
            for v, deployments in plane.controller.builds.venvs()
        ]

    @router.post("/gc")
    def gc_everything() -> dict[str, Any]:
        """Projects, replica directories, environments and weights no deployment uses."""
        disk = plane.controller.builds.gc_disk()
        venvs = plane.controller.builds.gc_venvs()
        weights = plane.controller.builds.weights_manager().gc(None)
        images, image_bytes, skipped = plane.controller.builds.gc_images()
        return {
            "images": {"removed": images, "removed_bytes": image_bytes, "skipped": skipped},
            "projects_and_replicas": {
                "removed": list(disk.removed),
                "removed_bytes": disk.removed_bytes,
                "kept": disk.kept,
                "errors": list(disk.errors),
            },
            "venvs": {
                "removed": list(venvs.removed),
                "removed_bytes": venvs.removed_bytes,
                "kept": venvs.kept,
            },
            "weights": {
                "removed_blobs": weights.removed_blobs,
                "removed_bytes": weights.removed_bytes,
                "kept_bytes": weights.kept_bytes,
            },
        }

    @router.post("/venvs/gc")
    def gc_venvs() -> dict[str, Any]:
        report = plane.controller.builds.gc_venvs()
        return {
            "removed": list(report.removed),
            "removed_bytes": report.removed_bytes,
            "kept": report.kept,
        }


def _secret_routes(router: APIRouter, plane: ControlPlane) -> None:
    store = plane.store

    @router.get("/secrets", response_model=SecretsOut)
    def list_secrets() -> SecretsOut:
        return SecretsOut(secrets=[SecretOut.of(s) for s in store.list_secrets()])

    @router.post("/secrets", response_model=SecretOut)
    def set_secret(body: SecretIn) -> SecretOut:
        out = SecretOut.of(store.set_secret(body.name, body.value))
        plane.controller.wake()
        return out

    @router.delete("/secrets/{name}", status_code=204)
    def delete_secret(name: str) -> Response:
        store.delete_secret(name)
        return Response(status_code=204)


def _api_key_routes(router: APIRouter, plane: ControlPlane) -> None:
    """Baseten's management API for keys: ``/v1/api_keys``, a key named by its prefix."""
    store = plane.store

    @router.get("/api_keys", response_model=ApiKeysOut)
    def list_api_keys() -> ApiKeysOut:
        return ApiKeysOut(keys=[ApiKeyOut.of(k) for k in store.list_api_keys()])

    @router.post("/api_keys", response_model=ApiKeyCreated)  # 200, as Baseten's
    def create_api_key(body: ApiKeyIn) -> ApiKeyCreated:
        name = body.name or "unnamed"  # optional on Baseten; the store keeps a name
        view, key = store.create_api_key(name, KEY_TYPES[body.type], body.model_ids or ())
        plane.controller.routing.publish_keys()
        return ApiKeyCreated(**ApiKeyOut.of(view).model_dump(), api_key=key)

    @router.delete("/api_keys/{api_key_prefix}", response_model=ApiKeyTombstone)
    def revoke_api_key(api_key_prefix: str) -> ApiKeyTombstone:
        view = store.revoke_api_key(api_key_prefix)
        plane.controller.routing.publish_keys()  # the gateways refuse it before this answers
        return ApiKeyTombstone(prefix=view.prefix)
