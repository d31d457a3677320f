"""A raw GET to a replica's endpoint, from inside its network namespace when it has one."""

from __future__ import annotations

import socket

from kingpost.engines import Endpoint
from kingpost.netns import socket_in_netns


def replica_get(endpoint: Endpoint, path: str, timeout: float = 10) -> tuple[int, bytes]:
    """(status, body) of ``GET path``; the connection is closed after one answer."""
    sock = socket_in_netns(endpoint.netns) if endpoint.netns else socket.socket()
    with sock:
        sock.settimeout(timeout)
        sock.connect((endpoint.host, endpoint.port))
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body
