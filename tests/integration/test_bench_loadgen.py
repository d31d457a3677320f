"""The benchmarks' open-loop load generator (bench/loadgen.c) measures what it claims.

A benchmark figure is only as good as its load generator, so the generator is tested
against servers whose behaviour is known: a steady rate, statuses, chunked bodies,
server-closed connections, and the queueing a too-slow server must show.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from helpers.httpd import QuietHandler, serving
from helpers.platform import free_port, wait_for

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import openloop

pytestmark = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="needs a C compiler"
)


class Handler(QuietHandler):
    disable_nagle_algorithm = True  # headers and body go out as two writes

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path == "/slow":
            time.sleep(0.02)
        if self.path == "/fail":
            self._send(500, b'{"error":"no"}')
        elif self.path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
        elif self.path == "/close":
            self.close_connection = True
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"ok")
        else:
            self._send(200, b'{"ok":true}')


def _run(port: int, path: str, **kw: Any) -> dict[str, Any]:
    request = openloop.http_request(path, b'{"x":1}', {"Content-Type": "application/json"})
    return openloop.run(port, request, warmup=0.2, **kw)


def test_holds_the_asked_rate_and_counts_statuses() -> None:
    with serving(Handler) as server:
        port = server.server_address[1]
        ok = _run(port, "/", rate=200, connections=4, seconds=1.5)
        assert 280 <= ok["completed"] <= 320
        # The warm-up's 0.2 s are answered too, only not timed: what a CPU count must divide by.
        assert ok["completed"] + 25 <= ok["answered"] <= ok["completed"] + 55
        assert ok["non2xx"] == 0 and ok["errors"] == 0
        assert 0 < ok["p50"] <= ok["p99"] <= ok["max"] < 100
        failed = _run(port, "/fail", rate=100, connections=2, seconds=1)
        assert failed["completed"] >= 90 and failed["non2xx"] == failed["completed"]


def test_reads_chunked_bodies_and_reconnects_when_the_server_closes() -> None:
    with serving(Handler) as server:
        port = server.server_address[1]
        chunked = _run(port, "/chunked", rate=100, connections=2, seconds=1)
        assert chunked["completed"] >= 90 and chunked["non2xx"] == 0
        closed = _run(port, "/close", rate=100, connections=2, seconds=1)
        assert closed["completed"] >= 90 and closed["errors"] == 0
        assert closed["reconnects"] >= closed["completed"]


def test_a_server_slower_than_the_rate_shows_its_queue() -> None:
    """20 ms per request on one connection serves 50/s; asked for 100/s, the requests
    that wait for the connection are charged for waiting (no coordinated omission)."""
    with serving(Handler) as server:
        slow = _run(server.server_address[1], "/slow", rate=100, connections=1, seconds=2)
    assert 60 <= slow["completed"] <= 110
    assert slow["backlog"] > 50
    # The requests still waiting at the end count too, at the time they have waited.
    assert slow["unfinished"] >= slow["backlog"]
    assert slow["p99"] > 900  # ms: the last requests due had waited about a second
    assert slow["p50"] > 200


def test_minimal_server_echoes_and_does_the_work_it_is_given(tmp_path: Path) -> None:
    """The model-server benchmark's control must cost what it is calibrated to cost."""
    script = Path(__file__).resolve().parents[2] / "bench" / "minimal_server.py"
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(script), str(port), "--cpu-us", "2000"])
    try:
        url = f"http://127.0.0.1:{port}/v1/models/model:predict"
        wait_for(lambda: _answers(url), 10, "the minimal server")
        before = _cpu_ns(proc.pid)
        with httpx.Client() as c:
            for i in range(20):
                r = c.post(url, content=f'{{"n": {i}}}'.encode())
                assert r.status_code == 200 and r.json() == {"n": i}
        # A fixed amount of work sized to 2 ms when the server started: the machine's speed
        # may drift since, so about 2 ms each, not exactly.
        used_ms = (_cpu_ns(proc.pid) - before) / 20 / 1e6
        assert 1.0 <= used_ms <= 10.0, used_ms
    finally:
        proc.terminate()
        proc.wait()


def _cpu_ns(pid: int) -> int:
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])


def _answers(url: str) -> bool:
    try:
        return httpx.post(url, content=b"{}").status_code == 200
    except httpx.HTTPError:
        return False
