"""``GET /v1/engines``: the engines this server offers, which run now, and, for an engine
that spreads replicas over machines (ray), its nodes and what Kingpost runs on each."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter

from kingpost.engines.registry import engine_kind, engine_names

if TYPE_CHECKING:
    from kingpost.api.app import ControlPlane

__all__ = ["engine_routes"]

log = logging.getLogger(__name__)


def engine_routes(router: APIRouter, plane: ControlPlane) -> None:
    @router.get("/engines")
    def list_engines() -> dict[str, Any]:
        created = plane.controller.created_engines()
        out = []
        for name in engine_names():
            engine = created.get(name)
            nodes = None
            error = ""
            if engine is not None:
                try:
                    nodes = engine.cluster()
                except Exception as exc:  # the engine's own view failed: say so
                    log.warning("engine %s: cluster view failed: %s", name, exc)
                    error = f"cannot read the cluster: {exc}"
            out.append(
                {
                    "name": name,
                    "description": engine_kind(name).description,
                    "running": engine is not None,
                    "default": name == plane.settings.engine,
                    "nodes": nodes,
                    "error": error,
                }
            )
        return {"engines": out}
