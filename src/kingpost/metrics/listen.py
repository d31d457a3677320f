"""``KINGPOST_METRICS_LISTEN``: ``/metrics`` on an address of its own, with no API key.

For a Prometheus that reaches the control plane over a private network (or the loopback):
the address is the protection, as the API key is on the API port. Only ``GET /metrics``
is answered; anything else is 404.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from kingpost.errors import KingpostError
from kingpost.metrics.text import CONTENT_TYPE

__all__ = ["parse_listen", "serve_metrics"]

log = logging.getLogger(__name__)


def parse_listen(value: str, setting: str = "KINGPOST_METRICS_LISTEN") -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) as a bind address; errors name ``setting``."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(
            f"{setting}: expected HOST:PORT with a port 1-65535, e.g. 127.0.0.1:9464, got {value!r}"
        )
    return host.strip("[]") or "0.0.0.0", int(port)


def serve_metrics(
    listen: str, render: Callable[[], str], setting: str = "KINGPOST_METRICS_LISTEN"
) -> ThreadingHTTPServer:
    """Serve ``render()`` at ``GET /metrics`` on ``listen`` from a daemon thread; the
    caller ``shutdown()``s and ``server_close()``s it. An address it cannot bind raises
    :class:`KingpostError` naming ``setting``. (The control plane's listener, and the
    gateway's own with ``KINGPOST_GATEWAY_METRICS_LISTEN``.)"""
    host, port = parse_listen(listen, setting)

    class _Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] != "/metrics":
                self.send_error(404, "only /metrics is served here")
                return
            try:
                body = render().encode()
                status, ctype = 200, CONTENT_TYPE
            except Exception:
                log.exception("rendering /metrics failed")
                body, status, ctype = b"internal error\n", 500, "text/plain"
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            log.debug("metrics listener: " + format, *args)

    class _Server(ThreadingHTTPServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        daemon_threads = True

    try:
        server = _Server((host, port), _Handler)
    except OSError as exc:
        raise KingpostError(
            f"{setting} {listen}: cannot listen there ({exc.strerror}); "
            "set it to a free address, or unset it"
        ) from exc
    threading.Thread(target=server.serve_forever, name="kingpost-metrics", daemon=True).start()
    return server
