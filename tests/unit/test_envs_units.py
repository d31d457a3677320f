"""Unit tests of the environment builder's parts that run no installer."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

import kingpost
from kingpost.config import TrussConfig
from kingpost.envs import builder, ensure_environment
from kingpost.envs.installer import resolution_conflict
from kingpost.errors import BuildError, ConfigError


def _fake_venv_python(tmp_path: Path) -> tuple[Path, Path]:
    """A ``python`` that only answers the builder's purelib question."""
    site = tmp_path / "site"
    site.mkdir()
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\necho {site}\n")
    python.chmod(0o755)
    return python, site


def test_the_kingpost_link_survives_a_build_that_made_it_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two first builds of different hashes link at once: the one that finds the link
    made between its check and its own symlink gets the same link, not FileExistsError."""
    package = Path(kingpost.__file__).resolve().parent
    python, site = _fake_venv_python(tmp_path)
    real_symlink_to = Path.symlink_to

    def other_build_wins(self: Path, target: Path, target_is_directory: bool = False) -> None:
        final = self.with_name("kingpost")
        if not final.is_symlink():
            real_symlink_to(final, package, target_is_directory=True)
        real_symlink_to(self, target, target_is_directory)

    monkeypatch.setattr(Path, "symlink_to", other_build_wins)
    envs = tmp_path / "envs"
    builder._link_kingpost(python, envs)
    link_dir = Path((site / "zz_kingpost.pth").read_text().strip())
    assert link_dir.parent == envs / "_kingpost"
    assert (link_dir / "kingpost").readlink() == package
    assert [p.name for p in link_dir.iterdir()] == ["kingpost"]


def test_only_a_resolver_conflict_counts_as_one() -> None:
    """It skips fastapi/pydantic for good; any other failure is retried on reuse."""

    def failed(*tail: str) -> BuildError:
        return BuildError("install failed", output_tail=list(tail))

    assert resolution_conflict(failed("error: No solution found when resolving dependencies"))
    assert resolution_conflict(failed("ERROR: ResolutionImpossible: for help visit https://"))
    assert not resolution_conflict(failed("error: Failed to fetch: `https://pypi.org/simple/`"))
    assert not resolution_conflict(BuildError("no tail"))


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (
            '[project]\nname = "m"\nversion = "0"\ndynamic = ["dependencies"]\n',
            '[project].dynamic lists "dependencies"',
        ),
        ('[tool.poetry.dependencies]\nsix = "1.16.0"\n', "has no [project] table (found [tool])"),
        ('[project]\ndependencies = "six"\n', "must be a list of requirement strings, found 'six'"),
        ("[project\n", "is not valid TOML (Expected ']' at the end of a table declaration"),
    ],
)
def test_a_pyproject_that_would_install_nothing_is_refused_before_any_build(
    tmp_path: Path, text: str, says: str
) -> None:
    (tmp_path / "deps").mkdir()
    (tmp_path / "deps" / "pyproject.toml").write_text(text)
    config = TrussConfig.model_validate({"requirements_file": "deps/pyproject.toml"})
    with pytest.raises(ConfigError) as info:
        ensure_environment(config, tmp_path, tmp_path / "envs", lambda _: None)
    assert info.value.message.startswith("config.yaml: `requirements_file` deps/pyproject.toml")
    assert says in info.value.message
    assert info.value.details == {"field": "requirements_file", "value": "deps/pyproject.toml"}
    assert not (tmp_path / "envs").exists()


def _env(envs_dir: Path, name: str, *, ready: bool = True, used: float = 0.0) -> Path:
    path = envs_dir / name
    (path / "bin").mkdir(parents=True)
    (path / "bin" / "python").write_bytes(b"x" * 1000)
    if ready:
        marker = path / builder.READY_MARKER
        marker.write_text('{"python": "3.11.7", "requirements": ["six==1.16.0"]}')
        os.utime(marker, (used, used))
    return path


def test_gc_removes_unused_and_dead_environments_and_keeps_the_rest(tmp_path: Path) -> None:
    from kingpost.envs.gc import collect, list_environments

    envs = tmp_path / "envs"
    now = time.time()
    used, unused, dead = "a" * 24, "b" * 24, "c" * 24
    for name in (used, unused):
        _env(envs, name, used=now - 3600)
    _env(envs, dead, ready=False)  # a build that died: no marker
    (envs / "_kingpost").mkdir()  # the builder's own link directory
    listed = {v.hash: v for v in list_environments(envs)}
    assert set(listed) == {used, unused, dead}
    assert listed[used].ready and not listed[dead].ready
    assert listed[used].requirements == ("six==1.16.0",) and listed[used].size_bytes > 1000
    report = collect(envs, {used}, started=now)
    assert sorted(report.removed) == [unused, dead] and report.kept == 1
    assert report.removed_bytes > 2000
    assert sorted(p.name for p in envs.iterdir() if not p.name.startswith(".")) == [
        "_kingpost",
        used,
    ]


def test_gc_keeps_an_environment_built_or_reused_while_it_ran(tmp_path: Path) -> None:
    """A deployment pushed after the kept set was taken may have just built (or picked)
    an environment the set does not name: its marker is newer than the collection."""
    import threading

    from kingpost._filelock import locked
    from kingpost.envs.gc import collect

    envs = tmp_path / "envs"
    started = time.time()
    reused = _env(envs, "d" * 24, used=started + 1)
    building = envs / ("e" * 24)
    building.mkdir()
    holding, release = threading.Event(), threading.Event()

    def build() -> None:  # holds the build lock, then writes the marker, as _ensure does
        with locked(envs / f".{building.name}.lock"):
            holding.set()
            release.wait(5)
            (building / builder.READY_MARKER).write_text("{}")

    thread = threading.Thread(target=build)
    thread.start()
    holding.wait(5)
    threading.Timer(0.3, release.set).start()
    report = collect(envs, set(), started)
    thread.join(5)
    assert report.removed == () and report.kept == 2
    assert reused.is_dir() and (building / builder.READY_MARKER).is_file()


def test_uv_is_asked_its_version_once_per_binary(tmp_path: Path) -> None:
    """`venvs gc` hashes every deployment's environment, and each hash ran `uv --version`."""
    from kingpost.envs.installer import Installer

    calls = tmp_path / "calls"
    uv = tmp_path / "uv"
    uv.write_text(f'#!/bin/sh\necho x >> {calls}\necho "uv 9.9.1"\n')
    uv.chmod(0o755)
    installer = Installer(lambda line: None)
    installer.uv = str(uv)
    assert [installer.version() for _ in range(5)] == ["uv 9.9.1"] * 5
    assert calls.read_text().count("x") == 1
    # Another binary at the same path (an upgrade) is asked again.
    uv.write_text(f'#!/bin/sh\necho x >> {calls}\necho "uv 10.0.0 (upgraded)"\n')
    assert installer.version() == "uv 10.0.0 (upgraded)"
    assert calls.read_text().count("x") == 2
