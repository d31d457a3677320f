"""The engines Kingpost knows, by name: how to build each and what each asks of a config.

Everything outside ``engines/`` that needs to know about an engine asks here (the API's
checks at push, the CLI's choices, config warnings, the controller's status words), so a
new engine (Ray, Kubernetes) is one :func:`register` call and a module of its own, not a
name threaded through the code. Factories import their module lazily: a CLI that only
lists names never imports the docker SDK.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kingpost._optional import optional_attr
from kingpost.errors import EngineError, ValidationError

if TYPE_CHECKING:
    from kingpost.config import TrussConfig
    from kingpost.config._yaml import Issue
    from kingpost.engines.base import Engine
    from kingpost.settings import Settings

__all__ = [
    "EngineKind",
    "create_engine",
    "engine_config_warnings",
    "engine_kind",
    "engine_names",
    "register",
]


def _no_issues(_: TrussConfig) -> list[Issue]:
    return []


@dataclass(frozen=True)
class EngineKind:
    name: str
    description: str
    create: Callable[[Settings], Engine]
    builds: str
    """What :meth:`Engine.prepare` makes, as the BUILDING status says it ("the image")."""
    user_facing: bool = True
    """Offered by the CLI and accepted by the API (the fake engine is for tests only)."""
    check_at_push: bool = False
    """Created when a deployment is pushed to it, so an unreachable engine (dockerd down)
    refuses the push instead of failing the deployment later."""
    keeps_replicas: bool = False
    """Its replicas outlive a clean stop of the control plane too (its engine's
    ``keeps_replicas``), unless ``--stop-replicas-on-exit``."""
    adopts_replicas: bool = False
    """Its replicas outlive a control plane that crashes, and the next one adopts them: it
    hands an adopted gateway's routes to them over as they are, while it holds requests
    for the others until their replicas are started anew."""
    refusals: Callable[[TrussConfig], list[Issue]] = _no_issues
    """Config problems that stop a push to this engine (errors, with key paths)."""
    warnings: Callable[[TrussConfig], list[Issue]] = _no_issues
    """Config keys this engine cannot honour; the push goes on, with this said."""


_KINDS: dict[str, EngineKind] = {}


def register(kind: EngineKind) -> None:
    _KINDS[kind.name] = kind


def engine_names(*, all_kinds: bool = False) -> tuple[str, ...]:
    """Names users may choose (``all_kinds``: the test-only ones too)."""
    return tuple(k.name for k in _KINDS.values() if all_kinds or k.user_facing)


def engine_kind(name: str, *, all_kinds: bool = True) -> EngineKind:
    """The engine registered as ``name``; a :class:`ValidationError` naming the choices
    otherwise (``all_kinds=False``: test-only engines count as unknown)."""
    kind = _KINDS.get(name)
    if kind is None or not (all_kinds or kind.user_facing):
        raise ValidationError(
            f"engine: unknown engine {name!r}; choose one of {', '.join(engine_names())}",
            field="engine",
            value=name,
        )
    return kind


def create_engine(name: str, settings: Settings) -> Engine:
    """Build the engine registered under ``name``."""
    return engine_kind(name).create(settings)


def engine_config_warnings(config: TrussConfig, engine: str | None) -> list[Issue]:
    """What ``engine`` cannot honour in ``config`` (nothing for an unknown or no engine:
    the push refuses an unknown one with its own error)."""
    kind = _KINDS.get(engine or "")
    return kind.warnings(config) if kind is not None else []


# -- the engines of this build ---------------------------------------------------------------
def _process(settings: Settings) -> Engine:
    from kingpost.engines.process import ProcessEngine

    return ProcessEngine(settings)


def _docker(settings: Settings) -> Engine:
    docker_engine = optional_attr("kingpost.engines.docker", "DockerEngine")
    if docker_engine is None:
        raise EngineError(
            "engine: the docker engine is not part of this build yet; deploy with "
            "--engine process (the default)",
            field="engine",
            value="docker",
        )
    engine: Engine = docker_engine(settings)
    return engine


def _ray(settings: Settings) -> Engine:
    from kingpost.engines.ray_engine import RayEngine

    return RayEngine(settings)


def _fake(_: Settings) -> Engine:
    from kingpost.engines.fake import FakeEngine

    return FakeEngine()


def _process_refusals(config: TrussConfig) -> list[Issue]:
    from kingpost.config.rules import process_engine_refusals

    return process_engine_refusals(config)


def _process_warnings(config: TrussConfig) -> list[Issue]:
    from kingpost.config.rules import process_engine_warnings

    return process_engine_warnings(config)


register(
    EngineKind(
        "process",
        "local subprocesses, each in its own namespaces when run as root (the default)",
        _process,
        builds="the Python environment",
        adopts_replicas=True,
        refusals=_process_refusals,
        warnings=_process_warnings,
    )
)
register(
    EngineKind(
        "docker",
        "containers through the Docker Engine, images built from config.yaml",
        _docker,
        builds="the image",
        check_at_push=True,
        keeps_replicas=True,
        adopts_replicas=True,
    )
)
register(
    EngineKind(
        "ray",
        "actors on the nodes of a Ray cluster (KINGPOST_RAY_ADDRESS), one per replica",
        _ray,
        builds="the Python environment, on each node",
        check_at_push=True,
        keeps_replicas=True,
        refusals=_process_refusals,
        warnings=_process_warnings,
    )
)
register(EngineKind("fake", "in-memory replicas for tests", _fake, "nothing", user_facing=False))
