"""The least a Python HTTP/1.1 server can do per request, plus a fixed CPU cost.

uvloop and httptools, no routing, no JSON, no logging: each request's body comes back
as the response. ``--cpu-us N`` adds a fixed amount of Python work per request, sized at
startup to take N microseconds of CPU, so the server can be given the same cost per
request as the server under test and show what queueing alone does to latency at a given
share of its own peak on this machine.

The work is a count of interpreter steps, not a spin until a clock reads N µs later.
This machine's speed drifts by tens of percent from minute to minute; a server's real
work slows with it, and a spin on the clock would not, which made this control look
steadier than any real server could be.

    python bench/minimal_server.py PORT [--cpu-us N]
"""

from __future__ import annotations

import argparse
import asyncio
import time

import httptools
import uvloop


def _burn(steps: int) -> int:
    total = 0
    for i in range(steps):
        total += i
    return total


def steps_for(cpu_us: float) -> int:
    """How many :func:`_burn` steps take ``cpu_us`` of CPU now (median of five timings)."""
    if cpu_us <= 0:
        return 0
    probe = 200_000
    timings = []
    for _ in range(5):
        start = time.thread_time_ns()
        _burn(probe)
        timings.append(time.thread_time_ns() - start)
    per_step_ns = sorted(timings)[2] / probe
    return max(1, round(cpu_us * 1000 / per_step_ns))


class _Echo(asyncio.Protocol):
    def __init__(self, steps: int) -> None:
        self.steps = steps
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
        if self.steps:
            _burn(self.steps)
        body, self.body = b"".join(self.body), []
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
            % (len(body), body)
        )


async def _serve(port: int, steps: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Echo(steps), "127.0.0.1", port)
    await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("port", type=int)
    parser.add_argument("--cpu-us", type=float, default=0.0)
    args = parser.parse_args()
    uvloop.run(_serve(args.port, steps_for(args.cpu_us)))


if __name__ == "__main__":
    main()
