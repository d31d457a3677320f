"""The gateway's own ``/metrics`` (``--metrics-listen``): a real gateway of two workers,
run alone (no control plane at all), scraped on its own address."""

from __future__ import annotations

import hashlib
import socket
import subprocess
import sys
from pathlib import Path

import httpx

from helpers.platform import free_port, wait_for
from helpers.upstream import upstream
from kingpost.gateway import control_socket_paths, push_table
from kingpost.gateway.table import (
    DeploymentRoute,
    DeploymentState,
    ModelRoute,
    RoutingTable,
    Upstream,
)
from kingpost.metrics.summary import parse

KEY = "kp_gwmetrics"


def _table(port: int) -> RoutingTable:
    def dep(dep_id: str, name: str, path: str, env: str) -> DeploymentRoute:
        up = (Upstream(f"{dep_id}-r", "127.0.0.1", port),)
        return DeploymentRoute(
            dep_id, "m", path, DeploymentState.SERVING, up, 8, name=name, environment=env
        )

    return RoutingTable(
        version=1,
        models={"m": ModelRoute("m", "gm", {"production": (("d1", 1.0),), "tea": (("d2", 1.0),)})},
        model_names={"gm": "m"},
        deployments={
            "d1": dep("d1", "v1", "/echo", "production"),
            "d2": dep("d2", "v2", "/teapot", "tea"),
        },
        api_key_hashes=frozenset({hashlib.sha256(KEY.encode()).hexdigest()}),
    )


def test_the_gateway_serves_every_workers_figures_on_its_own_address(tmp_path: Path) -> None:
    port, mport = free_port(), free_port()
    base = tmp_path / "gw.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "kingpost.gateway", "--port", str(port),
         "--control-socket", str(base), "--workers", "2",
         "--metrics-listen", f"127.0.0.1:{mport}"],
        start_new_session=True,
    )  # fmt: skip
    try:
        sockets = control_socket_paths(base, 2)
        wait_for(lambda: all(s.exists() for s in sockets), 20, "both control sockets")
        with upstream() as up, httpx.Client(timeout=10) as c:
            for sock in sockets:
                push_table(sock, _table(up.port))
            auth = {"Authorization": f"Api-Key {KEY}", "Connection": "close"}
            gw = f"http://127.0.0.1:{port}/models/gm"
            for _ in range(12):  # fresh connections: the kernel spreads them over workers
                assert c.post(f"{gw}/production/predict", content=b"x", headers=auth).is_success
            for _ in range(3):
                r = c.post(f"{gw}/environments/tea/predict", content=b"y", headers=auth)
                assert r.status_code == 418
            # /metrics on the gateway's port is not the gateway's: it is an unknown route.
            assert c.get(f"http://127.0.0.1:{port}/metrics", headers=auth).status_code == 404
            scraped = c.get(f"http://127.0.0.1:{mport}/metrics")
            assert scraped.status_code == 200
            assert scraped.headers["content-type"].startswith("text/plain; version=0.0.4")
            assert c.get(f"http://127.0.0.1:{mport}/other").status_code == 404
        got = parse(scraped.text)

        def value(name: str, **labels: str) -> float:
            return got[(name, frozenset(labels.items()))]

        prod = {"model": "gm", "deployment": "v1", "environment": "production"}
        tea = {"model": "gm", "deployment": "v2", "environment": "tea"}
        assert value("kingpost_gateway_workers") == 2
        assert value("kingpost_requests_total", **prod, route="predict", code_class="2xx") == 12
        assert value("kingpost_requests_total", **tea, route="predict", code_class="4xx") == 3
        assert value("kingpost_request_bytes_total", **prod) == 12
        assert value("kingpost_request_duration_seconds_count", **prod) == 12
        assert value("kingpost_upstream_duration_seconds_count", **tea) == 3
        # No control plane ever pushed: the age is the time since the tables above.
        assert 0 <= value("kingpost_gateway_control_age_seconds") < 60
    finally:
        proc.terminate()
        proc.wait(20)


def test_a_metrics_address_in_use_stops_the_gateway_naming_the_setting(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = f"127.0.0.1:{taken.getsockname()[1]}"
        done = subprocess.run(
            [sys.executable, "-m", "kingpost.gateway", "--port", str(free_port()),
             "--control-socket", str(tmp_path / "gw.sock"), "--metrics-listen", busy],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert done.returncode == 2
    assert f"KINGPOST_GATEWAY_METRICS_LISTEN {busy}: cannot listen there" in done.stderr
    assert not (tmp_path / "gw.sock").exists()
