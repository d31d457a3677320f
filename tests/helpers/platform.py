"""A real `kingpost server` process for integration tests, and polling helpers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx

from kingpost.client import KingpostClient

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raw_exchange(port: int, payload: bytes, half_close: bool = False, timeout: float = 10) -> bytes:
    """Send ``payload`` on a new connection; everything the server sends until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        return data


def wait_for(fn: Callable[[], T | None], timeout: float = 30.0, what: str = "condition") -> T:
    """Poll ``fn`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = fn()
        except Exception as exc:  # keep polling through transient errors
            last = exc
        else:
            if last:
                return last
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


def wait_answer(
    gw: httpx.Client, path: str, status: int, body: Any = None, timeout: float = 10
) -> httpx.Response:
    """POST ``body`` (JSON, default ``{}``) to ``path`` until the answer has ``status``."""

    def answer() -> httpx.Response | None:
        resp = gw.post(path, json={} if body is None else body)
        return resp if resp.status_code == status else None

    return wait_for(answer, timeout, f"{status} from {path}")


def shared_base_envs_dir() -> str:
    """Where every test's server builds base environments (Truss's server packages): one
    machine-wide, content-addressed directory, so a test run builds each at most once
    (`kingpost venvs base` with the same KINGPOST_BASE_ENVS_DIR builds it ahead, as CI
    does). The caller's KINGPOST_BASE_ENVS_DIR wins."""
    given = os.environ.get("KINGPOST_BASE_ENVS_DIR")
    if given:
        return given
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(cache) / "kingpost-tests" / "base-envs")


class Platform:
    """One `kingpost server` process with its own home and ports."""

    def __init__(
        self,
        home: Path,
        engine: str = "process",
        extra_env: dict[str, str] | None = None,
        netns: tuple[str, str] | None = None,
    ) -> None:
        """``netns``: (name, address) of a network namespace the test made, to run the
        server in, listening on that address (which this namespace reaches)."""
        self.home = home
        self.api_port = free_port()
        self.gateway_port = free_port()
        self.netns = netns
        self.host = netns[1] if netns else "127.0.0.1"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("KINGPOST_")},
            "KINGPOST_HOME": str(home),
            "KINGPOST_API_PORT": str(self.api_port),
            "KINGPOST_GATEWAY_PORT": str(self.gateway_port),
            "KINGPOST_ENGINE": engine,
            "KINGPOST_RECONCILE_INTERVAL": "0.2",
            "KINGPOST_BASE_ENVS_DIR": shared_base_envs_dir(),
            # A test that SIGKILLs the server leaves its gateway for the next start to
            # adopt; one that never restarts it must not leave it running for an hour.
            "KINGPOST_GATEWAY_ORPHAN_TIMEOUT": "60",
            "KINGPOST_API_HOST": self.host,
            "KINGPOST_GATEWAY_HOST": self.host,
            **(extra_env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = home / "server.log"

    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.api_port}"

    @property
    def gateway_url(self) -> str:
        return f"http://{self.host}:{self.gateway_port}"

    def start(self) -> Platform:
        self.home.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            command = [sys.executable, "-m", "kingpost.cli", "server"]
            if self.netns is not None:
                command = ["ip", "netns", "exec", self.netns[0], *command]
            self.proc = subprocess.Popen(
                command,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        # Generous: a loaded machine (CI beside a docker build) can take long to start one.
        wait_for(self._healthy, 60, f"kingpost server to answer (log: {self.log})")
        return self

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"server exited {self.proc.returncode}:\n{self.output()}")
        try:
            ok_api = httpx.get(f"{self.api_url}/v1/health", timeout=1).status_code == 200
            gw = httpx.get(f"{self.gateway_url}/", timeout=1)
        except httpx.TransportError:
            return False
        return ok_api and gw.status_code in (401, 404)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-5000:]

    @property
    def api_key(self) -> str:
        return (self.home / "credentials").read_text().strip()

    def client(self) -> KingpostClient:
        return KingpostClient(self.api_url, self.api_key, self.gateway_url)

    def gateway(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.gateway_url,
            headers={"Authorization": f"Api-Key {self.api_key}"},
            timeout=30,
        )

    def cli(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "kingpost.cli", *args],
            env=self.env,
            input=input,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def wait_status(self, dep_id: str, *statuses: str, timeout: float = 60) -> dict[str, Any]:
        with self.client() as c:

            def check() -> dict[str, Any] | None:
                d = c.deployment(dep_id)
                return d if d["status"] in statuses else None

            try:
                return wait_for(check, timeout, f"deployment {dep_id} to be {statuses}")
            except AssertionError as exc:
                raise AssertionError(
                    f"{exc}\nlogs: {c.logs(dep_id)}\nserver:\n{self.output()}"
                ) from None
