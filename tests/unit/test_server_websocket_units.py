"""RFC 6455 framing and the websocket model contract, without sockets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from starlette.websockets import WebSocket

from helpers.wsraw import ACCEPT, KEY, close_payload, frame
from kingpost.server import wsframes
from kingpost.server.config import load_server_config
from kingpost.server.model import ModelDefinitionError, ModelHost
from kingpost.server.secrets import Secrets
from kingpost.server.wsframes import Close, FrameParser, Message, Ping, Pong, ProtocolError


def test_accept_key_is_rfc_6455s_worked_example() -> None:
    assert wsframes.accept_key(KEY) == ACCEPT
    assert wsframes.valid_key(KEY)
    assert not wsframes.valid_key("dG9vIHNob3J0")  # "too short": 9 bytes
    assert not wsframes.valid_key("not base64 !")


def test_messages_arrive_whole_however_the_bytes_are_cut() -> None:
    big = bytes(range(256)) * 300  # 76800 bytes: a 64-bit length
    wire = (
        frame(0x1, "héllo".encode())
        + frame(0x2, b"", fin=False)
        + frame(0x9, b"ping!")
        + frame(0x0, big)
        + frame(0xA, b"")
        + frame(0x1, b"x" * 200)  # a 16-bit length
        + frame(0x8, close_payload(4000, "bye ✓"))
    )
    for step in (1, 7, len(wire)):
        parser, events = FrameParser(1 << 20), []
        for i in range(0, len(wire), step):
            events += parser.feed(wire[i : i + step])
        assert events == [
            Message("héllo"),
            Ping(b"ping!"),
            Message(big),
            Pong(b""),
            Message("x" * 200),
            Close(4000, "bye ✓"),
        ]


@pytest.mark.parametrize(
    ("wire", "code"),
    [
        (frame(0x1, b"x", mask=False), 1002),  # clients must mask
        (bytes((0xC1, 0x80)) + b"\0\0\0\0", 1002),  # RSV1 without an extension
        (frame(0x3, b""), 1002),  # reserved opcode
        (frame(0x9, b"", fin=False), 1002),  # fragmented control frame
        (frame(0x9, b"x" * 126), 1002),  # control frame over 125 bytes
        (frame(0x0, b"x"), 1002),  # continuation with nothing to continue
        (frame(0x1, b"a", fin=False) + frame(0x2, b"b"), 1002),  # new message mid-message
        (frame(0x1, b"\xc3"), 1007),  # not UTF-8
        (frame(0x8, b"\x03"), 1002),  # one-byte close payload
        (frame(0x8, close_payload(1005)), 1002),  # a code that must never be sent
        (frame(0x8, close_payload(1000) + b"\xff"), 1007),
    ],
    # Named, not shown: frames carry random mask keys, and every pytest process (xdist)
    # must collect the same ids.
    ids=[
        "unmasked",
        "rsv1",
        "reserved-opcode",
        "fragmented-control",
        "long-control",
        "stray-continuation",
        "new-message-mid-message",
        "not-utf8",
        "one-byte-close",
        "close-1005",
        "close-reason-not-utf8",
    ],
)
def test_protocol_errors_name_their_close_code(wire: bytes, code: int) -> None:
    with pytest.raises(ProtocolError) as info:
        FrameParser(1 << 20).feed(wire)
    assert info.value.code == code


def test_a_message_over_the_limit_fails_before_its_payload_is_buffered() -> None:
    parser = FrameParser(100)
    assert parser.feed(frame(0x2, b"a" * 60, fin=False)) == []
    with pytest.raises(ProtocolError) as info:
        # Only the header of the second part: its length alone breaks the limit.
        parser.feed(frame(0x0, b"b" * 41)[:8])
    assert info.value.code == 1009


def test_server_frames() -> None:
    assert wsframes.data_frame("hi") == b"\x81\x02hi"
    assert wsframes.data_frame(b"\x00" * 126)[:4] == b"\x82\x7e\x00\x7e"
    assert wsframes.data_frame(b"\x00" * 70000)[:10] == b"\x82\x7f" + (70000).to_bytes(8, "big")
    assert wsframes.close_frame(1005) == b"\x88\x00"
    long_reason = wsframes.close_frame(1000, "é" * 100)
    assert len(long_reason) == 2 + 2 + 122  # cut to 123 bytes, at a character boundary
    assert long_reason[4:].decode() == "é" * 61
    assert [c for c in (999, 1000, 1004, 1006, 1011, 1015, 2999, 3000, 4999, 5000)
            if wsframes.sendable_close_code(c)] == [1000, 1011, 3000, 4999]  # fmt: skip


class _Echo:
    async def websocket(self, websocket: WebSocket) -> None: ...


class _AlsoPredict(_Echo):
    def predict(self, x: Any) -> Any:
        return x


class _AlsoPreprocess(_Echo):
    def preprocess(self, x: Any) -> Any:
        return x


class _Sync:
    def websocket(self, websocket: Any) -> None: ...


class _NoArgument:
    async def websocket(self) -> None: ...


class _Nothing:
    def load(self) -> None: ...


def _host(tmp_path: Path) -> ModelHost:
    (tmp_path / "config.yaml").write_text("model_name: ws\n")
    return ModelHost(load_server_config(tmp_path), Secrets({}, tmp_path / "secrets"))


def test_a_websocket_model_needs_no_predict(tmp_path: Path) -> None:
    host = _host(tmp_path)
    host.bind(_Echo())
    assert host.websocket is not None and host.predict is None and host.schema() is None


@pytest.mark.parametrize(
    ("model", "says"),
    [
        (_AlsoPredict(), "cannot be combined with `predict`"),
        (_AlsoPreprocess(), "cannot be combined with `predict`"),
        (_Sync(), "must be an `async def`"),
        (_NoArgument(), "must take one argument"),
        (_Nothing(), "no `predict` or `websocket` method"),
    ],
)
def test_websocket_definition_errors_as_in_truss(tmp_path: Path, model: Any, says: str) -> None:
    with pytest.raises(ModelDefinitionError, match=says):
        _host(tmp_path).bind(model)


def test_keepalive_settings_come_from_the_transport(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text(
        "runtime:\n  transport:\n    kind: websocket\n    ping_interval_seconds: 2.5\n"
    )
    config = load_server_config(tmp_path)
    assert (config.ws_ping_interval, config.ws_ping_timeout) == (2.5, 20.0)
    (tmp_path / "config.yaml").write_text("runtime:\n  is_websocket_endpoint: true\n")
    assert load_server_config(tmp_path).ws_ping_interval == 20.0
