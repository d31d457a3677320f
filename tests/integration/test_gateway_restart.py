"""The gateway outlives a killed control plane and the next one adopts it (real
`kingpost server` processes, a real gateway, process-engine replicas)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from test_platform_rollouts import Load, serving_v1

from helpers.platform import Platform, free_port, wait_answer, wait_for
from kingpost.gateway import RoutingTable, push_table
from kingpost.gateway.control import TOKEN_HEADER
from kingpost.gateway_process import (
    GatewayRecord,
    boot_id,
    observe,
    process_alive,
    start_ticks,
)
from kingpost.metrics.summary import parse
from kingpost.serve import _start_gateway, gateway_sockets
from kingpost.settings import Settings

PREDICT = "/models/{}/environments/production/predict"


def record(platform: Platform) -> dict[str, object]:
    return dict(json.loads((platform.home / "run" / "gateway.json").read_text()))


def gateway_pid(platform: Platform) -> int:
    return int(str(record(platform)["pid"]))


def gone(pid: int, timeout: float = 20) -> None:
    wait_for(lambda: not process_alive(pid), timeout, f"gateway pid {pid} to exit")


def _served(scrape_url: str) -> float:
    """The gateway's own /metrics: 2xx answers for the model ``adopt``."""
    samples = parse(httpx.get(scrape_url, timeout=10).text)
    return sum(
        v
        for (name, labels), v in samples.items()
        if name == "kingpost_requests_total"
        and {("model", "adopt"), ("environment", "production"), ("code_class", "2xx")} <= labels
    )


def test_a_killed_control_plane_leaves_the_gateway_serving_and_the_next_one_adopts_it(
    tmp_path: Path,
) -> None:
    mport = free_port()  # the gateway's own /metrics, which needs no control plane
    scrape = f"http://127.0.0.1:{mport}/metrics"
    platform = Platform(
        tmp_path / "home", extra_env={"KINGPOST_GATEWAY_METRICS_LISTEN": f"127.0.0.1:{mport}"}
    ).start()
    pid = gateway_pid(platform)
    try:
        assert oct((platform.home / "run" / "gateway.json").stat().st_mode & 0o777) == "0o600"
        serving_v1(platform, tmp_path, "adopt", 2)
        with platform.gateway() as gw:
            wait_answer(gw, PREDICT.format("adopt"), 200)
        load = Load(platform, "adopt")
        with load.running():
            time.sleep(0.5)
            platform.stop(signal.SIGKILL)
            answered = len(load.answers)
            # No control plane: the gateway answers from its last table (keys, routes),
            # and the replicas' servers (a start_command shell's children) live on.
            with platform.gateway() as gw:
                unknown = gw.post(PREDICT.format("nobody"), json={})
                assert unknown.status_code == 404, unknown.text
                refused = gw.post(
                    PREDICT.format("adopt"), json={}, headers={"Authorization": "Api-Key kp_no"}
                )
                assert refused.status_code == 401, refused.text
            before = _served(scrape)
            time.sleep(1.5)
            assert process_alive(pid) and len(load.answers) > answered + 10
            assert _served(scrape) > before + 10  # scraped with no control plane
            platform.start()
            # The next control plane holds the routes to the replicas it is about to
            # restart, then pushes tables above the adopted gateway's version.
            restarted = len(load.answers)
            time.sleep(2)
            assert len(load.answers) > restarted + 10
        assert load.failed() == []
        assert gateway_pid(platform) == pid and process_alive(pid)
        assert f"adopted the running gateway (pid {pid})" in platform.output()
    finally:
        platform.stop()
    # A clean stop stops the adopted gateway too, and forgets it.
    gone(pid)
    assert not (platform.home / "run" / "gateway.json").exists()


def test_a_gateway_started_with_other_settings_is_replaced(tmp_path: Path) -> None:
    platform = Platform(tmp_path / "home").start()
    old = gateway_pid(platform)
    try:
        platform.stop(signal.SIGKILL)
        assert process_alive(old)
        platform.env["KINGPOST_GATEWAY_WORKERS"] = "2"
        platform.start()
        new = gateway_pid(platform)
        assert new != old and not process_alive(old)
        assert (
            f"replacing the running gateway (pid {old}): its settings changed: workers 1 -> 2"
            in platform.output()
        )
        assert record(platform)["workers"] == 2
    finally:
        platform.stop()
    gone(new)


def test_a_gateway_on_another_database_is_replaced(tmp_path: Path) -> None:
    """Its async routes write to the database it was started with: adopted, it would queue
    requests where the new control plane's workers never look."""
    platform = Platform(tmp_path / "home").start()
    old = gateway_pid(platform)
    try:
        platform.stop(signal.SIGKILL)
        assert process_alive(old)
        other = f"sqlite:///{platform.home / 'other.db'}"
        platform.env["KINGPOST_DATABASE_URL"] = other
        platform.start()
        new = gateway_pid(platform)
        assert new != old and not process_alive(old)
        assert (
            f"replacing the running gateway (pid {old}): its settings changed: "
            "the database URL (KINGPOST_DATABASE_URL)" in platform.output()
        )
        environ = Path(f"/proc/{new}/environ").read_bytes().split(b"\0")
        assert f"KINGPOST_DATABASE_URL={other}".encode() in environ
    finally:
        platform.stop()
    gone(new)


