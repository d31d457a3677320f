"""Recorded resolutions: a rebuilt environment installs what its first build resolved.

The "index" here is a local find-links folder of wheels made by the test, so that it can
move under the environment the way PyPI does between two builds.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from kingpost.config import TrussConfig
from kingpost.envs import ensure_custom_server_environment, ensure_environment
from kingpost.envs.builder import PINS_DIR, READY_MARKER
from kingpost.envs.gc import list_environments
from kingpost.errors import BuildError

PROBE = "kingpost-pin-probe"
MODULE = "kingpost_pin_probe"
CUSTOM_SERVER = {
    "start_command": "python3 -m http.server 8000",
    "server_port": 8000,
    "predict_endpoint": "/",
    "readiness_endpoint": "/",
    "liveness_endpoint": "/",
}


def _wheel(folder: Path, version: str) -> Path:
    """A pure-Python wheel of :data:`PROBE` whose module knows its own version."""
    dist = f"{MODULE}-{version}"
    files = {
        f"{MODULE}.py": f"VERSION = {version!r}\n",
        f"{dist}.dist-info/METADATA": (
            f"Metadata-Version: 2.1\nName: {PROBE}\nVersion: {version}\n"
        ),
        f"{dist}.dist-info/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: kingpost-tests\nRoot-Is-Purelib: true\n"
            "Tag: py3-none-any\n"
        ),
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{name},sha256={digest.decode()},{len(text.encode())}")
    record.append(f"{dist}.dist-info/RECORD,,")
    files[f"{dist}.dist-info/RECORD"] = "\n".join(record) + "\n"
    path = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return path


def _installed(python: str) -> str:
    out = subprocess.run(
        [python, "-c", f"import {MODULE}; print({MODULE}.VERSION)"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def _custom(wheels: Path, requirement: str) -> TrussConfig:
    return TrussConfig.model_validate(
        {
            "docker_server": CUSTOM_SERVER,
            "requirements": ["--no-index", f"--find-links {wheels}", requirement],
        }
    )


@pytest.mark.slow
@pytest.mark.parametrize("installer", ["uv", "pip"])
def test_a_rebuild_installs_what_the_first_build_resolved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, installer: str
) -> None:
    if installer == "pip":
        monkeypatch.setattr("kingpost.envs.installer.find_uv", lambda: None)
    wheels, envs = tmp_path / "wheels", tmp_path / "envs"
    wheels.mkdir()
    _wheel(wheels, "1.0")
    config = _custom(wheels, PROBE)
    first = ensure_custom_server_environment(config, tmp_path, envs, lambda _: None)
    assert first is not None and _installed(first.python_executable) == "1.0"
    (info,) = list_environments(envs)
    assert f"{PROBE}==1.0" in info.packages

    _wheel(wheels, "2.0")  # the index moves on
    shutil.rmtree(envs / first.env_hash)  # collected (`venvs gc`), or uv was upgraded
    lines: list[str] = []
    again = ensure_custom_server_environment(config, tmp_path, envs, lines.append)
    assert again is not None and not again.reused
    assert _installed(again.python_executable) == "1.0"
    assert any("versions recorded when this environment was first built" in x for x in lines)

    # A changed requirement is a new resolution, which finds the new version.
    changed = _custom(wheels, f"{PROBE}>=1")
    fresh = ensure_custom_server_environment(changed, tmp_path, envs, lambda _: None)
    assert fresh is not None and _installed(fresh.python_executable) == "2.0"
    assert len(list((envs / PINS_DIR).glob("*.txt"))) == 2


@pytest.mark.slow
def test_a_pin_that_can_no_longer_be_installed_fails_naming_the_file(tmp_path: Path) -> None:
    wheels, envs = tmp_path / "wheels", tmp_path / "envs"
    wheels.mkdir()
    old = _wheel(wheels, "1.0")
    config = _custom(wheels, PROBE)
    first = ensure_custom_server_environment(config, tmp_path, envs, lambda _: None)
    assert first is not None
    shutil.rmtree(envs / first.env_hash)
    old.unlink()  # the index dropped the version the environment was built with
    _wheel(wheels, "2.0")
    with pytest.raises(BuildError) as info:
        ensure_custom_server_environment(config, tmp_path, envs, lambda _: None)
    (pins,) = (envs / PINS_DIR).glob("*.txt")
    assert str(pins) in info.value.message and "delete that file" in info.value.message
    pins.unlink()
    rebuilt = ensure_custom_server_environment(config, tmp_path, envs, lambda _: None)
    assert rebuilt is not None and _installed(rebuilt.python_executable) == "2.0"


@pytest.mark.slow
def test_a_model_environment_records_every_package_it_runs_with(tmp_path: Path) -> None:
    """The server's own packages and the fastapi/pydantic step are in the list too, and a
    rebuild pins the step to what the first build added."""
    wheels, envs = tmp_path / "wheels", tmp_path / "envs"
    wheels.mkdir()
    _wheel(wheels, "1.0")
    config = TrussConfig.model_validate({"requirements": [f"--find-links {wheels}", PROBE]})
    first = ensure_environment(config, tmp_path, envs, lambda _: None)
    marker = json.loads((envs / first.env_hash / READY_MARKER).read_text())
    names = {line.split("==")[0].lower() for line in marker["packages"]}
    assert {PROBE, "httptools", "msgpack", "pyyaml", "fastapi", "pydantic"} <= names
    (pins,) = (envs / PINS_DIR).glob("*.txt")
    assert sorted(pins.read_text().splitlines()) == sorted(marker["packages"])


def test_hashed_requirements_are_pinned_by_the_user_and_get_no_pins(tmp_path: Path) -> None:
    from kingpost.envs.builder import _custom_server_inputs, _pins_path

    six = "six==1.16.0 --hash=sha256:" + "0" * 64
    config = TrussConfig.model_validate({"docker_server": CUSTOM_SERVER, "requirements": [six]})
    inputs = _custom_server_inputs(config, tmp_path, lambda _: None)
    assert inputs is not None and _pins_path(inputs, tmp_path) is None
    plain = TrussConfig.model_validate({"docker_server": CUSTOM_SERVER, "requirements": ["six"]})
    inputs = _custom_server_inputs(plain, tmp_path, lambda _: None)
    assert inputs is not None and _pins_path(inputs, tmp_path) is not None


def test_the_pins_key_ignores_the_installer_and_follows_the_requirements(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kingpost.envs import builder
    from kingpost.envs.installer import Installer

    config = TrussConfig.model_validate({"requirements": ["six"]})
    inputs = builder._model_inputs(config, tmp_path, lambda _: None)
    assert inputs is not None
    key, env_hash = builder.pins_key(inputs), builder._hash(inputs, Installer(lambda _: None))
    monkeypatch.setattr(Installer, "version", lambda self: "uv 99.0.0")
    assert builder._hash(inputs, Installer(lambda _: None)) != env_hash
    assert builder.pins_key(inputs) == key
    other = builder._model_inputs(
        TrussConfig.model_validate({"requirements": ["six<2"]}), tmp_path, lambda _: None
    )
    assert other is not None and builder.pins_key(other) != key


@pytest.mark.slow
def test_a_pinned_rebuild_with_pip_and_no_requirements_builds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pip refuses a run of constraints alone: a model whose only input is its server's
    requirements must rebuild with its pins all the same."""
    from kingpost.envs import builder

    monkeypatch.setattr("kingpost.envs.installer.find_uv", lambda: None)
    envs = tmp_path / "envs"
    inputs = builder._Inputs((), (), builder.current())  # a model with nothing of its own
    first_log: list[str] = []
    builder._build(inputs, builder.Installer(first_log.append), envs, envs / "a", lambda _: None)
    assert (envs / PINS_DIR / f"{builder.pins_key(inputs)}.txt").is_file()
    lines: list[str] = []
    builder._build(inputs, builder.Installer(lines.append), envs, envs / "b", lines.append)
    assert any("versions recorded" in line for line in lines)
    marker = json.loads((envs / "b" / READY_MARKER).read_text())
    first = json.loads((envs / "a" / READY_MARKER).read_text())
    assert marker["packages"] == first["packages"]
