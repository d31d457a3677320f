"""GPU assignments in the store (migration ``0006``): replica -> the devices it holds."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import delete, select

from kingpost.store.db import Database
from kingpost.store.models import GpuAssignment

__all__ = ["GpuAssignments"]


class GpuAssignments:
    """Durable assignments; the controller keeps a copy (:meth:`load`) and writes through."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def load(self) -> dict[str, tuple[str, tuple[str, ...]]]:
        """replica id -> (deployment id, device UUIDs)."""
        with self.db.session() as s:
            return {
                r.replica_id: (r.deployment_id, tuple(r.devices))
                for r in s.scalars(select(GpuAssignment))
            }

    def assign(self, replica_id: str, deployment_id: str, devices: Iterable[str]) -> None:
        with self.db.session() as s:
            s.merge(
                GpuAssignment(
                    replica_id=replica_id, deployment_id=deployment_id, devices=list(devices)
                )
            )

    def release(self, replica_ids: Iterable[str]) -> None:
        ids = list(replica_ids)
        if not ids:
            return
        with self.db.session() as s:
            s.execute(delete(GpuAssignment).where(GpuAssignment.replica_id.in_(ids)))
