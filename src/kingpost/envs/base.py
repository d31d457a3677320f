"""The shared base environment: Truss's server packages, built once per (set, Python).

Every model-class deployment's environment is a thin virtualenv *layered* on one of
these: a ``.pth`` file in its site-packages runs ``site.addsitedir`` on the base's, so
the base's packages (and the ``.pth`` files among them) come after the deployment's own.
A deployment with no requirements installs nothing (its venv and two ``.pth`` files take
milliseconds), one with requirements installs only those, with the base's versions as
constraints where they agree (see :mod:`kingpost.envs.builder`).

A base environment holds third-party packages only (never a link to Kingpost), so it
can live in a machine-wide directory that several Kingpost homes and checkouts share
(``KINGPOST_BASE_ENVS_DIR``). Its directory name is a hash of everything that makes it
(the set's requirements, the real interpreter behind any venv and its version, the
installer's version), so sharing needs no coordination beyond the build lock: builds of
the same hash wait for each other and then reuse the result; the ready marker is
written last. The first resolution of a set for a Python version is recorded in
``{base_dir}/_pins`` and later builds (after a collection, a uv upgrade) install it
again, so a base does not drift with PyPI.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kingpost._cancel import current as current_cancel
from kingpost._filelock import locked
from kingpost.envs.baseset import BaseSet
from kingpost.envs.installer import Installer
from kingpost.envs.interpreters import Interpreter

__all__ = ["BASE_MARKER", "BaseEnvironment", "base_hash", "ensure_base"]

SCHEMA = 1
BASE_MARKER = "kingpost-base.json"
FREEZE_FILE = "kingpost-base-freeze.txt"
"""Every installed package as ``name==version``: the constraints of layered installs."""


@dataclass(frozen=True)
class BaseEnvironment:
    path: Path
    hash: str
    purelib: str
    """Its site-packages directory, which layered environments add."""
    freeze: Path
    built: bool
    """Whether this call built it (``False``: it was reused)."""


def _real(interpreter: Interpreter) -> str:
    """The interpreter behind a venv's ``bin/python`` link: what a base is made from, so
    every checkout's venv of the same Python shares one base."""
    return os.path.realpath(interpreter.executable)


def base_hash(base_set: BaseSet, interpreter: Interpreter, installer: Installer) -> str:
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "requirements": list(base_set.requirements),
        "python": [_real(interpreter), interpreter.version],
        "installer": installer.version(),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:24]


def _pins_file(base_dir: Path, base_set: BaseSet, interpreter: Interpreter) -> Path:
    doc = {"requirements": list(base_set.requirements), "python": interpreter.version}
    key = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:24]
    return base_dir / "_pins" / f"{key}.txt"


def ensure_base(
    base_set: BaseSet, interpreter: Interpreter, base_dir: Path, log: Callable[[str], None]
) -> BaseEnvironment:
    """The base environment for ``base_set`` on ``interpreter``, built when missing.

    Logs ``base environment {hash}: reused`` or ``...: building`` (what tests and the
    build log show). Blocking; a failed install raises BuildError and leaves nothing."""
    installer = Installer(log)
    env_hash = base_hash(base_set, interpreter, installer)
    target = base_dir / env_hash
    with locked(base_dir / f".{env_hash}.lock", current_cancel()):
        marker_path = target / BASE_MARKER
        if marker_path.is_file() and (target / "bin" / "python").exists():
            log(f"base environment {env_hash}: reused ({base_set.label}, {target})")
            marker_path.touch()  # its last use, which the environment collection reads
            marker = json.loads(marker_path.read_text())
            return BaseEnvironment(target, env_hash, marker["purelib"], target / FREEZE_FILE, False)
        log(
            f"base environment {env_hash}: building ({base_set.label}, "
            f"{len(base_set.requirements)} requirements, Python {interpreter.version})"
        )
        purelib = _build(base_set, interpreter, installer, base_dir, target)
    log(f"base environment {env_hash}: ready")
    return BaseEnvironment(target, env_hash, purelib, target / FREEZE_FILE, True)


def _build(
    base_set: BaseSet, interpreter: Interpreter, installer: Installer, base_dir: Path, target: Path
) -> str:
    shutil.rmtree(target, ignore_errors=True)  # a build that died left it without a marker
    pins = _pins_file(base_dir, base_set, interpreter)
    try:
        python = installer.create_venv(_real(interpreter), target)
        recorded = ["-c", str(pins)] if pins.is_file() else []
        installer.install(
            python, [*recorded, *base_set.requirements], "installing Truss's server packages"
        )
        installer.check(python)
        packages = installer.freeze(python)
        (target / FREEZE_FILE).write_text("".join(f"{p}\n" for p in packages))
        if not recorded:
            pins.parent.mkdir(parents=True, exist_ok=True)
            tmp = pins.with_name(f".{pins.name}.{uuid.uuid4().hex}")
            tmp.write_text("".join(f"{p}\n" for p in packages))
            tmp.replace(pins)
        purelib = subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        marker = {
            "set": base_set.label,
            "source": base_set.source,
            "python": interpreter.version,
            "requirements": list(base_set.requirements),
            "packages": packages,
            "purelib": purelib,
        }
        tmp_marker = target / f".{BASE_MARKER}.tmp"
        tmp_marker.write_text(json.dumps(marker))
        tmp_marker.replace(target / BASE_MARKER)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    return purelib
