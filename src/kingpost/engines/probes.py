"""HTTP health probes: one GET, 2xx passes; optionally from inside a network namespace."""

from __future__ import annotations

import socket

from kingpost.engines.base import Endpoint
from kingpost.engines.netns import socket_in_netns

__all__ = ["http_probe"]


def http_probe(endpoint: Endpoint, path: str, timeout: float = 2.0) -> bool:
    """``GET path`` on the endpoint; True on a 2xx status line."""
    try:
        sock = (
            socket_in_netns(endpoint.netns)
            if endpoint.netns
            else socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        )
    except OSError:
        return False
    with sock:
        sock.settimeout(timeout)
        try:
            sock.connect((endpoint.host, endpoint.port))
            request = (
                f"GET {path} HTTP/1.1\r\nHost: {endpoint.host}\r\n"
                "User-Agent: kingpost-probe\r\nConnection: close\r\n\r\n"
            )
            sock.sendall(request.encode())
            head = sock.recv(64)
        except OSError:
            return False
    parts = head.split(b" ", 2)
    return len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1][:1] == b"2"
