"""A real HTTP upstream for gateway tests (stdlib ThreadingHTTPServer in a thread)."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from helpers.httpd import QuietHandler, serving


class Upstream:
    def __init__(self) -> None:
        self.gate = threading.Event()
        self.release = threading.Event()
        """Lets ``/held`` requests answer: a slot held for as long as a test needs."""
        self.requests = 0
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.server_address[1])


def _handler(up: Upstream) -> type[BaseHTTPRequestHandler]:
    class Handler(QuietHandler):
        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                out = b""
                while True:
                    size = int(self.rfile.readline().strip(), 16)
                    if size == 0:
                        self.rfile.readline()
                        return out
                    out += self.rfile.read(size)
                    self.rfile.readline()
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def _route(self) -> None:
            with up.lock:
                up.requests += 1
            url = urlparse(self.path)
            q = parse_qs(url.query)
            body = self._body()
            if url.path == "/echo":
                self._send(200, body, self.headers.get("Content-Type", "application/octet-stream"))
            elif url.path == "/inspect":
                seen = {
                    "path": self.path,
                    "method": self.command,
                    "request_id": self.headers.get("X-Baseten-Request-Id"),
                    "authorization": self.headers.get("Authorization"),
                    "header_names": [k.lower() for k in self.headers],
                    "length": len(body),
                    "sha256": hashlib.sha256(body).hexdigest(),
                }
                self._send(200, json.dumps(seen).encode())
            elif url.path == "/slow":
                time.sleep(float(q.get("s", ["0.3"])[0]))
                self._send(200, b'{"slow": true}')
            elif url.path == "/held":
                up.release.wait(30)
                self._send(200, b'{"held": true}')
            elif url.path == "/gated-stream":
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for i in range(2):
                    event = f"data: {i}\n\n".encode()
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
                    self.wfile.flush()
                    if i == 0 and not up.gate.wait(10):
                        return  # the client never saw chunk 0: the gateway buffered
                self.wfile.write(b"0\r\n\r\n")
            elif url.path == "/sse":
                n = int(q.get("n", ["100"])[0])
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for i in range(n):
                    event = f"data: {i}\n\n".encode()
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
                self.wfile.write(b"0\r\n\r\n")
            elif url.path == "/teapot":
                self._send(418, b"I'm a teapot", "text/plain")
            else:
                self._send(404, b'{"detail": "Not Found"}')

        do_GET = do_POST = do_PUT = do_DELETE = _route

    return Handler


@contextmanager
def upstream() -> Iterator[Upstream]:
    up = Upstream()
    with serving(_handler(up)) as server:
        up.server = server
        try:
            yield up
        finally:
            up.gate.set()
            up.release.set()
