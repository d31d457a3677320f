"""Where sync model methods run: the promotion and demotion rules of Placement."""

from __future__ import annotations

import pytest

from kingpost.server.placement import (
    BLOCK_S,
    FAST_S,
    PROVEN_CALLS,
    SLOW_CALLS,
    SLOW_S,
    WINDOW,
    LoopReentryError,
    Placement,
    calling,
    fast_call_seconds,
    inline_enabled,
    loop_scheduled,
)


def _promoted(name: str = "predict") -> Placement:
    p = Placement(name)
    for _ in range(PROVEN_CALLS):
        p.ran_in_thread(0)
    assert p.inline
    return p


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


def test_one_blocking_call_on_the_loop_demotes_for_good() -> None:
    p = _promoted()
    p.ran_inline(BLOCK_S)  # slow, not blocking: one hiccup is forgiven
    assert p.inline
    p.ran_inline(BLOCK_S * 1.5)
    assert not p.inline and p.demoted
    for _ in range(PROVEN_CALLS * 2):
        p.ran_in_thread(0)
    assert not p.inline


def test_slow_calls_demote_only_when_they_repeat_within_the_window() -> None:
    p = _promoted()
    for _ in range(SLOW_CALLS - 1):
        p.ran_inline(SLOW_S * 2)
    for _ in range(WINDOW):  # a new window forgets the earlier hiccups
        p.ran_inline(0)
    for _ in range(SLOW_CALLS - 1):
        p.ran_inline(SLOW_S * 2)
    assert p.inline
    p.ran_inline(SLOW_S * 2)
    assert p.demoted and not p.inline


def test_disabled_and_is_healthy_never_promote() -> None:
    for p in (Placement("predict", enabled=False), Placement("is_healthy")):
        for _ in range(PROVEN_CALLS * 2):
            p.ran_in_thread(0)
        assert not p.inline


def test_scheduling_on_the_server_loop_keeps_a_method_on_threads() -> None:
    thread_side = Placement("predict")
    with calling(thread_side):
        loop_scheduled(on_loop_thread=False)
    for _ in range(PROVEN_CALLS):
        thread_side.ran_in_thread(0)
    assert thread_side.demoted and not thread_side.inline

    inline = _promoted()
    with calling(inline), pytest.raises(LoopReentryError, match="`predict` scheduled work"):
        loop_scheduled(on_loop_thread=True)
    assert inline.demoted and not inline.inline

    loop_scheduled(on_loop_thread=True)  # outside any user method: the server's own use


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
