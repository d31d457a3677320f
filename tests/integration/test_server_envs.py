"""Environment builder: real uv installs from PyPI into a temporary envs dir."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx
import pytest
from test_server_harness import DEADLINE_S, FIXTURES

from helpers.cancelling import cancel_while_waiting
from helpers.platform import wait_for
from kingpost._cancel import PLANE_ENV, Cancel, kill_orphans
from kingpost.config import TrussConfig, load_config, runtime_environment
from kingpost.controller.specs import replica_spec
from kingpost.engines.base import ReplicaPhase, ReplicaStatus
from kingpost.engines.process import ProcessEngine
from kingpost.envs import EnvironmentResult, ensure_custom_server_environment, ensure_environment
from kingpost.envs.installer import Installer, run_logged
from kingpost.errors import BuildError
from kingpost.settings import Settings


def _config(**values: object) -> TrussConfig:
    return TrussConfig.model_validate(values)


def test_no_requirements_reuses_the_platform_interpreter(tmp_path: Path) -> None:
    lines: list[str] = []
    result = ensure_environment(_config(), tmp_path, tmp_path / "envs", lines.append)
    assert result.env_hash == "base"
    assert result.reused
    assert not (tmp_path / "envs").exists()


@pytest.mark.slow
def test_build_then_reuse_and_serve_from_the_env(tmp_path: Path) -> None:
    app = FIXTURES / "with_requirements"
    config = load_config(app).config
    envs = tmp_path / "envs"
    lines: list[str] = []
    first = ensure_environment(config, app, envs, lines.append)
    assert not first.reused
    assert Path(first.python_executable).is_relative_to(envs)
    assert any("six" in line for line in lines)
    started = time.monotonic()
    second = ensure_environment(config, app, envs, lines.append)
    assert second == EnvironmentResult(first.python_executable, first.env_hash, reused=True)
    assert time.monotonic() - started < 5
    # The platform's own packages do not leak into the model's environment.
    leak = subprocess.run([first.python_executable, "-c", "import sqlalchemy"], check=False)
    assert leak.returncode != 0
    _serve_once(first.python_executable, app, tmp_path)


def _serve_once(python: str, app: Path, tmp_path: Path) -> None:
    app = shutil.copytree(app, tmp_path / "app")  # the server creates data/ in it
    out = tmp_path / "server.out"
    cmd = [python, "-m", "kingpost.server", "--app-dir", str(app), "--port", "0"]
    cmd += ["--host", "127.0.0.1"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    with out.open("wb") as handle:
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        port = _wait_port(out, proc)
        deadline = time.monotonic() + DEADLINE_S
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            while client.get("/v1/models/model").status_code != 200:
                assert time.monotonic() < deadline, out.read_text()
                time.sleep(0.02)
            r = client.post("/v1/models/model:predict", json={})
            assert r.json() == {"six": "1.16.0"}
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _wait_port(out: Path, proc: subprocess.Popen[bytes]) -> int:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        for raw in out.read_text().splitlines():
            if '"model server listening"' in raw:
                return int(json.loads(raw)["port"])
        assert proc.poll() is None, out.read_text()
        time.sleep(0.02)
    raise AssertionError(out.read_text())


@pytest.mark.slow
def test_requirement_conflicting_with_the_server_fails_with_installer_output(
    tmp_path: Path,
) -> None:
    config = _config(requirements=["msgpack<0.6"])
    with pytest.raises(BuildError) as info:
        ensure_environment(config, tmp_path, tmp_path / "envs", lambda _: None)
    assert "installer's last lines" in info.value.message
    assert "msgpack" in info.value.message
    assert not [p for p in (tmp_path / "envs").iterdir() if p.is_dir()]  # nothing half-built


@pytest.mark.slow
def test_without_uv_pip_builds_the_same_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fallback installer: ``python -m venv`` and pip, with the same steps and checks."""
    monkeypatch.setattr("kingpost.envs.installer.find_uv", lambda: None)
    config = _config(requirements=["six==1.16.0"])
    lines: list[str] = []
    result = ensure_environment(config, tmp_path, tmp_path / "envs", lines.append)
    assert any("with pip" in line for line in lines), lines
    probe = [
        result.python_executable,
        "-c",
        "import six, kingpost.server.main; print(six.__version__)",
    ]
    out = subprocess.run(probe, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "1.16.0"
    # Its environments are kept apart from uv's: the installer is part of the hash.
    monkeypatch.undo()
    with_uv = ensure_environment(config, tmp_path, tmp_path / "envs", lambda _: None)
    assert (with_uv.env_hash != result.env_hash, with_uv.reused) == (True, False)


def test_a_uv_lock_without_uv_is_a_build_error_that_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("kingpost.envs.installer.find_uv", lambda: None)
    (tmp_path / "uv.lock").write_text("version = 1\n")
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "m"\nversion = "0"\n')
    config = _config(requirements_file="uv.lock")
    with pytest.raises(BuildError, match="needs uv"):
        ensure_environment(config, tmp_path, tmp_path / "envs", lambda _: None)
    assert not (tmp_path / "envs").exists()  # refused before any venv was made


@pytest.mark.slow
def test_requirements_file_is_installed(tmp_path: Path) -> None:
    (tmp_path / "requirements.txt").write_text("# pinned\n--prefer-binary\nsix==1.16.0  # ok\n")
    config = _config(requirements_file="requirements.txt")
    result = ensure_environment(config, tmp_path, tmp_path / "envs", lambda _: None)
    # `venvs list` counted 0 requirements for a requirements_file: it lists the file's.
    from kingpost.envs.gc import list_environments

    (info,) = [v for v in list_environments(tmp_path / "envs") if v.hash == result.env_hash]
    assert info.requirements == ("six==1.16.0",)
    probe = [
        result.python_executable,
        "-c",
        "import six, kingpost.server.main; print(six.__version__)",
    ]
    assert (
        subprocess.run(probe, capture_output=True, text=True, check=True).stdout.strip() == "1.16.0"
    )


@pytest.mark.slow
def test_python_version_uses_a_local_interpreter_when_present(tmp_path: Path) -> None:
    from kingpost.envs.interpreters import find_interpreter

    found = find_interpreter("py312", lambda _: None)
    if not found.version.startswith("3.12."):
        pytest.skip("no local Python 3.12")
    config = _config(python_version="py312", requirements=["six==1.16.0"])
    result = ensure_environment(config, tmp_path, tmp_path / "envs", lambda _: None)
    probe = [result.python_executable, "-c", "import sys, kingpost.server.main; print(sys.version)"]
    out = subprocess.run(probe, capture_output=True, text=True, check=True).stdout
    assert out.startswith("3.12.")


def test_missing_python_version_falls_back_with_a_warning() -> None:
    from kingpost.envs.interpreters import current, find_interpreter

    lines: list[str] = []
    assert find_interpreter("py314", lines.append, search=()) == current()
    assert lines and "not installed" in lines[0]


def test_a_python_older_than_the_server_needs_is_not_used_even_when_installed(
    tmp_path: Path,
) -> None:
    """A local 3.10 was found, everything installed into it, then the server's own import
    failed (enum.StrEnum): the deployment failed late, with a traceback."""
    from kingpost.envs.interpreters import Interpreter, current, find_interpreter

    python310 = tmp_path / "python3.10"
    python310.write_text("#!/bin/sh\necho 3.10.14\n")
    python310.chmod(0o755)
    lines: list[str] = []
    assert find_interpreter("py310", lines.append, search=[str(python310)]) == current()
    assert len(lines) == 1 and "older than the 3.11 the model server needs" in lines[0]
    # A custom server's command runs on what it asks for: that minimum is the server's.
    lines.clear()
    found = find_interpreter("py310", lines.append, search=[str(python310)], model_server=False)
    assert found == Interpreter(str(python310), "3.10.14") and not lines


_IMPORT_CONVENIENCES = "import fastapi, pydantic; print(pydantic.VERSION)"


@pytest.mark.slow
def test_fastapi_and_pydantic_are_added_to_a_uv_built_env(tmp_path: Path) -> None:
    """Model code imports them without listing them, as under Truss's server image."""
    config = _config(requirements=["six==1.16.0"])
    lines: list[str] = []
    result = ensure_environment(config, tmp_path, tmp_path / "envs", lines.append)
    assert any("with uv" in line for line in lines), lines
    assert not any("warning" in line for line in lines), lines
    probe = [result.python_executable, "-c", _IMPORT_CONVENIENCES]
    out = subprocess.run(probe, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("2.")
    marker = Path(result.python_executable).parents[1] / "kingpost-env.json"
    assert json.loads(marker.read_text())["conveniences"] == "added"


@pytest.mark.slow
def test_fastapi_and_pydantic_failing_for_a_passing_reason_are_retried_on_reuse(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure that is no resolver conflict (the index was down) does not leave the
    environment without them for good: its next reuse adds them."""
    real_install = Installer.install

    def index_down(self: Installer, python: Path, args: Sequence[str], what: str) -> None:
        if "fastapi" in what:
            raise BuildError("adding failed", output_tail=["error: Failed to fetch: timed out"])
        real_install(self, python, args, what)

    monkeypatch.setattr(Installer, "install", index_down)
    config = _config(requirements=["six==1.16.0"])
    lines: list[str] = []
    first = ensure_environment(config, tmp_path, tmp_path / "envs", lines.append)
    assert any("tried again" in line for line in lines), lines
    probe = [first.python_executable, "-c", _IMPORT_CONVENIENCES]
    assert subprocess.run(probe, capture_output=True, check=False).returncode != 0
    monkeypatch.undo()
    second = ensure_environment(config, tmp_path, tmp_path / "envs", lines.append)
    assert (second.env_hash, second.reused) == (first.env_hash, True)
    out = subprocess.run(probe, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr


@pytest.mark.slow
def test_inline_requirements_take_what_a_requirements_file_takes(tmp_path: Path) -> None:
    """Written to a file, as Truss does: options with a value, hashes and comments."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    six_hash = "8abb2f1d86890a2dfb989f9a77cfcfd3e47c2a354b01111771326f8aa26e0254"
    config = _config(
        requirements=[
            "# six is pinned for the test",
            f"--find-links {wheels}",
            f"six==1.16.0 --hash=sha256:{six_hash}",
            "attrs  # a trailing comment",
        ]
    )
    result = ensure_environment(config, tmp_path, tmp_path / "envs", lambda _: None)
    probe = [result.python_executable, "-c", "import attrs, six; print(six.__version__)"]
    out = subprocess.run(probe, capture_output=True, text=True, check=False)
    assert (out.returncode, out.stdout.strip()) == (0, "1.16.0"), out.stderr


@pytest.mark.slow
def test_a_pyproject_is_installed_from_its_project_dependencies(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "m"\nversion = "0"\ndependencies = ["six==1.16.0"]\n'
        '[project.optional-dependencies]\ndev = ["attrs"]\n'
    )
    config = _config(requirements_file="pyproject.toml")
    result = ensure_environment(config, tmp_path, tmp_path / "envs", lambda _: None)
    probe = [result.python_executable, "-c", "import six; print(six.__version__)"]
    assert subprocess.check_output(probe, text=True).strip() == "1.16.0"
    extra = [result.python_executable, "-c", "import attrs"]
    assert subprocess.run(extra, capture_output=True, check=False).returncode != 0


@pytest.mark.slow
def test_without_uv_a_hashed_requirements_file_installs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``pip-compile --generate-hashes`` output: pip's require-hashes mode covers the
    user's run only, not the server's requirements."""
    monkeypatch.setattr("kingpost.envs.installer.find_uv", lambda: None)
    (tmp_path / "requirements.txt").write_text(
        "# generated by pip-compile --generate-hashes\n"
        "six==1.16.0 \\\n"
        "    --hash=sha256:1e61c37477a1626458e36f7b1d82aa5c9b094fa4802892072e49de9c60c4c926 \\\n"
        "    --hash=sha256:8abb2f1d86890a2dfb989f9a77cfcfd3e47c2a354b01111771326f8aa26e0254\n"
    )
    config = _config(requirements_file="requirements.txt")
    result = ensure_environment(config, tmp_path, tmp_path / "envs", lambda _: None)
    probe = [result.python_executable, "-c", "import six, httptools; print(six.__version__)"]
    assert subprocess.check_output(probe, text=True).strip() == "1.16.0"


@pytest.mark.slow
def test_without_uv_a_conflict_with_the_server_still_fails_the_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("kingpost.envs.installer.find_uv", lambda: None)
    config = _config(requirements=["httptools<0.6"])
    with pytest.raises(BuildError) as info:
        ensure_environment(config, tmp_path, tmp_path / "envs", lambda _: None)
    assert "model server's requirements failed" in info.value.message
    assert "httptools" in info.value.message
    assert "ResolutionImpossible" in info.value.message


SCRIPTS_MODEL = """
import os, subprocess


class Model:
    def predict(self, inputs):
        out = subprocess.run(["wheel", "version"], capture_output=True, text=True)
        return {"path0": os.environ["PATH"].split(os.pathsep)[0],
                "wheel": out.stdout.strip() or out.stderr}
"""


@pytest.mark.slow
def test_console_scripts_of_a_built_env_run_and_lead_a_replicas_path(tmp_path: Path) -> None:
    app = tmp_path / "app"
    (app / "model").mkdir(parents=True)
    (app / "config.yaml").write_text("model_name: scripts\nrequirements: [wheel==0.45.1]\n")
    (app / "model" / "model.py").write_text(SCRIPTS_MODEL)
    config = load_config(app).config
    result = ensure_environment(config, app, tmp_path / "envs", lambda _: None)
    env_bin = Path(result.python_executable).parent
    script = subprocess.run([env_bin / "wheel", "version"], capture_output=True, text=True)
    assert script.stdout.strip() == "wheel 0.45.1", script.stderr
    engine = ProcessEngine(Settings(home=tmp_path / "home", netns="off"))
    try:
        env, _ = runtime_environment(config)
        spec = replica_spec(
            replica_id="r1", deployment_id="d1", model_id="m1", model_name="scripts",
            app_dir=app, config=config, env=env, secrets={},
            python_executable=result.python_executable,
        )  # fmt: skip
        engine.start(spec)

        def ready() -> ReplicaStatus | None:
            st = next(s for s in engine.poll() if s.replica_id == "r1")
            assert st.phase != ReplicaPhase.FAILED, st.message
            return st if st.phase == ReplicaPhase.READY else None

        st = wait_for(ready, DEADLINE_S, "the replica ready")
        assert st.endpoint is not None
        url = f"http://{st.endpoint.host}:{st.endpoint.port}/v1/models/model:predict"
        answer = httpx.post(url, json={}, timeout=DEADLINE_S).json()
        assert answer == {"path0": str(env_bin), "wheel": "wheel 0.45.1"}
    finally:
        engine.close()


def _alive(pid: int) -> bool:
    """Running (a zombie awaiting its reaper counts as gone)."""
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def _wait(what: str, check: Callable[[], object], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_a_daemon_left_holding_the_output_does_not_keep_the_build_running() -> None:
    """A step that starts something in a session of its own (``setsid``), which keeps the
    output pipe open, held the build (and its environment's lock) until that ended."""
    lines: list[str] = []
    started = time.monotonic()
    script = "setsid sleep 60 & echo $!; echo installed"
    try:
        run_logged(["sh", "-c", script], lines.append, "step")
        assert lines[1:] == ["installed"]
        assert time.monotonic() - started < 20
    finally:
        if lines:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(lines[0]), signal.SIGKILL)


def test_cancelling_a_build_kills_the_installer_and_what_it_started() -> None:
    """A deactivated deployment's build must not leave uv, or the ``setup.py`` it runs
    (its child), running."""
    switch = Cancel()
    lines: list[str] = []
    failure: list[BuildError] = []

    def build() -> None:
        with switch.active(), pytest.raises(BuildError) as info:
            run_logged(["sh", "-c", "sleep 300 & echo $!; echo $$; wait"], lines.append, "step")
        failure.append(info.value)

    thread = threading.Thread(target=build)
    thread.start()
    _wait("the installer and its child to start", lambda: len(lines) == 2)
    pids = [int(line) for line in lines]
    assert all(_alive(pid) for pid in pids)
    switch.cancel("the deployment was deactivated")
    thread.join(10)
    assert not any(_alive(pid) for pid in pids)
    assert failure[0].message.startswith("step was stopped: the deployment was deactivated")
    assert failure[0].message.endswith(f"last lines:\n{lines[0]}\n{lines[1]}")


def test_an_installer_dies_with_the_control_plane_even_when_it_is_sigkilled(
    tmp_path: Path,
) -> None:
    """Else uv lives on, orphaned, writing into ``.build-<hash>`` of the envs dir."""
    script = (
        "import threading\n"
        "from kingpost.envs.installer import run_logged\n"
        "def build():\n"
        "    run_logged(['sh', '-c', 'echo $$; exec sleep 300'], lambda l: print(l, flush=True),"
        " 'step')\n"
        "threading.Thread(target=build, name='kingpost-build:dep').start()\n"
    )
    out = tmp_path / "out"
    with out.open("wb") as handle:
        plane = subprocess.Popen([sys.executable, "-c", script], stdout=handle)
    try:
        _wait("the installer to start", lambda: out.read_text().strip())
        installer = int(out.read_text())
        assert _alive(installer)
        plane.kill()
        plane.wait(10)
        _wait("the installer to die with its control plane", lambda: not _alive(installer))
    finally:
        plane.kill()
        plane.wait(10)
        with contextlib.suppress(ValueError, ProcessLookupError):
            os.kill(int(out.read_text()), signal.SIGKILL)


def test_orphan_cleanup_kills_builds_whose_control_plane_is_gone() -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    orphan = subprocess.Popen(["sleep", "300"], env={**os.environ, PLANE_ENV: str(gone.pid)})
    try:
        assert orphan.pid in kill_orphans()
        assert orphan.wait(10) == -signal.SIGKILL
    finally:
        orphan.kill()
        orphan.wait(10)


_IN_A_CONTAINER = r"""
import os, subprocess, sys
host = {int(p) for p in os.listdir("/proc") if p.isdigit()}  # /proc is the host's here
while True:  # a live control plane whose pid, as its namespace numbers it, is free outside
    plane = subprocess.Popen(["sleep", "300"])
    if plane.pid not in host:
        break
    plane.kill()
    plane.wait()
env = {**os.environ, "KINGPOST_BUILD_PLANE": str(plane.pid)}
build = subprocess.Popen(["sleep", "301"], env=env)
print(build.pid, flush=True)
print(build.wait(), flush=True)
plane.kill()
"""


def test_orphan_cleanup_spares_builds_of_a_kingpost_in_another_pid_namespace() -> None:
    """A Kingpost in a container numbers its pids apart: its live control plane's pid
    was taken for a dead one here, and its running build was SIGKILLed."""
    try:
        inner = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--kill-child", sys.executable, "-c", _IN_A_CONTAINER],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
    except OSError:
        pytest.skip("no unshare")
    try:
        assert inner.stdout is not None
        if not inner.stdout.readline().strip():
            pytest.skip("may not create a pid namespace here")
        kill_orphans()
        time.sleep(0.3)  # a killed build ends the namespace's first process
        assert inner.poll() is None, "the other namespace's build was killed"
    finally:
        inner.kill()
        inner.wait(10)


CUSTOM_SERVER = {
    "start_command": "python3 server.py",
    "server_port": 8000,
    "predict_endpoint": "/predict",
    "readiness_endpoint": "/health",
    "liveness_endpoint": "/health",
}
NO_PYTHONPATH = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def test_a_custom_server_gets_an_environment_only_when_it_asks_for_one(tmp_path: Path) -> None:
    """No requirements: its command keeps the machine's PATH and packages, also with a
    python_version (an empty venv first on PATH would hide what the machine has)."""
    envs = tmp_path / "envs"
    for extra in ({}, {"python_version": "py311"}):
        config = _config(docker_server=CUSTOM_SERVER, **extra)
        assert ensure_custom_server_environment(config, tmp_path, envs, lambda _: None) is None
    assert not envs.exists()


@pytest.mark.slow
def test_a_custom_servers_environment_holds_its_requirements_alone(tmp_path: Path) -> None:
    """Nothing of the model server (its requirements, fastapi, the kingpost link), and a
    hash of its own: a model with the same requirements gets another environment."""
    envs = tmp_path / "envs"
    config = _config(docker_server=CUSTOM_SERVER, requirements=["wheel==0.45.1"])
    custom = ensure_custom_server_environment(config, tmp_path, envs, lambda _: None)
    assert custom is not None and not custom.reused
    probe = "import importlib.util as u, wheel; print(wheel.__version__, " + (
        "[n for n in ('kingpost', 'httptools', 'fastapi', 'pydantic') if u.find_spec(n)])"
    )
    out = subprocess.run(
        [custom.python_executable, "-c", probe], capture_output=True, text=True, env=NO_PYTHONPATH
    )
    assert out.stdout.strip() == "0.45.1 []", out.stderr
    again = ensure_custom_server_environment(config, tmp_path, envs, lambda _: None)
    assert again == EnvironmentResult(custom.python_executable, custom.env_hash, reused=True)
    model = _config(requirements=["wheel==0.45.1"])
    for_model = ensure_environment(model, tmp_path, envs, lambda _: None)
    assert (for_model.env_hash != custom.env_hash, for_model.reused) == (True, False)


@pytest.mark.slow
def test_a_custom_servers_failed_install_is_a_build_error_with_the_installers_lines(
    tmp_path: Path,
) -> None:
    envs = tmp_path / "envs"
    config = _config(docker_server=CUSTOM_SERVER, requirements=["six==1.16.0", "six==1.15.0"])
    with pytest.raises(BuildError) as info:
        ensure_custom_server_environment(config, tmp_path, envs, lambda _: None)
    assert "installer's last lines" in info.value.message and "six" in info.value.message
    assert not [p for p in envs.iterdir() if p.is_dir()]  # nothing half-built


def test_a_build_waiting_for_the_same_environment_stops_when_cancelled(tmp_path: Path) -> None:
    """Two deployments with the same requirements share one environment: the second
    waits for the first's install, and must stop waiting when it is deactivated."""
    from kingpost.envs import environment_hash

    config, envs = _config(requirements=["six==1.16.0"]), tmp_path / "envs"
    env_hash = environment_hash(config, tmp_path)
    error = cancel_while_waiting(  # the first deployment's build holds the lock
        envs / f".{env_hash}.lock",
        lambda: ensure_environment(config, tmp_path, envs, lambda line: None),
        "the deployment was deactivated",
    )
    assert "the deployment was deactivated" in error.message
    assert not (envs / str(env_hash)).exists()
