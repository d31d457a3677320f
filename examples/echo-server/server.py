"""A tiny stdlib-only HTTP server for Kingpost's custom-server example and tests.

POST /predict      echoes the JSON body back as {"echo": ...}
GET  /stream?n=N   N server-sent events, one every 20 ms
GET  /env          what the replica sees: env vars, uid, pid, secrets, writability
GET  /files?dir=D  files under D (weights mounts) and whether D is writable
GET  /health       200 "ok"
anything else      404 from this server
"""

from __future__ import annotations

import json
import os
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

PORT = 8000
SECRETS = Path(os.environ.get("KINGPOST_SECRETS_DIR", "/secrets"))


def _secrets() -> tuple[dict[str, str], bool]:
    values: dict[str, str] = {}
    if SECRETS.is_dir():
        for item in sorted(SECRETS.iterdir()):
            values[item.name] = item.read_text()
    try:
        (SECRETS / "probe-write").write_text("x")
        writable = True
    except OSError:
        writable = False
    return values, writable


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; with Nagle's algorithm on, the body waits for
    # the client's delayed ACK of the headers: ~40 ms per request on a kept-alive connection.
    disable_nagle_algorithm = True

    def log_message(self, fmt: str, *args: object) -> None:
        pass

    def _json(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        url = urlparse(self.path)
        if url.path == "/health":
            self._json(200, "ok")
        elif url.path == "/env":
            secrets, writable = _secrets()
            self._json(
                200,
                {
                    "env": dict(os.environ),
                    "uid": os.getuid(),
                    "pid": os.getpid(),
                    "cwd": os.getcwd(),
                    "secrets": secrets,
                    "secrets_writable": writable,
                },
            )
        elif url.path == "/files":
            root = Path(parse_qs(url.query).get("dir", ["."])[0])
            files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
            try:
                (root / "probe-write").write_text("x")
                writable = True
            except OSError:
                writable = False
            self._json(200, {"files": files, "writable": writable})
        elif url.path == "/stream":
            n = int(parse_qs(url.query).get("n", ["10"])[0])
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(n):
                event = f"data: {json.dumps({'i': i})}\n\n".encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
                self.wfile.flush()
                time.sleep(0.02)
            self.wfile.write(b"0\r\n\r\n")
        else:
            self._json(404, {"detail": "Not Found"})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if urlparse(self.path).path != "/predict":
            self._json(404, {"detail": "Not Found"})
            return
        try:
            body = json.loads(raw or b"null")
        except ValueError:
            self._json(400, {"error": "body is not JSON"})
            return
        self._json(200, {"echo": body, "greeting": os.environ.get("GREETING")})


if __name__ == "__main__":
    ThreadingHTTPServer.allow_reuse_address = True
    ThreadingHTTPServer(("0.0.0.0", PORT), Handler).serve_forever()
