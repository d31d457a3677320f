"""The routing table: everything the gateway needs, pushed by the controller.

The gateway never reads the store. The controller computes a
:class:`RoutingTable` from durable state plus what engines report, and pushes it
whole to every gateway worker whenever it changes (and periodically, so a
restarted worker catches up). ``version`` only grows.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ADMIN",
    "DeploymentRoute",
    "DeploymentState",
    "KeyScope",
    "ModelRoute",
    "RoutingTable",
    "Upstream",
]


class DeploymentState(enum.StrEnum):
    SERVING = "serving"  # active; requests go to ready upstreams (held briefly if none yet)
    WAKING = "waking"  # starting (incl. from zero); requests are held until ready or timeout
    INACTIVE = "inactive"  # deactivated, deleted or failed: 404 JSON error


@dataclass(frozen=True)
class KeyScope:
    """What a valid API key may call through the gateway."""

    models: frozenset[str] | None = None
    """Ids of the models it may call; None: every model (an admin key)."""

    def allows(self, model_id: str | None) -> bool:
        return self.models is None or (model_id is not None and model_id in self.models)


ADMIN = KeyScope()


@dataclass(frozen=True)
class Upstream:
    replica_id: str
    host: str
    port: int
    netns: str | None = None
    """Network namespace file to connect from (process engine isolation)."""


@dataclass(frozen=True)
class DeploymentRoute:
    deployment_id: str
    model_id: str
    predict_path: str
    """Path on the server that ``/predict`` maps to."""
    state: DeploymentState
    upstreams: tuple[Upstream, ...] = ()
    """Ready replicas only."""
    concurrency: int = 1
    """``runtime.predict_concurrency``: requests in flight per replica."""
    queue_limit: int = 1000
    """Requests waiting for a slot across the deployment before 429."""
    hold_timeout_s: float = 60.0
    """How long a request waits for a waking deployment before 503."""
    message: str = ""
    """Why the deployment is inactive (shown in the 404/503 error)."""
    websocket_path: str | None = None
    """Path on the server that ``/websocket`` maps to; ``None``: not a WebSocket deployment."""
    response_timeout_s: float = 600.0
    """How long a replica may take to begin its answer (its head) before the client gets
    a 504 and the replica's connection is dropped; streamed answers may then take longer."""
    name: str = ""
    """The deployment's name (the ``deployment`` label of the gateway's own metrics)."""
    environment: str = ""
    """The environment its metrics are labelled with (``production`` when that one points
    at it, else the first by name; empty for none), as the control plane labels them."""


@dataclass(frozen=True)
class ModelRoute:
    model_id: str
    name: str
    environments: dict[str, tuple[tuple[str, float], ...]] = field(default_factory=dict)
    """Environment name -> (deployment_id, traffic weight) pairs; weights sum to 1.
    One pair normally; two while a rollout shifts traffic."""
    development: str | None = None
    """Deployment id of the development deployment, if any."""


@dataclass(frozen=True)
class RoutingTable:
    version: int = 0
    domain: str = "localhost"
    models: dict[str, ModelRoute] = field(default_factory=dict)
    """By model id."""
    model_names: dict[str, str] = field(default_factory=dict)
    """Model name -> model id, for ``/models/{name}/...``."""
    deployments: dict[str, DeploymentRoute] = field(default_factory=dict)
    """By deployment id."""
    api_key_hashes: frozenset[str] = frozenset()
    """SHA-256 hex digests of the admin API keys: they may call every model."""
    invoke_keys: dict[str, frozenset[str]] = field(default_factory=dict)
    """SHA-256 hex digest of each invoke-only key -> ids of the models it may call."""

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "domain": self.domain,
            "models": {
                mid: {
                    "model_id": m.model_id,
                    "name": m.name,
                    "environments": {k: [list(p) for p in v] for k, v in m.environments.items()},
                    "development": m.development,
                }
                for mid, m in self.models.items()
            },
            "model_names": dict(self.model_names),
            "deployments": {
                did: {
                    "deployment_id": d.deployment_id,
                    "model_id": d.model_id,
                    "predict_path": d.predict_path,
                    "state": d.state.value,
                    "upstreams": [u.__dict__.copy() for u in d.upstreams],
                    "concurrency": d.concurrency,
                    "queue_limit": d.queue_limit,
                    "hold_timeout_s": d.hold_timeout_s,
                    "message": d.message,
                    "websocket_path": d.websocket_path,
                    "response_timeout_s": d.response_timeout_s,
                    "name": d.name,
                    "environment": d.environment,
                }
                for did, d in self.deployments.items()
            },
            "api_key_hashes": sorted(self.api_key_hashes),
            "invoke_keys": {k: sorted(v) for k, v in sorted(self.invoke_keys.items())},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RoutingTable:
        return cls(
            version=int(data["version"]),
            domain=str(data.get("domain", "localhost")),
            models={
                mid: ModelRoute(
                    model_id=m["model_id"],
                    name=m["name"],
                    environments={
                        k: tuple((str(p[0]), float(p[1])) for p in v)
                        for k, v in m.get("environments", {}).items()
                    },
                    development=m.get("development"),
                )
                for mid, m in data.get("models", {}).items()
            },
            model_names=dict(data.get("model_names", {})),
            deployments={
                did: DeploymentRoute(
                    deployment_id=d["deployment_id"],
                    model_id=d["model_id"],
                    predict_path=d["predict_path"],
                    state=DeploymentState(d["state"]),
                    upstreams=tuple(Upstream(**u) for u in d.get("upstreams", [])),
                    concurrency=int(d.get("concurrency", 1)),
                    queue_limit=int(d.get("queue_limit", 1000)),
                    hold_timeout_s=float(d.get("hold_timeout_s", 60.0)),
                    message=str(d.get("message", "")),
                    websocket_path=d.get("websocket_path"),
                    response_timeout_s=float(d.get("response_timeout_s", 600.0)),
                    name=str(d.get("name", "")),
                    environment=str(d.get("environment", "")),
                )
                for did, d in data.get("deployments", {}).items()
            },
            api_key_hashes=frozenset(data.get("api_key_hashes", [])),
            invoke_keys={
                str(k): frozenset(str(m) for m in v) for k, v in data.get("invoke_keys", {}).items()
            },
        )
