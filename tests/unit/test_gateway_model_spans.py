"""``x-kingpost-spans``, the model server's steps as the gateway reads them: known steps
only, once each, with sane times; the rest of a replica's header is left out."""

from __future__ import annotations

import pytest

from kingpost.gateway.framing import HOP_BY_HOP
from kingpost.gateway.tracing import parse_model_spans


@pytest.mark.parametrize(
    ("header", "steps"),
    [
        (b"preprocess=1-2;predict=3-5;postprocess=6-6", [
            ("preprocess", 1, 2, False), ("predict", 3, 5, False), ("postprocess", 6, 6, False),
        ]),
        (b"preprocess=1-2;predict=3-9!", [("preprocess", 1, 2, False), ("predict", 3, 9, True)]),
        (b"load=1-2;predict=3-4", [("predict", 3, 4, False)]),  # not a step: left out
        (b"predict=5-4", []),  # ends before it starts
        (b"predict=1-2;predict=3-4", [("predict", 1, 2, False)]),  # once
        (b"predict=-1-2;predict=x-y;=1-2;predict", []),
        (b"predict=1-2;" * 1000, [("predict", 1, 2, False)]),  # only the first few parts read
        (b"", []),
        # OTLP's times are fixed64: past it, the whole export batch failed to encode.
        (b"predict=1-18446744073709551615", [("predict", 1, 2**64 - 1, False)]),
        (b"preprocess=1-2;predict=1-99999999999999999999", [("preprocess", 1, 2, False)]),
        (b"predict=18446744073709551616-18446744073709551616", []),
    ],
)  # fmt: skip
def test_the_header_parses_into_known_steps(
    header: bytes, steps: list[tuple[str, int, int, bool]]
) -> None:
    assert parse_model_spans(header) == steps


def test_the_header_never_reaches_a_client_or_a_replica() -> None:
    assert b"x-kingpost-spans" in HOP_BY_HOP


@pytest.mark.parametrize(
    ("header", "steps"),
    [
        (b"preprocess=100-150;predict=150-200!", [
            ("preprocess", 100, 150, False), ("predict", 150, 200, True),
        ]),
        (b"preprocess=99-150;predict=150-200", [("predict", 150, 200, False)]),  # starts before
        (b"predict=150-201;postprocess=201-201", []),  # ends after
        (b"predict=1-99999999999999999999", []),
    ],
)  # fmt: skip
def test_steps_outside_the_window_are_left_out(
    header: bytes, steps: list[tuple[str, int, int, bool]]
) -> None:
    assert parse_model_spans(header, within=(100, 200)) == steps
