"""From a stored deployment to what engines and the gateway need.

Pure functions of the parsed config: which kind of server, which port, which
paths, which probes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kingpost.engines.base import Probes, ReplicaSpec, ServerKind, WeightMount

if TYPE_CHECKING:
    from kingpost.config import TrussConfig
    from kingpost.store import EnvironmentView

__all__ = [
    "MODEL_SERVER_PORT",
    "ServerShape",
    "environment_names",
    "missing_secrets",
    "missing_weights_secrets",
    "replica_secrets",
    "replica_spec",
    "server_shape",
]

MODEL_SERVER_PORT = 8080
MODEL_PREDICT_PATH = "/v1/models/model:predict"
MODEL_READY_PATH = "/v1/models/model"
MODEL_WEBSOCKET_PATH = "/v1/websocket"
PROBE_PERIOD_S = 1.0
CUSTOM_SERVER_CONCURRENCY = 256


@dataclass(frozen=True)
class ServerShape:
    kind: ServerKind
    server_port: int
    predict_path: str
    probes: Probes
    command: str | None
    concurrency: int
    websocket_path: str | None = None
    """Where ``.../websocket`` goes on the server; ``None`` unless the config's
    ``runtime.transport.kind`` is ``websocket``."""


def _probes(config: TrussConfig, readiness: str, liveness: str) -> Probes:
    hc = config.runtime.health_checks
    delay = float(hc.restart_check_delay_seconds or 0)
    restart_after = float(hc.restart_threshold_seconds or 1800)
    stop_traffic_after = float(hc.stop_traffic_threshold_seconds or 3)
    return Probes(
        readiness_path=readiness,
        liveness_path=liveness,
        initial_delay_s=delay,
        period_s=PROBE_PERIOD_S,
        readiness_failure_threshold=max(1, round(stop_traffic_after / PROBE_PERIOD_S)),
        liveness_failure_threshold=max(1, round(restart_after / PROBE_PERIOD_S)),
        startup_timeout_s=float(hc.startup_threshold_seconds or 1800),
    )


def missing_secrets(config: TrussConfig, stored: set[str]) -> list[str]:
    """Declared secrets with no stored value and no inline default (``name: null``).

    A secret given a value in config.yaml works, as in Truss, with the stored value
    winning; config loading warns to move such values into the secret store.
    """
    return sorted(n for n, v in (config.secrets or {}).items() if v is None and n not in stored)


_SECRET_SCHEMES = frozenset({"hf", "s3", "r2", "gs"})
"""Weights schemes whose mirror reads the entry's secret (``weights/sources.py``)."""


def missing_weights_secrets(config: TrussConfig, stored: set[str]) -> list[tuple[str, str]]:
    """(key path, name) of each weights secret the mirror would read and cannot find.

    The mirror reads only the secret store (an inline ``secrets:`` default never reaches
    it), so unlike :func:`missing_secrets` a value in config.yaml does not count. A
    model_cache Hub entry's ``runtime_secret_name`` is optional by design: without it the
    repository is fetched without a token, as on Truss.
    """
    missing = []
    for i, entry in enumerate(config.weights):
        name = entry.secret_name
        if not name or name in stored or entry.scheme not in _SECRET_SCHEMES:
            continue
        origin = getattr(entry, "origin", None)  # a model_cache item (DerivedWeights)
        if origin is not None:
            if not getattr(entry, "secret_optional", False):
                missing.append((f"{origin}.runtime_secret_name", name))
        elif entry.auth is not None and entry.auth.auth_secret_name:
            missing.append((f"weights[{i}].auth.auth_secret_name", name))
        else:
            missing.append((f"weights[{i}].auth_secret_name", name))
    return missing


def replica_secrets(config: TrussConfig, stored: dict[str, str]) -> dict[str, str]:
    """The secret files a replica gets: stored values, and for a custom server (which
    knows only the files) the config's inline defaults of the rest.

    A model class gets only the stored ones: its server reads the defaults from
    config.yaml itself, so that a ``TRUSS_SECRET_<name>`` variable can override a
    default, as in Truss (file, then variable, then default)."""
    if config.docker_server is None:
        return dict(stored)
    inline = {n: str(v) for n, v in (config.secrets or {}).items() if v is not None}
    return {**inline, **stored}


def server_shape(config: TrussConfig) -> ServerShape:
    concurrency = max(1, int(config.runtime.predict_concurrency or 1))
    websocket = config.runtime.transport.kind == "websocket"  # a TransportKind (StrEnum)
    ds = config.docker_server
    if ds is not None:
        if "predict_concurrency" not in config.runtime.model_fields_set:
            # A custom server (vLLM, TEI…) batches on its own; Truss's default of 1 is
            # for model classes. Only an explicit value limits requests per replica.
            concurrency = CUSTOM_SERVER_CONCURRENCY
        readiness = ds.readiness_endpoint or "/"
        return ServerShape(
            kind=ServerKind.CUSTOM_SERVER,
            server_port=int(ds.server_port or 8000),
            predict_path=ds.predict_endpoint or "/",
            probes=_probes(config, readiness, ds.liveness_endpoint or readiness),
            command=ds.start_command,
            concurrency=concurrency,
            # As Truss's proxy for custom servers: /v1/websocket -> predict_endpoint.
            websocket_path=(ds.predict_endpoint or "/") if websocket else None,
        )
    return ServerShape(
        kind=ServerKind.MODEL_CLASS,
        server_port=MODEL_SERVER_PORT,
        predict_path=MODEL_PREDICT_PATH,
        probes=_probes(config, MODEL_READY_PATH, "/"),
        command=None,
        concurrency=concurrency,
        websocket_path=MODEL_WEBSOCKET_PATH if websocket else None,
    )


def replica_spec(
    *,
    replica_id: str,
    deployment_id: str,
    model_id: str,
    model_name: str,
    app_dir: Path,
    config: TrussConfig,
    env: dict[str, str],
    secrets: dict[str, str],
    weights: tuple[WeightMount, ...] = (),
    python_executable: str | None = None,
    image: str | None = None,
    dynamic_config_dir: Path | None = None,
    generation: int = 0,
) -> ReplicaSpec:
    shape = server_shape(config)
    ds = config.docker_server
    return ReplicaSpec(
        replica_id=replica_id,
        deployment_id=deployment_id,
        model_id=model_id,
        model_name=model_name,
        kind=shape.kind,
        app_dir=app_dir,
        server_port=shape.server_port,
        predict_path=shape.predict_path,
        probes=shape.probes,
        command=shape.command,
        env=env,
        secrets=secrets,
        weights=weights,
        run_as_user_id=ds.run_as_user_id if ds is not None else None,
        python_executable=python_executable,
        image=image,
        config=config,
        dynamic_config_dir=dynamic_config_dir,
        generation=generation,
    )


def environment_names(environments: Iterable[EnvironmentView]) -> dict[str, str]:
    """The environment each deployment is told it serves (deployment id -> name).

    A deployment promoted to several environments is told ``production`` if it is one
    of them, else the first by name: a model has one ``environment`` at a time.
    """
    names: dict[str, str] = {}
    for env in sorted(environments, key=lambda e: (e.name != "production", e.name)):
        if env.deployment_id is not None:
            names.setdefault(env.deployment_id, env.name)
    return names
