"""RFC 6455 framing for the model server's WebSockets: client frames in, server frames out.

Pure and incremental: :class:`FrameParser` takes bytes as they arrive and returns whole
events (a message, a ping, a pong, a close); the functions below build the frames the
server sends. No extension is negotiated (permessage-deflate is optional and off), so a
frame with a reserved bit set is a protocol error, as are unmasked client frames,
fragmented or oversized control frames and continuation frames out of place. Text must be
UTF-8 (1007 otherwise); a message larger than the limit fails with 1009 as soon as its
header says so, before its payload is buffered.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass

__all__ = [
    "ABNORMAL",
    "GOING_AWAY",
    "INTERNAL_ERROR",
    "INVALID_DATA",
    "MESSAGE_TOO_BIG",
    "NORMAL",
    "NO_STATUS",
    "PROTOCOL_ERROR",
    "SERVICE_RESTART",
    "UNSUPPORTED_DATA",
    "Close",
    "FrameParser",
    "Message",
    "Ping",
    "Pong",
    "ProtocolError",
    "accept_key",
    "close_frame",
    "data_frame",
    "ping_frame",
    "pong_frame",
    "sendable_close_code",
    "valid_key",
]

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

OP_CONTINUATION, OP_TEXT, OP_BINARY = 0x0, 0x1, 0x2
OP_CLOSE, OP_PING, OP_PONG = 0x8, 0x9, 0xA

NORMAL = 1000
GOING_AWAY = 1001
PROTOCOL_ERROR = 1002
UNSUPPORTED_DATA = 1003
NO_STATUS = 1005
"""Reported when a close frame carried no code; never sent."""
ABNORMAL = 1006
"""Reported when the connection ended without a close frame; never sent."""
INVALID_DATA = 1007
MESSAGE_TOO_BIG = 1009
INTERNAL_ERROR = 1011
SERVICE_RESTART = 1012

_MAX_CONTROL_PAYLOAD = 125
_MAX_REASON = 123


def accept_key(key: str) -> str:
    """``Sec-WebSocket-Accept`` for a client's ``Sec-WebSocket-Key``."""
    digest = hashlib.sha1(key.strip().encode("latin-1") + _GUID).digest()
    return base64.b64encode(digest).decode("ascii")


def valid_key(key: str) -> bool:
    """A ``Sec-WebSocket-Key`` is 16 random bytes in base64."""
    try:
        return len(base64.b64decode(key.strip(), validate=True)) == 16
    except ValueError:
        return False


def sendable_close_code(code: int) -> bool:
    """Codes an endpoint may put in a close frame: the registered ones and 3000-4999."""
    return code in (1000, 1001, 1002, 1003) or 1007 <= code <= 1014 or 3000 <= code <= 4999


class ProtocolError(Exception):
    """The client broke RFC 6455; the connection is failed with ``code``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.events: list[Event] = []
        """What the same bytes completed before the bad frame: still the client's words."""


@dataclass(frozen=True, slots=True)
class Message:
    """A whole data message: ``str`` for text, ``bytes`` for binary."""

    data: str | bytes


@dataclass(frozen=True, slots=True)
class Ping:
    payload: bytes


@dataclass(frozen=True, slots=True)
class Pong:
    payload: bytes


@dataclass(frozen=True, slots=True)
class Close:
    code: int
    """``NO_STATUS`` (1005) when the frame carried none."""
    reason: str


Event = Message | Ping | Pong | Close


