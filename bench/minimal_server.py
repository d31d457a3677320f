"""The least a Python HTTP/1.1 server can do per request, plus a fixed CPU cost.

uvloop and httptools, no routing, no JSON, no logging: each request's body comes back
as the response. ``--cpu-us N`` burns N microseconds of this thread's CPU time per
request, so the server can be given the same CPU cost per request as the server under
test and show what queueing alone does to latency at a given share of its own peak on
this machine.

    python bench/minimal_server.py PORT [--cpu-us N]
"""

from __future__ import annotations

import argparse
import asyncio
import time

import httptools
import uvloop


class _Echo(asyncio.Protocol):
    def __init__(self, cpu_ns: int) -> None:
        self.cpu_ns = cpu_ns
        self.body: list[bytes] = []
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.cpu_ns:
            until = time.thread_time_ns() + self.cpu_ns
            while time.thread_time_ns() < until:
                pass
        body, self.body = b"".join(self.body), []
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
            % (len(body), body)
        )


async def _serve(port: int, cpu_ns: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Echo(cpu_ns), "127.0.0.1", port)
    await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("port", type=int)
    parser.add_argument("--cpu-us", type=float, default=0.0)
    args = parser.parse_args()
    uvloop.run(_serve(args.port, int(args.cpu_us * 1000)))


if __name__ == "__main__":
    main()