def test_a_gateway_keeping_no_access_lines_is_replaced_when_they_are_turned_on(
    tmp_path: Path,
) -> None:
    platform = Platform(tmp_path / "home", extra_env={"KINGPOST_LOG_ACCESS": "false"}).start()
    old = gateway_pid(platform)
    try:
        platform.stop(signal.SIGKILL)
        assert process_alive(old)
        del platform.env["KINGPOST_LOG_ACCESS"]  # on by default
        platform.start()
        new = gateway_pid(platform)
        assert new != old and not process_alive(old)
        assert "its settings changed: log_dir '' ->" in platform.output()
        assert record(platform)["log_dir"] == str(platform.home / "logs")
    finally:
        platform.stop()
    gone(new)


def test_a_gateway_not_tracing_is_replaced_when_tracing_is_turned_on(tmp_path: Path) -> None:
    platform = Platform(tmp_path / "home").start()
    old = gateway_pid(platform)
    try:
        platform.stop(signal.SIGKILL)
        assert process_alive(old)
        # Nothing listens there: the spans are dropped, requests are not affected.
        platform.env["KINGPOST_TRACING_ENDPOINT"] = f"http://127.0.0.1:{free_port()}"
        platform.start()
        new = gateway_pid(platform)
        assert new != old and not process_alive(old)
        assert "its settings changed: traces_endpoint '' -> 'http://127.0.0.1:" in (
            platform.output()
        )
    finally:
        platform.stop()
    gone(new)


def test_an_orphaned_gateway_exits_after_the_orphan_timeout(tmp_path: Path) -> None:
    platform = Platform(
        tmp_path / "home", extra_env={"KINGPOST_GATEWAY_ORPHAN_TIMEOUT": "10"}
    ).start()
    pid = gateway_pid(platform)
    try:
        time.sleep(12)  # pushes every 5 s keep a gateway with a live control plane
        assert process_alive(pid)
        platform.stop(signal.SIGKILL)
        began = time.monotonic()
        gone(pid, timeout=30)
        assert time.monotonic() - began >= 4  # it served on a while, then left
        platform.start()  # the record names a process that is gone: a new one starts
        assert gateway_pid(platform) != pid
    finally:
        platform.stop()


def _record(pid: int, ticks: int, sock: str, boot: str | None = None) -> GatewayRecord:
    return GatewayRecord(
        pid=pid,
        start_ticks=ticks,
        boot_id=boot_id() if boot is None else boot,
        version="0",
        host="127.0.0.1",
        port=1,
        workers=1,
        orphan_timeout=0.0,
        control_socket=sock,
        token="t",
    )


def test_a_recycled_pid_or_another_program_is_not_taken_for_the_gateway(
    tmp_path: Path,
) -> None:
    sock = str(tmp_path / "gateway.sock")
    sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
    lookalike = subprocess.Popen([*sleep, "kingpost.gateway", sock])
    other = subprocess.Popen([*sleep, sock])  # names the socket, but is no gateway
    try:
        for p in (lookalike, other):
            wait_for(lambda p=p: start_ticks(p.pid), 5, "the process's start time")
        ticks = start_ticks(lookalike.pid)
        assert ticks is not None
        seen = observe(_record(lookalike.pid, ticks, sock))
        assert seen.ours and seen.versions == (None,)  # its socket does not answer
        assert not observe(_record(lookalike.pid, ticks + 1, sock)).ours  # a recycled pid
        assert not observe(_record(lookalike.pid, ticks, sock, boot="another-boot")).ours
        assert not observe(_record(lookalike.pid, ticks, sock + ".other")).ours
        other_ticks = start_ticks(other.pid)
        assert other_ticks is not None
        assert not observe(_record(other.pid, other_ticks, sock)).ours
    finally:
        for p in (lookalike, other):
            p.kill()
            p.wait()
    assert not observe(_record(lookalike.pid, ticks, sock)).ours  # gone


def test_the_gateway_process_answers_its_version_on_the_control_socket(
    tmp_path: Path,
) -> None:
    platform = Platform(tmp_path / "home").start()
    try:
        sock = platform.home / "run" / "gateway.sock"
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock))) as c:
            body = c.get("http://gateway/healthz").json()
        from kingpost import __version__

        assert body == {"status": "ok", "version": __version__}
    finally:
        platform.stop()


