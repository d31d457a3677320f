"""Environments and the routing table: the controller's concern of what callers reach.

:class:`Routing` keeps each deployment's environment file current (a promotion or a
demotion reaches replicas already running: their server watches the file), builds the
routing table from a pass's snapshot, and publishes it to the gateways when it changed
(and every :data:`TABLE_REFRESH_S`, for a gateway that restarted). API keys go out at
once on a change (:meth:`Routing.publish_keys`), under the same lock a pass publishes
under.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING

from kingpost.controller.specs import ServerShape, environment_names
from kingpost.controller.table import build_table
from kingpost.engines import ReplicaStatus
from kingpost.gateway.table import RoutingTable
from kingpost.server.contract import ENVIRONMENT_KEY
from kingpost.store import (
    DeploymentView,
    DesiredState,
    EnvironmentView,
    KeyScopes,
    ModelView,
    Store,
)

if TYPE_CHECKING:
    from kingpost.settings import Settings

__all__ = ["TABLE_REFRESH_S", "Routing"]

log = logging.getLogger(__name__)
TABLE_REFRESH_S = 5.0

Splits = Mapping[tuple[str, str], tuple[tuple[str, float], ...]]


class Routing:
    """See the module's text. ``push`` sends a table to the gateways (None: no gateway
    attached, as in unit tests); ``clock`` is the controller's."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        *,
        push: Callable[[RoutingTable], None] | None,
        clock: Callable[[], float],
    ) -> None:
        self.settings = settings
        self.store = store
        self._push = push
        self._clock = clock
        self._table = RoutingTable()
        self._pushed_at = 0.0
        self._lock = threading.Lock()
        self._told: dict[str, str] | None = None
        """What each deployment's environment file says (None until read from disk)."""
        self.internal_key_hashes: frozenset[str] = frozenset()
        """Admin keys that live only in this process (the async workers'), published
        with the stored ones."""

    @property
    def table(self) -> RoutingTable:
        return self._table

    @property
    def attached(self) -> bool:
        """Whether a gateway receives the tables."""
        return self._push is not None

    def routed(self, deployment_id: str) -> frozenset[str]:
        """The deployment's replicas the last published table sends traffic to."""
        route = self._table.deployments.get(deployment_id)
        return frozenset(u.replica_id for u in route.upstreams) if route else frozenset()

    # -- environments -------------------------------------------------------------------
    def told(self, deployment_id: str) -> str | None:
        """What the deployment's environment file says now (None: nothing written)."""
        return (self._told or {}).get(deployment_id)

    def tell_environments(
        self, deployments: list[DeploymentView], environments: list[EnvironmentView]
    ) -> None:
        """Keep each deployment's environment file current, so a promotion or demotion
        reaches replicas that are already running (their server watches the file)."""
        names = environment_names(environments)
        known = {d.id for d in deployments}
        if self._told is None:
            self._told = {}
            root = self.settings.dynamic_dir
            for path in root.iterdir() if root.is_dir() else ():
                if path.name not in known:  # deleted while the control plane was down
                    shutil.rmtree(path, ignore_errors=True)
                    continue
                with contextlib.suppress(OSError):
                    self._told[path.name] = (path / ENVIRONMENT_KEY).read_text()
        for dep_id in [d for d in self._told if d not in known]:
            del self._told[dep_id]
            shutil.rmtree(self.settings.dynamic_dir / dep_id, ignore_errors=True)
        for dep in deployments:
            if dep.desired_state == DesiredState.ACTIVE:
                self._tell_environment(dep.id, names.get(dep.id))

    def _tell_environment(self, dep_id: str, name: str | None) -> None:
        content = json.dumps({"name": name}) if name is not None else ""
        told = self._told
        assert told is not None
        if told.get(dep_id) == content:
            return
        directory = self.settings.dynamic_dir / dep_id
        try:
            directory.mkdir(parents=True, exist_ok=True)
            tmp = directory / f".{ENVIRONMENT_KEY}.tmp"
            tmp.write_text(content)
            os.replace(tmp, directory / ENVIRONMENT_KEY)  # readers see old or new, whole
        except OSError:
            log.exception("cannot write the environment of deployment %s", dep_id)
            return
        told[dep_id] = content

    # -- the table ----------------------------------------------------------------------
    def publish_pass(
        self,
        *,
        models: list[ModelView],
        deployments: list[DeploymentView],
        environments: list[EnvironmentView],
        ready: Mapping[str, list[ReplicaStatus]],
        shapes: Mapping[str, ServerShape | None],
        splits: Splits,
    ) -> RoutingTable:
        """The table a pass computed, published if it changed; the table now current."""
        settings = self.settings
        with self._lock:  # the keys are read under it: see publish_keys
            table = build_table(
                version=self._table.version,
                domain=settings.domain,
                models=models,
                deployments=deployments,
                environments=environments,
                ready=ready,
                shapes=shapes,
                keys=self._key_scopes(),
                response_timeout_s=settings.gateway_response_timeout,
                private_paths=(str(settings.home),),
                splits=splits,
                hold_timeout_s=settings.gateway_hold_timeout,
                queue_limit=settings.gateway_queue_limit,
            )
            self._publish(table)
        return self._table

    def publish_keys(self) -> None:
        """Push the current API keys to the gateways now, not at the next pass: a revoked
        key stops working before the revocation call answers.

        Keys are read from the store under the same lock a pass publishes under, so a
        pass that read the keys before a revocation cannot push them after it."""
        with self._lock:
            if self._table.version == 0:
                return  # no table yet: the first pass publishes the keys with it
            keys = self._key_scopes()
            self._publish(
                replace(self._table, api_key_hashes=keys.admin, invoke_keys=dict(keys.invoke))
            )

    def _key_scopes(self) -> KeyScopes:
        keys = self.store.api_key_scopes()
        if not self.internal_key_hashes:
            return keys
        return replace(keys, admin=keys.admin | self.internal_key_hashes)

    def _publish(self, table: RoutingTable) -> None:
        changed = self._table.version == 0 or (
            table.to_json() | {"version": 0} != self._table.to_json() | {"version": 0}
        )
        now = self._clock()
        if changed:
            table = RoutingTable(**{**table.__dict__, "version": self._table.version + 1})
            self._table = table
        if self._push is not None and (changed or now - self._pushed_at >= TABLE_REFRESH_S):
            try:
                self._push(self._table)
                self._pushed_at = now
            except Exception as exc:
                log.warning("pushing the routing table failed: %s", exc)
