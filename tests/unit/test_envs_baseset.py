"""Which Truss server set a project gets, and the offline mode's requirement check."""

from __future__ import annotations

import pytest

from kingpost.config.loader import parse_config
from kingpost.config.rules import config_warnings
from kingpost.envs.baseset import BASE_SETS, base_set_for, parse_truss_version
from kingpost.envs.offline import unsatisfied
from kingpost.errors import ConfigError


@pytest.mark.parametrize(
    ("config_version", "default", "source"),
    [
        (None, None, "v0.13.0"),  # the newest set: 0.13 to 0.18 list the same packages
        ("0.18.5", None, "v0.13.0"),
        ("0.12.3", None, "v0.10.0"),
        ("v0.10.0rc1", None, "v0.10.0"),
        ("0.9.60", "0.18", "v0.9.60"),  # config.yaml's wins over the setting
        (None, "0.9", "v0.9.60"),
        ("1.2", None, "v0.13.0"),  # newer than any known: the newest
    ],
)
def test_the_set_follows_truss_version(
    config_version: str | None, default: str | None, source: str
) -> None:
    assert base_set_for(config_version, default, print).source == source


def test_a_truss_older_than_any_set_gets_the_oldest_with_a_warning() -> None:
    lines: list[str] = []
    assert base_set_for("0.7.1", None, lines.append) == BASE_SETS[0]
    assert "older than the oldest base set" in lines[0]


def test_a_bad_truss_version_names_where_it_came_from() -> None:
    with pytest.raises(ConfigError, match=r"config.yaml: `truss_version`: 'latest'"):
        base_set_for("latest", None, print)
    with pytest.raises(ConfigError, match=r"KINGPOST_TRUSS_VERSION: '18'"):
        base_set_for(None, "18", print)
    assert parse_truss_version("0.18", "x") == (0, 18)


def test_every_set_gives_what_models_import_unlisted() -> None:
    for base_set in BASE_SETS:
        names = {r.split("=")[0].split(">")[0].split("<")[0].lower() for r in base_set.requirements}
        assert {"numpy", "requests", "fastapi", "pyyaml", "opentelemetry-sdk"} <= names
        # The model server's own hot path, so a layered environment installs nothing.
        assert {"httptools", "msgpack", "uvloop"} <= names
        # Kingpost's control-plane dependencies stay out of the model's environment.
        assert not names & {"sqlalchemy", "alembic", "cryptography", "pydantic-settings", "rich"}


def test_truss_version_in_config_yaml_is_not_called_unknown() -> None:
    loaded = parse_config("truss_version: 0.18.5\ntrusted: true\n")
    keys = [issue.path for issue in config_warnings(loaded.config, {})]
    assert ("trusted",) in keys and ("truss_version",) not in keys


ENV = {"python_version": "3.11", "sys_platform": "linux", "platform_system": "Linux"}


@pytest.mark.parametrize(
    ("requirement", "problem"),
    [
        ("torch", None),
        ("torch>=2.1,<3", None),
        ("Torch_Vision==0.19.*", None),  # names compare canonicalized
        ("torch>=2.5", "torch (>=2.5): 2.4.1 is installed"),
        ("flash-attn", "flash-attn (any version): not installed"),
        ("flash-attn; sys_platform == 'darwin'", None),  # not for this machine
        ("accelerate>=0.30; python_version >= '3.10'", "accelerate (>=0.30): not installed"),
        ("torch==2.4.1 --hash=sha256:abc", None),
        ("--extra-index-url https://download.pytorch.org/whl/cu121", None),
        ("# a comment", None),
    ],
)
def test_the_offline_check_names_each_unsatisfied_rule(
    requirement: str, problem: str | None
) -> None:
    installed = {"torch": "2.4.1", "torch-vision": "0.19.0"}
    assert unsatisfied([requirement], installed, ENV) == ([problem] if problem else [])


def test_the_offline_check_refuses_what_it_cannot_read() -> None:
    with pytest.raises(ConfigError, match=r"'git\+https://x/y.git' is not a requirement"):
        unsatisfied(["git+https://x/y.git"], {}, ENV)


def test_a_bad_truss_version_is_refused_when_the_config_is_read() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config("truss_version: latest\n")
    assert "truss_version" in str(caught.value) and "major.minor[.patch]" in str(caught.value)
    assert '(found "latest")' in str(caught.value)
