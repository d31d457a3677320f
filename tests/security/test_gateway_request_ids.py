"""``X-Baseten-Request-Id`` end to end: a client's plain id is kept and forwarded, an odd
one is replaced (never trusted), and every answer carries the id, the gateway's own
errors included."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import httpx
import pytest

from helpers.gateway import AUTH, RunningGateway
from helpers.platform import raw_exchange, wait_for
from helpers.upstream import Upstream
from kingpost.gateway.proxy import REQUEST_ID_LIMIT
from kingpost.gateway.table import DeploymentRoute, DeploymentState
from kingpost.gateway.table import Upstream as Up

PREDICT = "/models/echo/production/predict"


def _route(up: Upstream | None, **kw: object) -> DeploymentRoute:
    ups = (Up("r0", "127.0.0.1", up.port),) if up is not None else ()
    state = DeploymentState.SERVING if ups else DeploymentState.WAKING
    base = DeploymentRoute("d1", "m1", "/inspect", state, ups, concurrency=64)
    return replace(base, **kw)  # type: ignore[arg-type]


def _generated(rid: str) -> bool:
    return len(rid) == 32 and int(rid, 16) >= 0


def test_a_plain_client_id_is_kept_and_forwarded(gw: RunningGateway, up: Upstream) -> None:
    gw.table(_route(up))
    longest = "a" * REQUEST_ID_LIMIT
    with httpx.Client(base_url=gw.url, headers=AUTH) as c:
        for rid in ("abc-1", "req_2.x:y", "0f" * 16, longest):
            r = c.post(PREDICT, content=b"{}", headers={"X-Baseten-Request-Id": rid})
            assert r.status_code == 200
            assert r.headers["x-baseten-request-id"] == rid
            assert r.json()["request_id"] == rid  # what the replica got


@pytest.mark.parametrize(
    "bad",
    [
        b"",
        b"a" * (REQUEST_ID_LIMIT + 1),
        b"has space",
        b"<script>",
        b'quote"d',
        b"caf\xc3\xa9",
        b"-leading-dash",
        b"a,b",
        b"a\tb",
    ],
)
def test_an_odd_client_id_is_replaced(gw: RunningGateway, up: Upstream, bad: bytes) -> None:
    gw.table(_route(up))
    head = (
        b"POST " + PREDICT.encode() + b" HTTP/1.1\r\nHost: x\r\nAuthorization: "
        + AUTH["Authorization"].encode()
        + b"\r\nX-Baseten-Request-Id: " + bad
        + b"\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
    )  # fmt: skip
    data = raw_exchange(gw.port, head)
    head_out, _, body = data.partition(b"\r\n\r\n")
    assert head_out.startswith(b"HTTP/1.1 200"), data[:300]
    ids = [
        line.split(b":", 1)[1].strip()
        for line in head_out.split(b"\r\n")
        if line.lower().startswith(b"x-baseten-request-id:")
    ]
    assert len(ids) == 1 and ids[0] != bad.strip() and _generated(ids[0].decode())
    assert httpx.Response(200, content=body).json()["request_id"] == ids[0].decode()


def test_every_gateway_error_carries_the_id(up: Upstream) -> None:
    gw = RunningGateway(sweep_s=0.05)  # response timeouts are enforced by the sweep
    try:
        _errors_carry_the_id(gw, up)
    finally:
        gw.close()


def _errors_carry_the_id(gw: RunningGateway, up: Upstream) -> None:
    rid = {"X-Baseten-Request-Id": "mine-1"}
    # 503 before the first table
    r = httpx.post(f"{gw.url}{PREDICT}", headers=AUTH | rid)
    assert r.status_code == 503 and r.headers["x-baseten-request-id"] == "mine-1"
    gw.table(_route(up))
    with httpx.Client(base_url=gw.url) as c:
        r = c.post(PREDICT, headers=rid)  # 401
        assert r.status_code == 401 and r.headers["x-baseten-request-id"] == "mine-1"
        r = c.post("/models/nope/production/predict", headers=AUTH | rid)  # 404
        assert r.status_code == 404 and r.headers["x-baseten-request-id"] == "mine-1"
        r = c.post(PREDICT, headers=AUTH)  # no id sent: a new one on the answer
        assert _generated(r.headers["x-baseten-request-id"])
    # 504: the replica does not begin its answer in time
    gw.table(_route(up, response_timeout_s=0.2))
    r = httpx.get(f"{gw.url}/models/m1/production/sync/slow?s=2", headers=AUTH | rid, timeout=30)
    assert r.status_code == 504 and r.headers["x-baseten-request-id"] == "mine-1"
    # 503 (no replica in time) and 429 (its queue full) while the deployment has none
    gw.table(_route(None, queue_limit=1, hold_timeout_s=1.5))
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(httpx.post, f"{gw.url}{PREDICT}", headers=AUTH | rid, timeout=30)
        wait_for(lambda: gw.gateway.stats().deployments["d1"].queued, 5, "the first to queue")
        r = httpx.post(f"{gw.url}{PREDICT}", headers=AUTH | {"X-Baseten-Request-Id": "two"})
        assert r.status_code == 429, r.text
        assert r.headers["x-baseten-request-id"] == "two"
        r = first.result()
        assert r.status_code == 503 and r.headers["x-baseten-request-id"] == "mine-1"
