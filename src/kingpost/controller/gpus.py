"""The controller's side of GPU placement: the inventory, and who holds which device.

:func:`kingpost.gpus.place` decides; :class:`GpuPlacer` keeps what it decides from.
Durable: the assignments (store table ``gpu_assignments``, migration ``0006``), written
before a replica starts and removed once no engine reports it live, so a restarted control
plane re-adopts the devices of the replicas an engine kept (docker). Soft: the inventory,
read when the controller starts and whenever someone asks (``kingpost gpus``), and the
copy of the assignments (loaded at the first pass).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection, Iterable

from kingpost.config import Accelerator
from kingpost.gpus import (
    Inventory,
    InventorySource,
    Placed,
    Request,
    normalize_names,
    place,
    source_for,
    unsatisfiable,
)
from kingpost.settings import Settings
from kingpost.store.db import Database
from kingpost.store.gpus import GpuAssignments

__all__ = ["Devices", "GpuPlacer", "Wait"]

log = logging.getLogger(__name__)

Devices = tuple[str, ...] | None
"""What a replica spec's ``gpus`` gets (see :attr:`ReplicaSpec.gpus`)."""


class Wait(str):
    """Why a replica cannot be placed now (it waits; the deployment's message says so)."""


class GpuPlacer:
    def __init__(self, settings: Settings, db: Database, source: InventorySource | None) -> None:
        self.settings = settings
        self._source = source or source_for(settings.fake_gpus)
        self._names = normalize_names(settings.accelerator_names)
        self._store = GpuAssignments(db)
        self._held: dict[str, tuple[str, tuple[str, ...]]] | None = None
        self._lock = threading.Lock()
        self._missed: dict[str, float] = {}
        """Replicas holding devices that no engine reported since (first missed at)."""
        self._started = False
        self.inventory = Inventory()

    def read(self) -> Inventory:
        """Read the host's devices again (a failure reads as none, with the reason)."""
        try:
            found = self._source()
        except Exception as exc:
            log.warning("reading the GPU inventory failed: %s", exc)
            found = Inventory(note=f"reading the inventory failed: {exc}")
        self.inventory = found
        return found

    def held(self) -> dict[str, tuple[str, tuple[str, ...]]]:
        """replica id -> (deployment id, device UUIDs), for the replicas that hold some."""
        with self._lock:
            if self._held is None:
                self._held = self._store.load()
            return dict(self._held)

    def release_gone(
        self, live: Iterable[str], now: float, grace: float, keep: Collection[str] = ()
    ) -> None:
        """Free the devices of replicas no engine reports live any more, ``grace`` seconds
        after they were first missed (an engine stops reporting a replica when asked to
        stop it, and its process may hold the device until it has exited: the stop grace
        period). At the first call (a control plane that starts) there is nothing to wait
        for: whatever an earlier run left is gone or adopted by then. Replicas of the
        deployments in ``keep`` (whose engine could not be asked) count as live."""
        held = self.held()
        alive = set(live) | {r for r, (dep, _) in held.items() if dep in keep}
        for r in [r for r in self._missed if r in alive or r not in held]:
            del self._missed[r]
        missing = [r for r in held if r not in alive]
        for r in missing:
            self._missed.setdefault(r, now)
        if self._started:
            missing = [r for r in missing if now - self._missed[r] >= grace]
        self._started = True
        if not missing:
            return
        self._store.release(missing)
        with self._lock:
            for r in missing:
                (self._held or {}).pop(r, None)
                self._missed.pop(r, None)
        log.info("released the devices of gone replica(s) %s", ", ".join(sorted(missing)))

    def pending(self, deployment_id: str) -> int:
        """The deployment's gone replicas whose devices are not released yet (their grace
        runs): a rollout counts them as still draining."""
        held = self.held()
        return sum(1 for r in self._missed if r in held and held[r][0] == deployment_id)

    def release(self, replica_id: str) -> None:
        self._store.release([replica_id])
        with self._lock:
            (self._held or {}).pop(replica_id, None)

    def refusal(self, accelerator: Accelerator | None) -> str | None:
        """Why a config asking for ``accelerator`` can never run here (push refuses it)."""
        if accelerator is None:
            return None
        return unsatisfiable(accelerator, self.inventory, self._names)

    def wait_reason(self, accelerator: Accelerator | None) -> str | None:
        """Why one more replica asking for ``accelerator`` would wait now (``None``: it
        would be placed). Decides nothing and records nothing."""
        if accelerator is None or self._cpu_instead(accelerator):
            return None
        devices = {r: d for r, (_, d) in self.held().items()}
        got = place([Request("?", accelerator)], self.inventory, devices, names=self._names,
                    share=self.settings.gpu_sharing)[0]  # fmt: skip
        return None if isinstance(got, Placed) else got.reason

    def _cpu_instead(self, accelerator: Accelerator) -> bool:
        return (
            self.settings.accelerators == "ignore"
            and unsatisfiable(accelerator, self.inventory, self._names) is not None
        )

    def devices_for(
        self, deployment_id: str, replica_id: str, accelerator: Accelerator | None
    ) -> Devices | Wait:
        """The devices a new replica gets, recorded as held before it starts; or why it
        waits. A replica that asks for none sees none (``()``) where the host has GPUs."""
        hide: Devices = () if self.inventory.placeable else None
        if accelerator is None:
            return hide
        if self._cpu_instead(accelerator):
            log.warning(
                "deployment %s asks for %s, which this host cannot give (%s); its replica "
                "runs on CPU as KINGPOST_ACCELERATORS=ignore says",
                deployment_id, accelerator, self.refusal(accelerator),
            )  # fmt: skip
            return hide
        devices = {r: d for r, (_, d) in self.held().items()}
        got = place([Request(replica_id, accelerator)], self.inventory, devices,
                    names=self._names, share=self.settings.gpu_sharing)[0]  # fmt: skip
        if not isinstance(got, Placed):
            return Wait(got.reason)
        self._store.assign(replica_id, deployment_id, got.devices)
        with self._lock:
            if self._held is not None:
                self._held[replica_id] = (deployment_id, got.devices)
        return got.devices
