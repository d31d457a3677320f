"""When a request whose replica hung up without a byte of answer may go to another one."""

from __future__ import annotations

import pytest

from kingpost.gateway.forward import KEEPALIVE_RACE_S, may_resend

SOON, LATER = KEEPALIVE_RACE_S / 10, 1.0


@pytest.mark.parametrize(
    ("method", "written", "reused", "lost_after_s", "resend"),
    [
        # Idempotent methods (RFC 9110 9.2.2): running one twice has the effect of once.
        *((m, True, False, LATER, True) for m in (b"GET", b"HEAD", b"OPTIONS", b"TRACE")),
        (b"PUT", True, True, LATER, True),
        (b"DELETE", True, False, LATER, True),
        # Any other: only when the replica cannot have run it.
        (b"POST", False, False, LATER, True),  # not all written: it never had it whole
        (b"POST", True, True, SOON, True),  # a pooled connection it had closed while idle
        (b"POST", True, True, LATER, False),  # held a while on a pooled one: it may have run
        (b"POST", True, False, SOON, False),  # a new connection has no keep-alive race
        (b"PATCH", True, False, LATER, False),
        (b"LOCK", True, True, LATER, False),
    ],
)
def test_may_resend(
    method: bytes, written: bool, reused: bool, lost_after_s: float, resend: bool
) -> None:
    assert may_resend(method, written, reused, lost_after_s) is resend
