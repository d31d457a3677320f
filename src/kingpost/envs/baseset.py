"""The packages Truss's model server gives every model, per Truss version.

Truss installs ``truss/templates/server/requirements.txt`` into every model-class image
before the model's own requirements, so model code imports numpy, requests, pydantic
(through fastapi), the OpenTelemetry SDK ... without listing them. Kingpost builds one
environment of the same set (see :mod:`kingpost.envs.base`) under every model-class
deployment's own. The sets below are written from Truss's file at the tags named; the
server-side tools a model does not import are left out (``truss-transfer``, Baseten's
downloader, whose work Kingpost's weights system does; ``cython``, a build tool;
``argparse`` and ``aiocontextvars``, back-ports the Pythons Kingpost runs on have
built in). ``httptools`` is Kingpost's own server's (uvicorn's optional parser, so a
model sees a package it would see on Truss too).

Which set: ``truss_version`` in config.yaml (what ``truss init`` pins a project to,
``"0.18.5"``), else ``KINGPOST_TRUSS_VERSION``, else :data:`DEFAULT_TRUSS_VERSION`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from kingpost.errors import ConfigError

__all__ = ["BASE_SETS", "DEFAULT_TRUSS_VERSION", "BaseSet", "base_set_for", "parse_truss_version"]

_COMMON: tuple[str, ...] = (
    "aiofiles>=24.1.0",
    "aiohttp>=3.10.11",
    "joblib>=1.2.0",
    "loguru>=0.7.2",
    "msgpack-numpy==0.4.8",
    "msgpack==1.1.0",
    "numpy>=1.23.5,<2.0",
    "opentelemetry-api>=1.25.0",
    "opentelemetry-exporter-otlp>=1.25.0",
    "opentelemetry-sdk>=1.25.0",
    "prometheus-client>=0.21.1",
    "psutil>=5.9.4",
    "python-json-logger>=2.0.2",
    "pyyaml>=6.0.0",
    "requests>=2.31.0",
    "uvicorn>=0.24.0",
    "uvloop>=0.19.0",
    "websockets>=10.0",
    "httptools>=0.6",
)


@dataclass(frozen=True)
class BaseSet:
    """One Truss release series' server packages."""

    since: tuple[int, int]
    """The first Truss ``major.minor`` this set is for (until the next set's)."""
    source: str
    """The Truss tag its requirements were read from."""
    requirements: tuple[str, ...]

    @property
    def label(self) -> str:
        return f"truss-{self.since[0]}.{self.since[1]}"


BASE_SETS: tuple[BaseSet, ...] = (
    BaseSet(
        (0, 9),
        "v0.9.60",
        (
            "aiofiles==24.1.0",
            "fastapi==0.114.1",
            "joblib==1.2.0",
            "loguru==0.7.2",
            "msgpack-numpy==0.4.8",
            "msgpack==1.1.0",
            "numpy>=1.23.5",
            "opentelemetry-api>=1.25.0",
            "opentelemetry-exporter-otlp>=1.25.0",
            "opentelemetry-sdk>=1.25.0",
            "psutil==5.9.4",
            "python-json-logger==2.0.2",
            "pyyaml==6.0.0",
            "requests==2.31.0",
            "uvicorn==0.24.0",
            "uvloop==0.19.0",
            "httptools>=0.6",
        ),
    ),
    BaseSet((0, 10), "v0.10.0", ("fastapi>=0.114", *_COMMON)),
    BaseSet((0, 13), "v0.13.0", ("fastapi>=0.114,<0.125.0", *_COMMON)),
)
"""Oldest first. v0.13.0 to v0.18.26 (the newest tag read) list the same packages."""

DEFAULT_TRUSS_VERSION = "0.18"

_VERSION = re.compile(r"v?(\d+)\.(\d+)(?:\.\d+)?(?:(?:rc|a|b|\.dev)\d*)?")


def parse_truss_version(value: str, where: str) -> tuple[int, int]:
    """``"0.18.5"``, ``"v0.13.0rc1"`` or ``"0.10"`` -> ``(0, 18)``; anything else is a
    ConfigError naming ``where`` (the field or setting) and the value."""
    match = _VERSION.fullmatch(value.strip())
    if match is None:
        raise ConfigError(
            f"{where}: {value!r} is not a Truss version; write major.minor[.patch], "
            f"e.g. {DEFAULT_TRUSS_VERSION!r}"
        )
    return int(match.group(1)), int(match.group(2))


def base_set_for(
    config_version: object,
    default: str | None,
    log: Callable[[str], None],
    where: str = "config.yaml: `truss_version`",
) -> BaseSet:
    """The set for a project: its config.yaml ``truss_version`` when it has one (``where``
    names it in an error), else ``default`` (the ``KINGPOST_TRUSS_VERSION`` setting),
    else the newest."""
    if config_version is not None:
        version = parse_truss_version(str(config_version), where)
    elif default:
        version = parse_truss_version(default, "KINGPOST_TRUSS_VERSION")
    else:
        version = parse_truss_version(DEFAULT_TRUSS_VERSION, "DEFAULT_TRUSS_VERSION")
    if version < BASE_SETS[0].since:
        log(
            f"warning: Truss {version[0]}.{version[1]} is older than the oldest base set "
            f"Kingpost knows ({BASE_SETS[0].label}); using that one"
        )
        return BASE_SETS[0]
    return [s for s in BASE_SETS if s.since <= version][-1]
