"""``python -m kingpost.gateway``: run the gateway (N worker processes with SO_REUSEPORT)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from kingpost.errors import KingpostError
from kingpost.gateway.access import AccessLines
from kingpost.gateway.control import control_socket_paths, read_token_fd
from kingpost.gateway.server import Gateway
from kingpost.gateway.tracing import traces_endpoint

log = logging.getLogger("kingpost.gateway")

if TYPE_CHECKING:
    from kingpost.gateway.asyncroutes import AsyncFront


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _async_front(control: Path) -> AsyncFront:
    """Async inference routes read and write the store named by the settings (the
    environment ``kingpost server`` hands its gateway); accepts go through this worker's
    journal (named after its control socket, stable across restarts)."""
    from kingpost.gateway.asyncroutes import AsyncFront
    from kingpost.settings import Settings

    settings = Settings()
    name = control.name.replace(".", "_")
    return AsyncFront(
        settings.db_url,
        payload_limit=settings.async_payload_limit,
        allow_http=settings.async_webhook_allow_http,
        journal=settings.home / "async" / f"accepts-{name}.journal",
        journal_sync=settings.async_journal_sync,
        counts_refresh=settings.async_counts_refresh,
    )


async def _run(
    host: str,
    port: int,
    control: Path,
    token: str | None,
    reuse_port: bool,
    access_log: bool,
    log_store: tuple[Path, int] | None = None,
    orphan_timeout: float = 0.0,
    async_store: bool = False,
    orphan_replicas: Path | None = None,
) -> None:
    store = None
    if log_store is not None:
        # One writer per worker, named after its control socket (stable across restarts).
        writer = control.name.replace(".", "_")
        store = AccessLines(log_store[0], writer, log_store[1])
    tracer = None
    endpoint = traces_endpoint(os.environ)
    if endpoint is not None:  # OpenTelemetry is imported only then
        from kingpost.gateway.tracing import GatewayTracer

        tracer = GatewayTracer(endpoint)
    gateway = Gateway(access_log_enabled=access_log, access_store=store, tracer=tracer)
    if async_store:
        gateway.async_front = _async_front(control)
    await gateway.start(
        host, port, reuse_port=reuse_port, control_socket=control, control_token=token
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watchdog = None
    if orphan_timeout > 0:
        watchdog = asyncio.ensure_future(_orphan_watch(gateway, orphan_timeout, stop))
    await stop.wait()
    orphaned = watchdog is not None and watchdog.done() and not watchdog.cancelled()
    if watchdog is not None:
        watchdog.cancel()
    await gateway.close()
    if orphaned and orphan_replicas is not None:
        await asyncio.to_thread(_stop_orphaned_replicas, orphan_replicas)


def _stop_orphaned_replicas(records: Path) -> None:
    """No control plane came back to adopt the process engine's replicas either: they
    leave with the gateway (``engines/_records.py``)."""
    from kingpost.engines._records import stop_recorded
    from kingpost.gateway_process import recorded_plane_alive

    if recorded_plane_alive(records.parent / "gateway.json"):  # one started meanwhile
        log.warning("gateway: a control plane runs again: its replicas are left to it")
        return
    for replica_id in stop_recorded(records):
        log.warning("gateway: stopped orphaned replica %s", replica_id)


async def _orphan_watch(gateway: Gateway, limit_s: float, stop: asyncio.Event) -> None:
    """Set ``stop`` once no control plane has pushed a table for ``limit_s`` seconds: a
    gateway whose control plane died and never came back does not serve forever."""
    while True:
        idle = time.monotonic() - gateway.control_seen
        if idle >= limit_s:
            log.warning(
                "gateway: no control plane pushed a table for %.0f s (--orphan-timeout): exiting",
                idle,
            )
            stop.set()
            return
        await asyncio.sleep(min(limit_s - idle, 5.0) + 0.01)


def run_gateway(
    host: str,
    port: int,
    control_socket: Path,
    *,
    reuse_port: bool = False,
    access_log: bool = False,
    control_token: str | None = None,
    log_store: tuple[Path, int] | None = None,
    orphan_timeout: float = 0.0,
    async_store: bool = False,
    orphan_replicas: Path | None = None,
) -> None:
    _install_uvloop()
    asyncio.run(
        _run(
            host,
            port,
            control_socket,
            control_token,
            reuse_port,
            access_log,
            log_store,
            orphan_timeout,
            async_store,
            orphan_replicas,
        )
    )


def _token_pipe(token: str) -> int:
    """A pipe holding ``token``, for a child to inherit: its read end."""
    read, write = os.pipe()
    os.write(write, token.encode())
    os.close(write)
    return read


def _serve_metrics(listen: str, sockets: list[Path]) -> None:
    """``GET /metrics`` on ``listen`` (no API key: the address is the protection), from a
    thread of the gateway's first process: every worker's figures, read from their control
    sockets and merged at each scrape, so it needs no control plane. An address it cannot
    bind ends the gateway with an error naming the setting."""
    from kingpost.metrics.gateway import gateway_exposition
    from kingpost.metrics.listen import serve_metrics

    try:
        serve_metrics(
            listen, lambda: gateway_exposition(sockets), "KINGPOST_GATEWAY_METRICS_LISTEN"
        )
    except KingpostError as exc:
        log.error("gateway: %s", exc)
        sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m kingpost.gateway")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--control-socket", type=Path, required=True)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--reuse-port", action="store_true")
    p.add_argument("--access-log", action="store_true")
    p.add_argument(
        "--async-store",
        action="store_true",
        help="answer async inference routes from the store the KINGPOST_ settings name",
    )
    p.add_argument(
        "--control-token-fd",
        type=int,
        help="an inherited file descriptor to read the control token from (to its end); "
        "table pushes must then carry it",
    )
    p.add_argument(
        "--metrics-listen",
        help="HOST:PORT to serve the gateway's Prometheus /metrics on, with no API key "
        "(`kingpost server` passes KINGPOST_GATEWAY_METRICS_LISTEN)",
    )
    p.add_argument("--log-dir", type=Path, help="keep access lines in this log store")
    p.add_argument("--log-segment-bytes", type=int, default=8 * 1024 * 1024)
    p.add_argument(
        "--orphan-timeout",
        type=float,
        default=0.0,
        help="exit once no table was pushed for this many seconds (0: never); "
        "`kingpost server` passes KINGPOST_GATEWAY_ORPHAN_TIMEOUT",
    )
    p.add_argument(
        "--orphan-replicas",
        type=Path,
        help="on exiting for --orphan-timeout, stop the process engine's replicas recorded "
        "in this directory (`kingpost server` passes {home}/run/replicas)",
    )
    args = p.parse_args(argv)
    store = None if args.log_dir is None else (args.log_dir, args.log_segment_bytes)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    token = read_token_fd(args.control_token_fd) if args.control_token_fd is not None else None
    if args.metrics_listen:  # before the workers: an address in use starts nothing
        _serve_metrics(args.metrics_listen, control_socket_paths(args.control_socket, args.workers))
    if args.workers <= 1:
        run_gateway(
            args.host,
            args.port,
            args.control_socket,
            reuse_port=args.reuse_port,
            access_log=args.access_log,
            control_token=token,
            log_store=store,
            orphan_timeout=args.orphan_timeout,
            async_store=args.async_store,
            orphan_replicas=args.orphan_replicas,
        )
        return
    children = []
    for sock in control_socket_paths(args.control_socket, args.workers):
        fds: tuple[int, ...] = () if token is None else (_token_pipe(token),)
        cmd = [
            sys.executable,
            "-m",
            "kingpost.gateway",
            "--host",
            args.host,
            "--port",
            str(args.port),
            "--control-socket",
            str(sock),
            "--reuse-port",
            "--orphan-timeout",
            str(args.orphan_timeout),
        ] + (["--access-log"] if args.access_log else [])
        if store is not None:
            cmd += ["--log-dir", str(store[0]), "--log-segment-bytes", str(store[1])]
        cmd += ["--async-store"] if args.async_store else []
        if args.orphan_replicas is not None:
            cmd += ["--orphan-replicas", str(args.orphan_replicas)]
        cmd += [arg for fd in fds for arg in ("--control-token-fd", str(fd))]
        children.append(subprocess.Popen(cmd, pass_fds=fds))
        for fd in fds:
            os.close(fd)

    def forward(sig: int, _frame: object) -> None:
        for child in children:
            child.send_signal(sig)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = [child.wait() for child in children]
    os._exit(max(codes))


if __name__ == "__main__":
    main()
