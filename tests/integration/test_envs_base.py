"""Model-class environments layered on the shared base of Truss's server packages, and
the offline mode that uses an interpreter as it is. Real uv installs from PyPI; the base
is built in the machine-wide test directory (once per machine, as in the test servers)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from helpers.platform import shared_base_envs_dir
from kingpost.config import TrussConfig
from kingpost.envs import ModelEnvMode, ModelEnvPolicy, ensure_environment, environment_hash
from kingpost.envs.base import ensure_base
from kingpost.envs.baseset import BaseSet
from kingpost.envs.gc import collect
from kingpost.envs.interpreters import current
from kingpost.errors import BuildError

BASE = ModelEnvPolicy(ModelEnvMode.TRUSS_BASE, Path(shared_base_envs_dir()))
OFFLINE = ModelEnvPolicy(ModelEnvMode.SERVER_PYTHON)


def _config(**values: object) -> TrussConfig:
    return TrussConfig.model_validate(values)


def _run(python: str, code: str) -> Any:
    """What ``code`` (which sets ``out``) found, run as the model server runs (``-P``)."""
    proc = subprocess.run(
        [python, "-P", "-c", f"import json\n{code}\nprint(json.dumps(out))"],
        capture_output=True, text=True, check=False, cwd="/",
        env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


IMPORTS = """
import importlib.util, numpy, requests, pydantic, fastapi, yaml, opentelemetry.sdk.trace
import kingpost.server.main
out = {"numpy": numpy.__version__, "leaked": [m for m in ("sqlalchemy", "alembic",
       "cryptography", "pydantic_settings", "rich") if importlib.util.find_spec(m) is not None]}
"""


def test_a_model_without_requirements_imports_the_base_set_and_none_of_kingposts(
    tmp_path: Path,
) -> None:
    lines: list[str] = []
    result = ensure_environment(_config(), tmp_path, tmp_path / "envs", lines.append, BASE)
    assert Path(result.python_executable).is_relative_to(tmp_path / "envs")
    found = _run(result.python_executable, IMPORTS)
    assert str(found["numpy"]).startswith("1.")  # Truss's server pins numpy below 2
    # Kingpost's own dependencies that Truss's set does not hold (click it does: uvicorn's).
    assert found["leaked"] == []
    assert result.env_hash == environment_hash(_config(), tmp_path, policy=BASE)


def test_a_second_deployment_reuses_the_base_and_only_layers_its_requirements(
    tmp_path: Path,
) -> None:
    envs = tmp_path / "envs"
    ensure_environment(_config(), tmp_path, envs, lambda _: None, BASE)  # the base exists
    lines: list[str] = []
    layered = ensure_environment(_config(requirements=["six==1.16.0"]), tmp_path, envs,
                                 lines.append, BASE)  # fmt: skip
    assert not layered.reused
    assert any(line.startswith("base environment ") and ": reused" in line for line in lines)
    assert not any(": building" in line for line in lines if line.startswith("base env"))
    found = _run(layered.python_executable, "import six, numpy\nout = [six.__file__, "
                 "numpy.__file__]")  # fmt: skip
    six_file, numpy_file = (Path(str(p)) for p in found)
    assert six_file.is_relative_to(envs)  # its own layer
    assert numpy_file.is_relative_to(shared_base_envs_dir())  # the base's, not a copy


def test_a_requirement_against_the_base_set_wins_over_it_with_a_warning(tmp_path: Path) -> None:
    lines: list[str] = []
    config = _config(requirements=["msgpack==1.0.8"])  # the base pins 1.1.0
    result = ensure_environment(config, tmp_path, tmp_path / "envs", lines.append, BASE)
    assert any("need versions other than the base environment's" in line for line in lines)
    found = _run(result.python_executable, "import msgpack\nout = list(msgpack.version)")
    assert found == [1, 0, 8]


def test_a_base_is_built_once_then_reused(tmp_path: Path) -> None:
    """Asserted through the builder's events: the second call installs nothing."""
    tiny = BaseSet((0, 0), "test", ("six==1.16.0",))
    first: list[str] = []
    built = ensure_base(tiny, current(), tmp_path / "bases", first.append)
    assert built.built and any(": building" in line for line in first)
    again: list[str] = []
    reused = ensure_base(tiny, current(), tmp_path / "bases", again.append)
    assert not reused.built and reused.path == built.path
    assert again == [f"base environment {built.hash}: reused (truss-0.0, {built.path})"]
    assert "six==1.16.0" in built.freeze.read_text().splitlines()


