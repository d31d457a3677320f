"""Async workers wired into a control plane: their key, their view of capacity, the
autoscaler's backlog input and the webhook secrets (``kingpost server`` calls
:func:`start_async_workers`)."""

from __future__ import annotations

import secrets
from datetime import timedelta
from typing import TYPE_CHECKING

from kingpost.asyncq.worker import AsyncWorkers, Capacity, WorkerSettings
from kingpost.gateway.table import DeploymentState
from kingpost.store.asyncq import AsyncQueue
from kingpost.store.repo import hash_api_key

if TYPE_CHECKING:
    from kingpost.controller.loop import Controller
    from kingpost.settings import Settings
    from kingpost.store.repo import Store

__all__ = ["prepare_async_workers"]


def prepare_async_workers(settings: Settings, store: Store, controller: Controller) -> AsyncWorkers:
    """Workers for ``controller``'s deployments. Call before ``controller.start()`` (its
    first table must carry the workers' key), and ``start()`` them after."""
    key = "kp_async_" + secrets.token_urlsafe(32)  # in memory only: never stored
    controller.routing.internal_key_hashes = frozenset({hash_api_key(key)})
    queue = AsyncQueue(store.db)

    def capacity() -> dict[str, Capacity]:
        table = controller.table
        return {
            dep_id: Capacity(
                model_id=route.model_id,
                ready=len(route.upstreams),
                concurrency=route.concurrency,
                runnable=route.state != DeploymentState.INACTIVE,
            )
            for dep_id, route in table.deployments.items()
        }

    def backlog(depths: dict[str, int]) -> None:
        controller.scaler.backlog = depths

    worker_settings = WorkerSettings(
        gateway_url=settings.gateway_local_url,
        key=key,
        share=settings.async_share,
        retention=timedelta(seconds=settings.async_result_retention),
        webhook_attempts=settings.async_webhook_attempts,
        webhook_initial_delay_s=settings.async_webhook_initial_delay,
        own_ports=(settings.api_port, settings.gateway_port),
        # As often as the autoscaler samples it, and at least twice a second.
        count_every_s=min(settings.reconcile_interval, 0.5),
    )
    return AsyncWorkers(
        queue,
        worker_settings,
        capacity=capacity,
        backlog=backlog,
        webhook_secrets=lambda: queue.webhook_secrets(store.box),
    )
