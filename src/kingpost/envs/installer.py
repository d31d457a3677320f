"""Running uv (or pip as a fallback) with live log lines and a tail for errors."""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from kingpost._cancel import PLANE_ENV, current, die_with_parent, kill_group
from kingpost.errors import BuildError

__all__ = ["Installer", "find_uv", "resolution_conflict", "run_logged"]

TAIL_LINES = 30
CONFLICT_MARKERS = (
    "No solution found when resolving",  # uv
    "ResolutionImpossible",  # pip
)


def find_uv() -> str | None:
    """uv next to this interpreter (installed with kingpost), else on PATH."""
    sibling = Path(sys.executable).parent / "uv"
    if sibling.is_file() and os.access(sibling, os.X_OK):
        return str(sibling)
    return shutil.which("uv")


def _env() -> dict[str, str]:
    env = {**os.environ, "UV_PYTHON_DOWNLOADS": "never", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("VIRTUAL_ENV", None)
    env[PLANE_ENV] = str(os.getpid())  # what the installer starts is found if orphaned
    return env


def resolution_conflict(error: BuildError) -> bool:
    """Whether an install failed because the resolver found no solution (a fact about
    the requirements), rather than for a reason that may pass (network, index, disk)."""
    tail = error.details.get("output_tail", ())
    return any(marker in line for line in tail for marker in CONFLICT_MARKERS)


def run_logged(
    cmd: Sequence[str],
    log: Callable[[str], None],
    what: str,
    cwd: Path | None = None,
    whose: str = "the installer's",
) -> list[str]:
    """Run ``cmd``, passing each output line to ``log``; raise BuildError on failure (its
    message quotes ``whose`` last lines of output).

    ``cmd`` runs in a process group of its own, which the build's cancel switch
    (:func:`kingpost._cancel.current`) kills, and dies with the thread that ran it.
    """
    env = _env()
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    lines: list[str] = []
    cancel = current()
    try:
        proc = subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )
    except OSError as exc:
        raise BuildError(f"{what}: cannot run {cmd[0]}: {exc}") from exc
    assert proc.stdout is not None
    with cancel.watching(proc.pid), proc:
        try:
            for line in _output_lines(proc):
                tail.append(line)
                lines.append(line)
                log(line)
        except BaseException:
            kill_group(proc.pid)
            raise
        code = proc.wait()
    last = "\n".join(tail)
    if cancel.reason is not None:
        raise BuildError(
            f"{what} was stopped: {cancel.reason}; {whose} last lines:\n{last}",
            output_tail=list(tail),
        )
    if code != 0:
        raise BuildError(
            f"{what} failed (exit {code}); {whose} last lines:\n{last}",
            exit_status=code,
            output_tail=list(tail),
        )
    return lines


EXIT_GRACE_S = 1.0
"""How long output is still read once the installer has exited."""


def _output_lines(proc: subprocess.Popen[bytes]) -> Iterator[str]:
    """``proc``'s output lines until it has exited and gone quiet.

    Not until the pipe closes: a process the build started in a session of its own (a
    ``setsid`` daemon, which the process group kill does not reach) may hold it open for
    good, and the build would never end, nor release its environment's lock.
    """
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    pending = b""
    exited_at: float | None = None
    while exited_at is None or time.monotonic() - exited_at < EXIT_GRACE_S:
        if select.select([fd], [], [], 0.1)[0]:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            *complete, pending = (pending + chunk).split(b"\n")
            yield from (raw.decode(errors="replace") for raw in complete)
        if exited_at is None and proc.poll() is not None:
            exited_at = time.monotonic()
    if pending:
        yield pending.decode(errors="replace")


class Installer:
    """uv when available, else ``python -m venv`` and pip."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.uv = find_uv()
        self.log = log

    @property
    def name(self) -> str:
        return "uv" if self.uv else "pip"

    def create_venv(self, interpreter: str, target: Path) -> Path:
        if self.uv:
            cmd = [self.uv, "venv", "--quiet", "--python", interpreter, str(target)]
            run_logged(cmd, self.log, "creating the virtualenv")
        else:
            run_logged([interpreter, "-m", "venv", str(target)], self.log, "creating the venv")
        return target / "bin" / "python"

    def install(self, python: Path, args: Sequence[str], what: str) -> None:
        if self.uv:
            cmd = [self.uv, "pip", "install", "--python", str(python), *args]
        else:
            cmd = [str(python), "-m", "pip", "install", "--no-input", *args]
        run_logged(cmd, self.log, what)

    def freeze(self, python: Path) -> list[str]:
        """What is installed, as constraint lines (editable installs left out: pip refuses
        them as constraints). Only stdout: uv names the environment on stderr."""
        if self.uv:
            cmd = [self.uv, "pip", "freeze", "--exclude-editable", "--python", str(python)]
        else:
            cmd = [str(python), "-m", "pip", "freeze", "--exclude-editable"]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, env=_env(), check=False)
        except OSError as exc:
            raise BuildError(f"listing installed packages: cannot run {cmd[0]}: {exc}") from exc
        if out.returncode != 0:
            tail = out.stderr.splitlines()[-TAIL_LINES:]
            raise BuildError(
                f"listing installed packages failed (exit {out.returncode}):\n" + "\n".join(tail),
                exit_status=out.returncode,
                output_tail=tail,
            )
        return out.stdout.splitlines()

    def check(self, python: Path) -> None:
        if self.uv:
            cmd = [self.uv, "pip", "check", "--python", str(python)]
        else:
            cmd = [str(python), "-m", "pip", "check"]
        run_logged(cmd, self.log, "checking installed packages for conflicts")

    def version(self) -> str:
        """The installer's version, part of an environment's hash. Asked of uv once per
        binary (its path, size and modification time), not once per deployment hashed."""
        if not self.uv:
            return "pip"
        try:
            st = os.stat(self.uv)
        except OSError:
            st = None
        key = (self.uv, st.st_size, st.st_mtime_ns) if st is not None else None
        if key is not None and key in _UV_VERSIONS:
            return _UV_VERSIONS[key]
        out = subprocess.run([self.uv, "--version"], capture_output=True, text=True, check=False)
        version = out.stdout.strip()
        if key is not None and out.returncode == 0:
            _UV_VERSIONS[key] = version
        return version


_UV_VERSIONS: dict[tuple[str, int, int], str] = {}
