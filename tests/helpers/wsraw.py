"""A raw RFC 6455 client on a plain socket, for what a well-behaved client library will not
send (unmasked frames, bad UTF-8, unanswered pings) or does not show (each frame)."""

from __future__ import annotations

import os
import socket

KEY = "dGhlIHNhbXBsZSBub25jZQ=="
ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
"""``Sec-WebSocket-Accept`` for :data:`KEY`: the worked example of RFC 6455 section 1.3."""


def handshake(path: str, key: str = KEY, version: str = "13", extra: str = "") -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: {version}\r\n{extra}\r\n"
    ).encode()


def frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bool = True) -> bytes:
    n = len(payload)
    first = (0x80 if fin else 0) | opcode
    if n < 126:
        head = bytes((first, (0x80 if mask else 0) | n))
    elif n < 1 << 16:
        head = bytes((first, (0x80 if mask else 0) | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((first, (0x80 if mask else 0) | 127)) + n.to_bytes(8, "big")
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def close_payload(code: int, reason: str = "") -> bytes:
    return code.to_bytes(2, "big") + reason.encode()


class RawWebSocket:
    """One connection: ``open`` sends the handshake and reads the response head."""

    def __init__(self, port: int, timeout: float = 10) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def open(self, request: bytes) -> bytes:
        """Send ``request``; the response head (up to the blank line)."""
        self.sock.sendall(request)
        return self.head()

    def head(self) -> bytes:
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed before a response head: {self.buf!r}")
            self.buf += chunk
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        return head

    def _need(self, n: int) -> None:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed in the middle of a frame")
            self.buf += chunk

    def recv_frame(self) -> tuple[int, bytes]:
        """(opcode, payload) of the next server frame (never masked)."""
        self._need(2)
        opcode, length, start = self.buf[0] & 0x0F, self.buf[1] & 0x7F, 2
        assert not self.buf[1] & 0x80, "a server frame must not be masked"
        if length == 126:
            self._need(4)
            length, start = int.from_bytes(self.buf[2:4], "big"), 4
        elif length == 127:
            self._need(10)
            length, start = int.from_bytes(self.buf[2:10], "big"), 10
        self._need(start + length)
        payload, self.buf = self.buf[start : start + length], self.buf[start + length :]
        return opcode, payload

    def recv_close(self) -> tuple[int, str]:
        """Skip frames up to a close frame; its (code, reason)."""
        while True:
            opcode, payload = self.recv_frame()
            if opcode == 0x8:
                return int.from_bytes(payload[:2], "big"), payload[2:].decode()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def at_eof(self) -> bool:
        """Whether the server closed the connection (after any bytes still buffered)."""
        return not self.buf and self.sock.recv(65536) == b""

    def close(self) -> None:
        self.sock.close()
