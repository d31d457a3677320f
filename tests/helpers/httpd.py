"""What the test servers share: a quiet HTTP/1.1 handler and a threaded server in the background."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class QuietHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: object) -> None:
        pass

    def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send_bytes(self, data: bytes, *, cut: bool = False) -> None:
        """Send ``data``, or the part its ``Range: bytes=a-b`` header asks for (206).
        With ``cut``, stop halfway and close, as a dropped connection would."""
        header = self.headers.get("Range")
        first, last = byte_range(header, len(data))
        body = data[first:last]
        self.send_response(206 if header else 200)
        if header:
            self.send_header("Content-Range", f"bytes {first}-{last - 1}/{len(data)}")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if cut:
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


def byte_range(header: str | None, size: int) -> tuple[int, int]:
    """``[first, last)`` of a ``Range: bytes=a-b`` (or ``a-``) header; the whole without one."""
    if not header:
        return 0, size
    a, _, b = header.removeprefix("bytes=").partition("-")
    return int(a), (int(b) + 1 if b else size)


@contextmanager
def serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
