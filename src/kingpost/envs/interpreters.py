"""Find a local interpreter for a Truss ``python_version`` (never downloads one)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SERVER_MIN_PYTHON", "Interpreter", "find_interpreter", "parse_python_version"]

SERVER_MIN_PYTHON = (3, 11)
"""The oldest Python the model server runs on (it uses ``enum.StrEnum``, ``-P``)."""


@dataclass(frozen=True)
class Interpreter:
    executable: str
    version: str
    """``major.minor.micro``."""


def parse_python_version(value: str | None) -> str | None:
    """``"py311"`` or ``"3.11"`` -> ``"3.11"``; ``None`` stays ``None``."""
    if not value:
        return None
    digits = value.lower().removeprefix("py").replace(".", "")
    if len(digits) < 2 or not digits.isdigit():
        return None
    return f"{digits[0]}.{digits[1:]}"


def _probe(executable: str) -> str | None:
    try:
        out = subprocess.run(
            [executable, "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _candidates(minor: str) -> Iterator[str]:
    found = shutil.which(f"python{minor}")
    if found:
        yield found
    pyenv_root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    for path in sorted(
        (pyenv_root / "versions").glob(f"{minor}.*/bin/python{minor}"), reverse=True
    ):
        yield str(path)
    for prefix in ("/usr/bin", "/usr/local/bin", "/opt/python/bin"):
        yield f"{prefix}/python{minor}"


def current() -> Interpreter:
    return Interpreter(sys.executable, "{}.{}.{}".format(*sys.version_info[:3]))


def find_interpreter(
    python_version: str | None,
    log: Callable[[str], None],
    search: Iterable[str] | None = None,
    *,
    model_server: bool = True,
) -> Interpreter:
    """The interpreter for ``python_version``, else the current one with a warning.

    ``search`` replaces the default candidates (PATH, pyenv, /usr/bin ...). Only an
    interpreter the model server runs on (``model_server``) is held to its minimum.
    """
    minor = parse_python_version(python_version)
    here = current()
    if minor is None or here.version.startswith(minor + "."):
        return here
    if model_server and tuple(int(part) for part in minor.split(".")) < SERVER_MIN_PYTHON:
        # Installing into an older interpreter would succeed and the server then fail to
        # start; Kingpost's docker images likewise run such projects on 3.11.
        log(
            f"warning: python_version {python_version} asks for Python {minor}, older than "
            f"the {'.'.join(map(str, SERVER_MIN_PYTHON))} the model server needs; using "
            f"Python {here.version} instead"
        )
        return here
    for candidate in _candidates(minor) if search is None else search:
        if not os.access(candidate, os.X_OK):
            continue
        version = _probe(candidate)
        if version is not None and version.startswith(minor + "."):
            return Interpreter(candidate, version)
    log(
        f"warning: python_version {python_version} asks for Python {minor}, which is not "
        f"installed on this machine; using Python {here.version} instead (install python{minor} "
        f"to get it; interpreters are never downloaded)"
    )
    return here
