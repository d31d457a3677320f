"""Starts ``python -m kingpost.server`` on an ephemeral port for the server tests."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from kingpost.server.contract import SERVER_ARGS

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "models"
DEADLINE_S = 30.0


class ServerProcess:
    """A running model server; ``url`` is its base URL, ``log`` its stdout file."""

    def __init__(self, proc: subprocess.Popen[bytes], log: Path, stderr: Path) -> None:
        self.proc = proc
        self.log = log
        self.stderr = stderr
        self.port = self._wait_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def _wait_port(self) -> int:
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline:
            for line in self.lines():
                if line.get("message") == "model server listening":
                    return int(line["port"])
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}: {self.output()}")
            time.sleep(0.01)
        raise AssertionError(f"server never listened: {self.output()}")

    def lines(self) -> list[dict[str, Any]]:
        out = []
        for raw in self.log.read_text().splitlines():
            try:
                out.append(json.loads(raw))
            except ValueError:
                continue
        return out

    def output(self) -> str:
        return self.log.read_text() + self.stderr.read_text()

    def wait_ready(self, client: httpx.Client) -> None:
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline:
            if client.get(f"{self.url}/v1/models/model").status_code == 200:
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}: {self.output()}")
            time.sleep(0.01)
        raise AssertionError(f"server never ready: {self.output()}")

    def wait_exit(self) -> int:
        return self.proc.wait(timeout=DEADLINE_S)


@contextmanager
def run_server(
    app_dir: Path,
    tmp_path: Path,
    env: Mapping[str, str] | None = None,
    secrets_dir: Path | None = None,
) -> Iterator[ServerProcess]:
    if app_dir.is_relative_to(FIXTURES):
        # A copy: the server creates the project's data/ directory, as Truss does, and the
        # fixtures in the source tree stay as committed.
        copy = tmp_path / "apps" / app_dir.name
        if not copy.exists():
            shutil.copytree(app_dir, copy, ignore=shutil.ignore_patterns("__pycache__"))
        app_dir = copy
    log, err = tmp_path / f"{app_dir.name}.out", tmp_path / f"{app_dir.name}.err"
    cmd = [sys.executable, *SERVER_ARGS, "--app-dir", str(app_dir)]
    cmd += ["--port", "0", "--host", "127.0.0.1"]
    cmd += ["--secrets-dir", str(secrets_dir or tmp_path / "no-secrets")]
    with log.open("wb") as out, err.open("wb") as errf:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=errf, env={**os.environ, **(env or {})}, cwd=app_dir
        )  # in the project, as the engines start it
    try:
        yield ServerProcess(proc, log, err)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextmanager
def ready_server(
    name: str, tmp_path: Path, **kwargs: Any
) -> Iterator[tuple[ServerProcess, httpx.Client]]:
    with (
        run_server(FIXTURES / name, tmp_path, **kwargs) as server,
        httpx.Client(base_url=server.url, timeout=DEADLINE_S) as client,
    ):
        server.wait_ready(client)
        yield server, client