def test_gc_keeps_a_base_in_use_and_removes_one_nothing_names(tmp_path: Path) -> None:
    envs = tmp_path / "envs"
    in_use = ModelEnvPolicy(ModelEnvMode.TRUSS_BASE, envs / "_base")
    used = ensure_environment(_config(), tmp_path, envs, lambda _: None, in_use)
    orphan = ensure_base(BaseSet((0, 0), "test", ("six==1.16.0",)), current(), envs / "_base",
                         lambda _: None)  # fmt: skip
    report = collect(envs, {used.env_hash}, started=time.time() + 1)
    assert report.removed == (f"_base/{orphan.hash}",)
    assert Path(used.python_executable).exists()
    assert _run(used.python_executable, "import numpy\nout = 1") == 1
    # The environment goes, then its base with it.
    report = collect(envs, set(), started=time.time() + 1)
    assert len(report.removed) == 2 and not any((envs / "_base").glob("[0-9a-f]*"))


def test_server_python_uses_the_interpreter_when_it_satisfies_the_requirements(
    tmp_path: Path,
) -> None:
    config = _config(requirements=["httpx>=0.20", "PyYAML", "--extra-index-url https://x/"])
    result = ensure_environment(config, tmp_path, tmp_path / "envs", print, OFFLINE)
    assert result.python_executable == sys.executable
    assert not (tmp_path / "envs").exists()  # nothing built, nothing downloaded
    assert environment_hash(config, tmp_path, policy=OFFLINE) is None


def test_server_python_fails_naming_each_unsatisfied_requirement(tmp_path: Path) -> None:
    (tmp_path / "requirements.txt").write_text("kingpost-no-such-package==1.0\n")
    config = _config(requirements=["httpx<0.1", "PyYAML"], requirements_file="requirements.txt")
    with pytest.raises(BuildError) as caught:
        ensure_environment(config, tmp_path, tmp_path / "envs", print, OFFLINE)
    message = caught.value.message
    assert "KINGPOST_MODEL_ENV=server-python" in message
    assert "httpx (<0.1): " in message and " is installed" in message
    assert "kingpost-no-such-package (==1.0): not installed" in message
    assert "PyYAML" not in message


def _cli(*args: str, base_dir: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KINGPOST_")}
    env["KINGPOST_BASE_ENVS_DIR"] = base_dir
    return subprocess.run(
        [sys.executable, "-m", "kingpost.cli", "venvs", "base", *args],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip


def test_venvs_base_builds_the_base_ahead_of_any_push(tmp_path: Path) -> None:
    """What CI runs before the tests; a server later finds the same directory."""
    out = _cli(base_dir=shared_base_envs_dir())
    assert out.returncode == 0, out.stderr
    path = Path(out.stdout.strip())
    assert (path / "kingpost-base.json").is_file() and path.parent == Path(shared_base_envs_dir())
    lines: list[str] = []
    ensure_environment(_config(), tmp_path, tmp_path / "envs", lines.append, BASE)
    assert f"base environment {path.name}: reused" in "\n".join(lines)
    bad = _cli("--truss-version", "newest", base_dir=str(tmp_path / "unused"))
    assert bad.returncode == 2 and "--truss-version: 'newest' is not a Truss version" in bad.stderr


@pytest.mark.slow
def test_without_uv_pip_layers_requirements_on_a_base_it_sees(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pip runs inside the layered venv, so it sees the base's packages as installed and
    adds only what is missing. A small base (the server's own four) keeps this quick."""
    from kingpost.envs.builder import SERVER_REQUIREMENTS

    monkeypatch.setattr("kingpost.envs.installer.find_uv", lambda: None)
    small = BaseSet((0, 0), "test", SERVER_REQUIREMENTS)
    monkeypatch.setattr("kingpost.envs.builder.base_set_for", lambda *_: small)
    policy = ModelEnvPolicy(ModelEnvMode.TRUSS_BASE, tmp_path / "bases")
    lines: list[str] = []
    config = _config(requirements=["six==1.16.0", "PyYAML>=6.0"])
    result = ensure_environment(config, tmp_path, tmp_path / "envs", lines.append, policy)
    assert any("with pip" in line for line in lines), lines
    found = _run(result.python_executable, "import six, yaml\nout = [six.__version__, "
                 "yaml.__file__]")  # fmt: skip
    assert found[0] == "1.16.0"
    assert str(found[1]).startswith(str(tmp_path / "bases"))
