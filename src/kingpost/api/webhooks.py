"""Webhook signing secrets (``/v1/webhook_secrets``): async inference signs every webhook
delivery with each active secret (``X-BASETEN-SIGNATURE: v1=...``). A secret's value is
shown once, in the answer that creates it; it is stored sealed, as secrets are."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Response

from kingpost.store.asyncq import AsyncQueue

if TYPE_CHECKING:
    from kingpost.api.app import ControlPlane

__all__ = ["webhook_routes"]


def webhook_routes(router: APIRouter, plane: ControlPlane) -> None:
    store = plane.store
    queue = AsyncQueue(store.db)

    @router.post("/webhook_secrets", status_code=201)
    def create_webhook_secret() -> dict[str, Any]:
        view, value = queue.create_webhook_secret(store.box)
        return {"id": view.id, "created_at": view.created_at.isoformat(), "secret": value}

    @router.get("/webhook_secrets")
    def list_webhook_secrets() -> list[dict[str, Any]]:
        return [
            {"id": v.id, "created_at": v.created_at.isoformat()}
            for v in queue.list_webhook_secrets()
        ]

    @router.delete("/webhook_secrets/{secret_id}", status_code=204)
    def delete_webhook_secret(secret_id: str) -> Response:
        queue.delete_webhook_secret(secret_id)
        return Response(status_code=204)