def test_only_the_control_plane_may_read_the_gateways_table(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home", gateway_port=free_port())
    proc = _start_gateway(settings, "the-token")
    try:
        [sock] = gateway_sockets(settings)
        wait_for(sock.exists, 20, "the control socket")
        table = RoutingTable(version=7, api_key_hashes=frozenset({"h"}))
        push_table(sock, table, token="the-token")
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock))) as c:
            assert c.get("http://gateway/table").status_code == 403
            wrong = c.get("http://gateway/table", headers={TOKEN_HEADER: "guess"})
            assert wrong.status_code == 403
            mine = c.get("http://gateway/table", headers={TOKEN_HEADER: "the-token"})
        assert mine.status_code == 200
        assert RoutingTable.from_json(mine.json()).version == 7
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)


def _gateways_of(home: Path) -> list[int]:
    """Gateway processes that serve ``home``'s control socket."""
    sock = str(home / "run" / "gateway.sock").encode()
    found = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"kingpost.gateway" in argv and sock in argv and process_alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def test_a_server_that_fails_to_start_leaves_no_gateway(tmp_path: Path) -> None:
    platform = Platform(tmp_path / "home")
    platform.home.mkdir(parents=True)
    with socket.socket() as taken:  # the API's port is someone else's
        taken.bind(("127.0.0.1", platform.api_port))
        taken.listen()
        done = subprocess.run(
            [sys.executable, "-m", "kingpost.cli", "server"],
            env=platform.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode != 0 and "address already in use" in done.stderr, done.stderr
    assert _gateways_of(platform.home) == []
    assert not (platform.home / "run" / "gateway.json").exists()


def test_a_metrics_address_in_use_fails_the_start_cleanly(tmp_path: Path) -> None:
    with socket.socket() as taken:  # the metrics listener's port is someone else's
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        platform = Platform(
            tmp_path / "home", extra_env={"KINGPOST_METRICS_LISTEN": f"127.0.0.1:{port}"}
        )
        platform.home.mkdir(parents=True)
        done = subprocess.run(
            [sys.executable, "-m", "kingpost.cli", "server"],
            env=platform.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode != 0, done.stderr
    assert f"KINGPOST_METRICS_LISTEN 127.0.0.1:{port}" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert _gateways_of(platform.home) == []
    assert not (platform.home / "run" / "gateway.json").exists()


def test_a_failed_start_leaves_no_thread_of_the_server_running(tmp_path: Path) -> None:
    """In-process: the controller and the log collector started before the metrics
    listener failed would run on against a closed store."""
    from kingpost.errors import KingpostError
    from kingpost.serve import run_server

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        settings = Settings(
            home=tmp_path / "home",
            api_port=free_port(),
            gateway_port=free_port(),
            gateway_orphan_timeout=60,
            metrics_listen=f"127.0.0.1:{taken.getsockname()[1]}",
        )
        before = set(threading.enumerate())  # other tests' threads are not this one's
        with pytest.raises(KingpostError, match="KINGPOST_METRICS_LISTEN"):
            run_server(settings)
    ours = ("kingpost-controller", "kingpost-logs", "kingpost-demand", "kingpost-metrics")
    left = [t.name for t in set(threading.enumerate()) - before if t.name.startswith(ours)]
    assert left == []
    assert _gateways_of(settings.home) == []


def test_a_second_server_on_the_same_home_leaves_the_running_ones_gateway_alone(
    tmp_path: Path,
) -> None:
    platform = Platform(tmp_path / "home").start()
    pid = gateway_pid(platform)
    try:
        second = platform.cli("server")
        assert second.returncode != 0
        assert f"another kingpost server (pid {platform.proc.pid if platform.proc else 0})" in (
            second.stderr
        ), second.stderr
        assert gateway_pid(platform) == pid and process_alive(pid)
        with platform.gateway() as gw:
            assert gw.post(PREDICT.format("nobody"), json={}).status_code == 404
    finally:
        platform.stop()
    gone(pid)


def _table_version(sock: Path) -> int:
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock))) as c:
        return int(c.get("http://gateway/table/version").json()["version"])


def test_a_gateway_of_several_workers_is_adopted_whole(tmp_path: Path) -> None:
    platform = Platform(tmp_path / "home", extra_env={"KINGPOST_GATEWAY_WORKERS": "2"}).start()
    pid = gateway_pid(platform)
    try:
        serving_v1(platform, tmp_path, "workers", 1)
        sockets = [platform.home / "run" / f"gateway-{i}.sock" for i in (0, 1)]
        before = max(_table_version(s) for s in sockets)
        platform.stop(signal.SIGKILL)
        platform.start()
        assert gateway_pid(platform) == pid
        assert f"adopted the running gateway (pid {pid})" in platform.output()
        # Each worker takes the new control plane's table (pushed above its version). Its
        # process replicas are adopted, so no holding table comes first: one push is enough.
        wait_for(lambda: all(_table_version(s) > before for s in sockets), 20, "newer tables")
        load = Load(platform, "workers")
        with load.running():
            wait_for(lambda: len(load.answers) > 20, 30, "answers")
        assert load.failed() == []
    finally:
        platform.stop()
    gone(pid)
