"""Where sync model methods run: the promotion and demotion rules of Placement."""

from __future__ import annotations

import pytest

from kingpost.server.placement import (
    FAST_S,
    PROVEN_CALLS,
    SLOW_S,
    Placement,
    fast_call_seconds,
    inline_enabled,
)


def test_promoted_after_enough_fast_calls_in_a_row() -> None:
    p = Placement("predict")
    for _ in range(PROVEN_CALLS - 1):
        p.ran_in_thread(FAST_S / 2)
    assert not p.inline
    p.ran_in_thread(FAST_S / 2)
    assert p.inline


def test_one_slow_call_restarts_the_count() -> None:
    p = Placement("predict")
    for _ in range(PROVEN_CALLS - 1):
        p.ran_in_thread(FAST_S / 2)
    p.ran_in_thread(FAST_S)
    for _ in range(PROVEN_CALLS - 1):
        p.ran_in_thread(FAST_S / 2)
    assert not p.inline
    p.ran_in_thread(FAST_S / 2)
    assert p.inline


def test_a_slow_call_on_the_loop_demotes_for_good() -> None:
    p = Placement("predict")
    for _ in range(PROVEN_CALLS):
        p.ran_in_thread(0)
    p.ran_inline(SLOW_S)  # at the limit: stays
    assert p.inline
    p.ran_inline(SLOW_S * 2)
    assert not p.inline and p.demoted
    for _ in range(PROVEN_CALLS * 2):
        p.ran_in_thread(0)
    assert not p.inline


def test_disabled_never_promotes() -> None:
    p = Placement("predict", enabled=False)
    for _ in range(PROVEN_CALLS * 2):
        p.ran_in_thread(0)
    assert not p.inline


@pytest.mark.parametrize(
    ("value", "enabled"), [(None, True), ("1", True), ("0", False), ("false", False)]
)
def test_inline_switch(monkeypatch: pytest.MonkeyPatch, value: str | None, enabled: bool) -> None:
    if value is None:
        monkeypatch.delenv("KINGPOST_SERVER_INLINE", raising=False)
    else:
        monkeypatch.setenv("KINGPOST_SERVER_INLINE", value)
    assert inline_enabled() is enabled


@pytest.mark.parametrize(
    ("value", "seconds"), [(None, FAST_S), ("250", 250e-6), ("x", FAST_S), ("-1", FAST_S)]
)
def test_fast_call_bar(monkeypatch: pytest.MonkeyPatch, value: str | None, seconds: float) -> None:
    if value is None:
        monkeypatch.delenv("KINGPOST_SERVER_INLINE_FAST_US", raising=False)
    else:
        monkeypatch.setenv("KINGPOST_SERVER_INLINE_FAST_US", value)
    assert fast_call_seconds() == pytest.approx(seconds)
    p = Placement("predict", fast_s=fast_call_seconds())
    for _ in range(PROVEN_CALLS):
        p.ran_in_thread(seconds * 0.99)
    assert p.inline
