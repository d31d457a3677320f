"""``python -m kingpost.gateway``: run the gateway (N worker processes with SO_REUSEPORT)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from kingpost.gateway.control import control_socket_paths, read_token_fd
from kingpost.gateway.server import Gateway

if TYPE_CHECKING:
    from kingpost.gateway.asyncroutes import AsyncFront


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _async_front() -> AsyncFront:
    """Async inference routes read and write the store named by the settings (the
    environment ``kingpost server`` hands its gateway)."""
    from kingpost.gateway.asyncroutes import AsyncFront
    from kingpost.settings import Settings

    settings = Settings()
    return AsyncFront(
        settings.db_url,
        payload_limit=settings.async_payload_limit,
        allow_http=settings.async_webhook_allow_http,
    )


async def _run(
    host: str,
    port: int,
    control: Path,
    token: str | None,
    reuse_port: bool,
    access_log: bool,
    async_store: bool = False,
) -> None:
    gateway = Gateway(access_log_enabled=access_log)
    if async_store:
        gateway.async_front = _async_front()
    await gateway.start(
        host, port, reuse_port=reuse_port, control_socket=control, control_token=token
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await gateway.close()


def run_gateway(
    host: str,
    port: int,
    control_socket: Path,
    *,
    reuse_port: bool = False,
    access_log: bool = False,
    control_token: str | None = None,
    async_store: bool = False,
) -> None:
    _install_uvloop()
    asyncio.run(
        _run(host, port, control_socket, control_token, reuse_port, access_log, async_store)
    )


def _token_pipe(token: str) -> int:
    """A pipe holding ``token``, for a child to inherit: its read end."""
    read, write = os.pipe()
    os.write(write, token.encode())
    os.close(write)
    return read


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
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    token = read_token_fd(args.control_token_fd) if args.control_token_fd is not None else None
    if args.workers <= 1:
        run_gateway(
            args.host,
            args.port,
            args.control_socket,
            reuse_port=args.reuse_port,
            access_log=args.access_log,
            control_token=token,
            async_store=args.async_store,
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
        ] + (["--access-log"] if args.access_log else [])
        cmd += ["--async-store"] if args.async_store else []
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
