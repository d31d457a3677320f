"""``kingpost server``: API, controller and gateway in one process tree.

The main process runs the control-plane API (uvicorn) and the controller
thread; the gateway runs as its own process(es), started here, fed with the
routing table over Unix control sockets. Stopping the server (SIGINT/SIGTERM)
stops the gateway and, with the process engine, every replica; the store keeps
every deployment, so the next start brings them back. A control plane that dies
instead (SIGKILL, a crash) leaves the gateway serving its last table, and the next
start adopts it (``gateway_process.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from kingpost.api import ControlPlane, create_app
from kingpost.asyncq.plane import prepare_async_workers
from kingpost.console.history import History
from kingpost.controller.demand import DemandWatcher
from kingpost.controller.loop import Controller
from kingpost.engines._records import records_dir
from kingpost.errors import KingpostError
from kingpost.gateway.stats import GatewayStats
from kingpost.gateway.table import RoutingTable
from kingpost.gateway.tracing import require_sdk, traces_endpoint
from kingpost.gateway_process import (
    GatewayProcess,
    access_log_store,
    ensure_gateway,
    hold_restarting,
    record_path,
)
from kingpost.logstore import Collector, LogSettings
from kingpost.secrets_box import SecretBox, load_or_create_key
from kingpost.settings import Settings
from kingpost.store import Database, Store

__all__ = ["bootstrap", "run_server"]

log = logging.getLogger("kingpost.server")


def bootstrap(
    settings: Settings,
    announce: Callable[[str], None] = print,
    *,
    show_key: bool | None = None,
) -> Store:
    """Create KINGPOST_HOME, migrate the database, and create the admin key once.

    The new key is announced only when ``show_key`` (by default: when stdout is a
    terminal); otherwise only the credentials file is named, so the key does not end up
    in a log that a service manager or a redirect keeps."""
    # Private to this user: the database holds configs (environment variables, inline
    # secret values), and projects, logs and replica copies live here too.
    settings.home.mkdir(mode=0o700, parents=True, exist_ok=True)
    if settings.home.stat().st_mode & 0o077:
        settings.home.chmod(0o700)
    db = Database(settings.db_url)
    db.migrate()
    store = Store(db, SecretBox(load_or_create_key(settings.home, settings.secret_key)))
    if not store.has_api_keys():
        _, key = store.create_api_key("admin")
        path = settings.home / "credentials"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(key + "\n")
        if show_key is None:
            show_key = sys.stdout.isatty()
        if show_key:
            announce(
                f"Created the admin API key (shown once; also saved to {path} for the CLI):"
                f"\n  {key}"
            )
        else:
            announce(
                f"Created the admin API key and saved it to {path} (readable by this user "
                "only); it is not printed because stdout is not a terminal"
            )
    return store


def gateway_sockets(settings: Settings) -> list[Path]:
    from kingpost.gateway import control_socket_paths

    return control_socket_paths(settings.run_dir / "gateway.sock", settings.gateway_workers)


def _start_gateway(settings: Settings, token: str) -> subprocess.Popen[bytes]:
    """Start the gateway, handing it the control token through an inherited pipe: not an
    environment variable or argument, which a replica of the same uid could read. It is
    not bound to this process's life: it outlives a killed control plane, for the next
    one to adopt (``gateway_process.py``)."""
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    read, write = os.pipe()
    os.write(write, token.encode())
    os.close(write)
    cmd = [
        sys.executable,
        "-m",
        "kingpost.gateway",
        "--host",
        settings.gateway_host,
        "--port",
        str(settings.gateway_port),
        "--control-socket",
        str(settings.run_dir / "gateway.sock"),
        "--workers",
        str(settings.gateway_workers),
        "--control-token-fd",
        str(read),
        "--orphan-timeout",
        str(settings.gateway_orphan_timeout),
        "--async-store",  # async routes write to the store (gateway/asyncroutes.py)
        "--orphan-replicas",  # orphaned process replicas leave with it (engines/_records.py)
        str(records_dir(settings.run_dir)),
    ]
    if settings.gateway_metrics_listen:
        cmd += ["--metrics-listen", settings.gateway_metrics_listen]
    log_dir, segment_bytes = access_log_store(settings)  # what the record says, too
    if log_dir:
        cmd += ["--log-dir", log_dir, "--log-segment-bytes", str(segment_bytes)]
    env = {**os.environ, **_async_env(settings)}
    try:
        return subprocess.Popen(cmd, start_new_session=True, pass_fds=(read,), env=env)
    finally:
        os.close(read)


def log_settings(settings: Settings) -> LogSettings:
    return LogSettings(settings.logs_dir, settings.log_max_bytes, settings.log_max_age)


def _async_env(settings: Settings) -> dict[str, str]:
    """The settings the gateway's async routes read, as this process holds them."""
    return {
        "KINGPOST_HOME": str(settings.home),
        "KINGPOST_DATABASE_URL": settings.db_url,
        "KINGPOST_ASYNC_PAYLOAD_LIMIT": str(settings.async_payload_limit),
        "KINGPOST_ASYNC_WEBHOOK_ALLOW_HTTP": str(settings.async_webhook_allow_http).lower(),
        "KINGPOST_ASYNC_JOURNAL_SYNC": str(settings.async_journal_sync).lower(),
    }


