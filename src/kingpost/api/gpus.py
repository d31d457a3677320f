"""GPU routes: ``GET /v1/gpus`` (the inventory, read again, and who holds each device),
and the push check that refuses an accelerator this host can never give."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter

from kingpost.errors import ConfigError

if TYPE_CHECKING:
    from kingpost.api.app import ControlPlane
    from kingpost.config import TrussConfig

__all__ = ["check_accelerator", "gpu_routes", "replica_devices"]


def gpu_routes(router: APIRouter, plane: ControlPlane) -> None:
    @router.get("/gpus")
    def list_gpus() -> dict[str, Any]:
        placer = plane.controller.gpus
        inventory = placer.read()
        holders = {
            uuid: {"replica_id": replica, "deployment_id": dep}
            for replica, (dep, devices) in placer.held().items()
            for uuid in devices
        }
        out = inventory.to_json()
        for device in out["devices"]:
            device["held_by"] = holders.get(device["uuid"])
        out["accelerators"] = plane.settings.accelerators
        out["sharing"] = plane.settings.gpu_sharing
        return out


def replica_devices(plane: ControlPlane, deployment_id: str) -> dict[str, list[str]]:
    """replica id -> the devices it holds (``index:uuid``), for one deployment."""
    index = {d.uuid: d.index for d in plane.controller.gpus.inventory.devices}
    return {
        replica: [f"{index.get(u, '?')}:{u}" for u in devices]
        for replica, (dep, devices) in sorted(plane.controller.gpus.held().items())
        if dep == deployment_id
    }


def check_accelerator(plane: ControlPlane, config: TrussConfig) -> list[str]:
    """At push: a config asking for devices this host lacks entirely is refused (422, with
    the inventory), or with ``KINGPOST_ACCELERATORS=ignore`` runs on CPU, with a warning."""
    accelerator = config.resources.accelerator
    why = plane.controller.gpus.refusal(accelerator)
    if why is None:
        return []
    if plane.settings.accelerators == "ignore":
        return [
            f"resources.accelerator: {why}; its replicas run on CPU "
            "(KINGPOST_ACCELERATORS=ignore on this server)"
        ]
    raise ConfigError(
        f"config.yaml: resources.accelerator `{accelerator}`: {why}; push it to a host that "
        "has them, change `resources.accelerator`, or run the server with "
        "KINGPOST_ACCELERATORS=ignore to run such configs on CPU",
        errors=[{"path": "resources.accelerator", "message": why, "value": str(accelerator)}],
    )