def _unmask(payload: bytes | bytearray, mask: bytes) -> bytes:
    n = len(payload)
    if n == 0:
        return b""
    key = (mask * ((n + 3) // 4))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


class FrameParser:
    """Client-to-server frames, fed in pieces; ``feed`` returns the events completed."""

    def __init__(self, max_message: int) -> None:
        self._max = max_message
        self._buf = bytearray()
        self._opcode: int | None = None
        """Opcode of the fragmented message being assembled, if any."""
        self._parts: list[bytes] = []
        self._size = 0

    def feed(self, data: bytes) -> list[Event]:
        """The events ``data`` completes; raises :class:`ProtocolError`."""
        buf = self._buf
        buf += data
        events: list[Event] = []
        try:
            self._parse(buf, events)
        except ProtocolError as exc:
            exc.events = events
            raise
        return events

    def _parse(self, buf: bytearray, events: list[Event]) -> None:
        while len(buf) >= 2:
            first, second = buf[0], buf[1]
            fin, opcode, length = first & 0x80, first & 0x0F, second & 0x7F
            start = 2
            if length == 126:
                if len(buf) < 4:
                    break
                length, start = int.from_bytes(buf[2:4], "big"), 4
            elif length == 127:
                if len(buf) < 10:
                    break
                length, start = int.from_bytes(buf[2:10], "big"), 10
            self._check_header(first & 0x70, second & 0x80, fin, opcode, length)
            end = start + 4 + length
            if len(buf) < end:
                break
            payload = _unmask(buf[start + 4 : end], bytes(buf[start : start + 4]))
            del buf[:end]
            event = self._frame(bool(fin), opcode, payload)
            if event is not None:
                events.append(event)

    def _check_header(self, rsv: int, masked: int, fin: int, opcode: int, length: int) -> None:
        if rsv:
            raise ProtocolError(PROTOCOL_ERROR, "reserved bits set; no extension was negotiated")
        if not masked:
            raise ProtocolError(PROTOCOL_ERROR, "client frames must be masked")
        if opcode >= OP_CLOSE:
            if opcode not in (OP_CLOSE, OP_PING, OP_PONG):
                raise ProtocolError(PROTOCOL_ERROR, f"unknown opcode {opcode:#x}")
            if not fin:
                raise ProtocolError(PROTOCOL_ERROR, "fragmented control frame")
            if length > _MAX_CONTROL_PAYLOAD:
                raise ProtocolError(PROTOCOL_ERROR, "control frame over 125 bytes")
            return
        if opcode not in (OP_CONTINUATION, OP_TEXT, OP_BINARY):
            raise ProtocolError(PROTOCOL_ERROR, f"unknown opcode {opcode:#x}")
        if opcode == OP_CONTINUATION and self._opcode is None:
            raise ProtocolError(PROTOCOL_ERROR, "continuation frame outside a message")
        if opcode != OP_CONTINUATION and self._opcode is not None:
            raise ProtocolError(PROTOCOL_ERROR, "new message before the last one ended")
        if self._size + length > self._max:
            raise ProtocolError(MESSAGE_TOO_BIG, f"message over {self._max} bytes")

    def _frame(self, fin: bool, opcode: int, payload: bytes) -> Event | None:
        if opcode == OP_PING:
            return Ping(payload)
        if opcode == OP_PONG:
            return Pong(payload)
        if opcode == OP_CLOSE:
            return _close(payload)
        if opcode != OP_CONTINUATION:
            self._opcode = opcode
        self._parts.append(payload)
        self._size += len(payload)
        if not fin:
            return None
        whole = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
        kind, self._opcode, self._parts, self._size = self._opcode, None, [], 0
        if kind == OP_BINARY:
            return Message(whole)
        try:
            return Message(whole.decode("utf-8"))
        except UnicodeDecodeError:
            raise ProtocolError(INVALID_DATA, "text message is not valid UTF-8") from None


def _close(payload: bytes) -> Close:
    if not payload:
        return Close(NO_STATUS, "")
    if len(payload) == 1:
        raise ProtocolError(PROTOCOL_ERROR, "close frame with a one-byte payload")
    code = int.from_bytes(payload[:2], "big")
    if not sendable_close_code(code):
        raise ProtocolError(PROTOCOL_ERROR, f"invalid close code {code}")
    try:
        return Close(code, payload[2:].decode("utf-8"))
    except UnicodeDecodeError:
        raise ProtocolError(INVALID_DATA, "close reason is not valid UTF-8") from None


def _frame(opcode: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, n))
    elif n < 1 << 16:
        head = bytes((0x80 | opcode, 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 127)) + n.to_bytes(8, "big")
    return head + payload


def data_frame(data: str | bytes) -> bytes:
    """One unfragmented text (``str``) or binary (``bytes``) message."""
    if isinstance(data, str):
        return _frame(OP_TEXT, data.encode("utf-8"))
    return _frame(OP_BINARY, data)


def ping_frame(payload: bytes) -> bytes:
    return _frame(OP_PING, payload[:_MAX_CONTROL_PAYLOAD])


def pong_frame(payload: bytes) -> bytes:
    return _frame(OP_PONG, payload[:_MAX_CONTROL_PAYLOAD])


def close_frame(code: int, reason: str = "") -> bytes:
    """A close frame; ``NO_STATUS`` sends an empty one. The reason is cut to 123 bytes at a
    character boundary (the frame's limit)."""
    if code == NO_STATUS:
        return _frame(OP_CLOSE, b"")
    text = reason.encode("utf-8")
    if len(text) > _MAX_REASON:
        text = text[:_MAX_REASON].decode("utf-8", "ignore").encode("utf-8")
    return _frame(OP_CLOSE, code.to_bytes(2, "big") + text)
