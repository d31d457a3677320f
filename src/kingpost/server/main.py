"""``python -m kingpost.server``: serve one Truss model class over HTTP.

Startup: read config.yaml, bind the port (liveness answers at once), then
import, construct and ``load()`` the model on a background thread; readiness
stays 503 until that finishes. A failing load prints its traceback and ends
the process with exit code 1. SIGTERM/SIGINT stop accepting, close open WebSockets
with 1012, let in-flight requests and the models' WebSocket handlers finish (up to a
grace period) and exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

from kingpost.errors import KingpostError
from kingpost.server.app import ModelServer
from kingpost.server.config import load_server_config
from kingpost.server.http import Connection
from kingpost.server.logs import configure_logging, format_user_exception, log_event
from kingpost.server.model import ModelHost, Status
from kingpost.server.placement import loop_scheduled
from kingpost.server.secrets import Secrets

__all__ = ["main", "parse_args", "serve"]

log = logging.getLogger("kingpost.server")

GRACE_SECONDS = 30.0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m kingpost.server", description=__doc__)
    parser.add_argument("--app-dir", type=Path, required=True, help="the Truss project")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument(
        "--listen-fd",
        type=int,
        help="serve on this inherited socket, already bound (to --host and --port) and "
        "listening: the process engine binds it, so no other process can take the port "
        "between its choice and this server's start",
    )
    parser.add_argument(
        "--secrets-dir",
        type=Path,
        default=Path(os.environ.get("KINGPOST_SECRETS_DIR", "/secrets")),
        help="directory of secret files (default: $KINGPOST_SECRETS_DIR or /secrets)",
    )
    return parser.parse_args(argv)


def _new_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed, with ``call_soon_threadsafe`` reporting to the placement rules.

    The loop runs on the thread that creates it. A user method that schedules work on it
    (``run_coroutine_threadsafe``) must stay on worker threads; see placement.py.
    """
    try:
        import uvloop

        base: type[Any] = uvloop.Loop
    except ImportError:
        base = asyncio.SelectorEventLoop
    loop_thread = threading.get_ident()

    class ServerLoop(base):  # type: ignore[misc]
        def call_soon_threadsafe(self, callback: Any, *args: Any, context: Any = None) -> Any:
            loop_scheduled(threading.get_ident() == loop_thread)
            return super().call_soon_threadsafe(callback, *args, context=context)

    loop: asyncio.AbstractEventLoop = ServerLoop()
    return loop


class _Runner:
    def __init__(self, host: ModelHost, loop: asyncio.AbstractEventLoop) -> None:
        self.host = host
        self.loop = loop
        self.server = ModelServer(host)
        self.server.reloader = self.reload
        self._reloading = threading.Lock()
        self.stop = asyncio.Event()
        self.stopped = threading.Event()
        """Set at shutdown, for the threads that outlive load()."""
        self.exit_code = 0

    def _run_coroutine(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def load(self) -> None:
        try:
            self.host.load_blocking(self._run_coroutine)
        except BaseException as exc:
            self.host.status = Status.FAILED
            log.error("model failed to load; exiting", exc_info=exc)
            sys.stderr.write(format_user_exception(exc))
            sys.stderr.flush()
            self.loop.call_soon_threadsafe(self._finish, 1)
            return
        log_event(log, logging.INFO, "model loaded", model_file=str(self.host.config.model_file))
        self.host.watch_environment(self._run_coroutine, self.stopped)

    def reload(self) -> dict[str, Any]:
        """Reload the model in place (one reload at a time): ``ok``, the seconds it took,
        and on failure the error and its traceback; the old model serves on then."""
        started = time.perf_counter()
        with self._reloading:
            if self.host.status != Status.READY:
                return {"ok": False, "error": "the model has not finished loading yet",
                        "traceback": "", "took_s": 0.0}  # fmt: skip
            try:
                self.host.reload_blocking(self._run_coroutine)
            except BaseException as exc:
                log.error("reload failed; the previous model keeps serving", exc_info=exc)
                return {
                    "ok": False,
                    "error": f"{type(exc).__name__}: {exc}",
                    "traceback": format_user_exception(exc),
                    "took_s": time.perf_counter() - started,
                }
        took = time.perf_counter() - started
        log_event(log, logging.INFO, "model reloaded", took_s=round(took, 3))
        return {"ok": True, "error": "", "traceback": "", "took_s": took}

    def _finish(self, code: int) -> None:
        self.exit_code = code
        self.stop.set()

    async def run(self, host: str, port: int, listen_fd: int | None = None) -> int:
        def factory() -> Connection:
            return Connection(self.server.handle, self.loop)

        if listen_fd is not None:
            sock = socket.socket(fileno=listen_fd)
            srv = await self.loop.create_server(factory, sock=sock, backlog=2048)
        else:
            srv = await self.loop.create_server(
                factory, host, port, backlog=2048, reuse_address=True
            )
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self._finish, 0)
        bound = srv.sockets[0].getsockname()[1] if srv.sockets else port
        log_event(log, logging.INFO, "model server listening", host=host, port=bound)
        threading.Thread(target=self.load, name="model-load", daemon=True).start()
        await self.stop.wait()
        self.stopped.set()
        srv.close()
        self.server.close_websockets()
        if self.exit_code == 0:
            await self._drain()
        self.server.close()
        return self.exit_code

    async def _drain(self) -> None:
        deadline = self.loop.time() + GRACE_SECONDS
        # Shutdown only: a short poll keeps the hot path free of bookkeeping.
        server = self.server
        while (server.handling > 0 or server.sessions) and self.loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)


def serve(
    app_dir: Path, host: str, port: int, secrets_dir: Path, listen_fd: int | None = None
) -> int:
    """Run the server until stopped; returns the process exit code."""
    config = load_server_config(app_dir)
    model = ModelHost(config, Secrets(config.secrets, secrets_dir))
    # The loop is not set as the thread's current loop: a sync model method that asks
    # asyncio.get_event_loop() gets a loop of its own, on a worker thread or inline alike.
    loop = _new_loop()
    try:
        return loop.run_until_complete(_Runner(model, loop).run(host, port, listen_fd))
    finally:
        loop.close()


def main(argv: Sequence[str] | None = None) -> int:
    configure_logging()
    args = parse_args(argv)
    try:
        return serve(args.app_dir, args.host, args.port, args.secrets_dir, args.listen_fd)
    except KingpostError as exc:
        log.error(exc.message)
        print(f"error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        log.error("cannot start the model server: %s", exc)
        print(f"error: cannot start the model server: {exc}", file=sys.stderr)
        return 1