def _collector(settings: Settings, store: Store) -> Collector:
    """Replica and build output into the log store (``logstore/collect.py``)."""

    def model_of(deployment_id: str) -> str | None:
        return store.get_deployment(deployment_id).model_id

    return Collector(log_settings(settings), settings.replicas_dir, settings.builds_dir, model_of)


def _restarting(store: Store) -> set[str]:
    """Deployments whose engine does not adopt replicas across a control plane's death:
    the replicas an adopted gateway routes to for them are about to be killed."""
    from kingpost.engines.registry import engine_kind

    def kept(engine: str) -> bool:
        try:
            return engine_kind(engine).adopts_replicas
        except KingpostError:
            return False

    return {d.id for d in store.list_deployments() if not kept(d.engine)}


def _pusher(settings: Settings, token: str, base: int = 0) -> Callable[[RoutingTable], None]:
    """Push each table to every gateway worker. ``base``: the table version an adopted
    gateway holds, which this control plane's versions (counted from 1) are pushed above;
    a gateway keeps a table newer than the one pushed."""
    from kingpost.gateway import push_table

    sockets = gateway_sockets(settings)

    def push(table: RoutingTable) -> None:
        if base:
            table = dataclasses.replace(table, version=table.version + base)
        for sock in sockets:
            push_table(sock, table, token=token)

    return push


def _stats_puller(settings: Settings) -> Callable[[], GatewayStats]:
    from kingpost.gateway import fetch_stats, merge_snapshots

    def pull() -> GatewayStats:
        return merge_snapshots(fetch_stats(sock) for sock in gateway_sockets(settings))

    return pull


def _push_examples(settings: Settings, dirs: Sequence[Path]) -> None:
    from kingpost.client import KingpostClient

    deadline = time.monotonic() + 30
    with KingpostClient.from_settings(settings) as c:
        while time.monotonic() < deadline:
            try:
                c.models()
                break
            except KingpostError:
                time.sleep(0.2)
        for d in dirs:
            try:
                result = c.push(d)
                print(f"pushed {d}: {result['predict_url']}", flush=True)
            except KingpostError as exc:
                print(f"push of {d} failed: {exc}", file=sys.stderr, flush=True)


def _api_server(config: Any) -> Any:
    """A uvicorn server that stops on SIGINT/SIGTERM without re-raising the signal
    (uvicorn re-raises it after shutdown, which would skip stopping the replicas)."""
    import uvicorn

    class _Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            previous = {
                s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)
            }
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return _Server(config)


def run_server(settings: Settings, push_dirs: Sequence[Path] = ()) -> None:
    store = bootstrap(settings)
    if (endpoint := traces_endpoint(os.environ)) is not None:
        require_sdk(endpoint)  # the gateway inherits the variable and traces
    # Only this process, the gateway and its 0600 record in the home hold the token.
    gateway = ensure_gateway(settings, secrets.token_urlsafe(32), _start_gateway)
    try:  # whatever ends this server (a failed start too) stops the gateway
        if gateway.adopted:
            hold_restarting(gateway, _restarting(store), drain_s=10.0)
        _serve(settings, store, gateway, push_dirs)
    finally:
        gateway.stop(record_path(settings))  # a clean stop stops the gateway too
        store.db.close()


def _serve(
    settings: Settings, store: Store, gateway: GatewayProcess, push_dirs: Sequence[Path]
) -> None:
    import uvicorn

    token = gateway.token
    controller = Controller(
        settings,
        store,
        push=_pusher(settings, token, gateway.table_version),
        pull_stats=_stats_puller(settings),
    )
    workers = prepare_async_workers(settings, store, controller)
    history = _console_history(controller, store)
    plane = ControlPlane(settings, store, controller, history)
    config = uvicorn.Config(
        create_app(plane),
        host=settings.api_host,
        port=settings.api_port,
        log_level="warning",
        lifespan="off",
    )
    server = _api_server(config)
    # Whatever ends the server (a failed start too) stops what was started, in reverse.
    with contextlib.ExitStack() as started:
        if settings.metrics_listen:  # first: an address in use costs nothing started
            from kingpost.metrics.listen import serve_metrics
            from kingpost.metrics.platform import exposition

            metrics_server = serve_metrics(
                settings.metrics_listen, lambda: exposition(controller, store)
            )
            started.callback(metrics_server.server_close)
            started.callback(metrics_server.shutdown)
        started.enter_context(history.running())
        collector = _collector(settings, store)
        collector.start()
        started.callback(collector.stop)
        started.callback(_stop_controller, controller)  # also what a failed start began
        controller.start()
        workers.start()
        started.callback(workers.stop)
        demand = DemandWatcher(gateway_sockets(settings), controller.wake_deployment, token=token)
        demand.start()
        started.callback(demand.stop)
        print(
            f"Kingpost API on {settings.client_url}, gateway on {settings.gateway_url}, "
            f"home {settings.home}",
            flush=True,
        )
        if push_dirs:
            threading.Thread(target=_push_examples, args=(settings, push_dirs), daemon=True).start()
        server.run()


def _console_history(controller: Controller, store: Store) -> History:
    """The console's last hour of request figures, sampled from the platform's own
    figures (what ``/metrics`` shows, without the replicas' scrape)."""
    from kingpost.metrics.platform import collect
    from kingpost.metrics.summary import parse
    from kingpost.metrics.text import render

    return History(lambda: parse(render(collect(controller, store))))


def _stop_controller(controller: Controller) -> None:
    for line in controller.stop():
        print(f"kingpost: {line}", flush=True)
