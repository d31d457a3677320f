"""The engine registry: names, refusals and warnings come from the engine's entry."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kingpost.config import parse_config
from kingpost.config._yaml import Issue
from kingpost.engines import registry
from kingpost.engines.fake import FakeEngine
from kingpost.errors import ValidationError
from kingpost.settings import Settings

CUSTOM_NO_COMMAND = """\
model_name: x
docker_server:
  server_port: 8000
  predict_endpoint: /p
  readiness_endpoint: /h
  liveness_endpoint: /h
  no_build: true
base_image:
  image: registry.local/server:1
system_packages: [ffmpeg]
"""


@pytest.fixture
def extra_engine() -> Iterator[registry.EngineKind]:
    def refuse_gpus(config: object) -> list[Issue]:
        return [Issue(("resources",), "no accelerators here", has_value=False)]

    kind = registry.EngineKind(
        "extra", "an engine a test adds", lambda _: FakeEngine(), builds="its bundle",
        refusals=refuse_gpus,
    )  # fmt: skip
    registry.register(kind)
    yield kind
    del registry._KINDS["extra"]


def test_users_choose_among_the_user_facing_engines() -> None:
    assert registry.engine_names() == ("process", "docker", "ray")
    assert "fake" in registry.engine_names(all_kinds=True)
    with pytest.raises(ValidationError) as info:
        registry.engine_kind("fake", all_kinds=False)
    assert "choose one of process, docker, ray" in info.value.message
    with pytest.raises(ValidationError, match=r"unknown engine 'nope'"):
        registry.create_engine("nope", Settings())


def test_each_engine_says_what_it_builds_and_whether_push_checks_it() -> None:
    process, docker = registry.engine_kind("process"), registry.engine_kind("docker")
    assert (process.builds, process.check_at_push) == ("the Python environment", False)
    assert (docker.builds, docker.check_at_push) == ("the image", True)


def test_config_rules_come_from_the_chosen_engine() -> None:
    config = parse_config(CUSTOM_NO_COMMAND).config
    (refusal,) = registry.engine_kind("process").refusals(config)
    assert refusal.path == ("docker_server", "start_command")
    assert registry.engine_kind("docker").refusals(config) == []
    warned = {i.path for i in registry.engine_config_warnings(config, "process")}
    assert ("base_image", "image") in warned
    assert registry.engine_config_warnings(config, "docker") == []
    assert registry.engine_config_warnings(config, "unknown") == []


def test_a_registered_engine_is_offered_and_built_with_nothing_else_changed(
    extra_engine: registry.EngineKind,
) -> None:
    assert "extra" in registry.engine_names()
    assert isinstance(registry.create_engine("extra", Settings()), FakeEngine)
    config = parse_config(CUSTOM_NO_COMMAND).config
    assert [i.message for i in registry.engine_kind("extra").refusals(config)] == [
        "no accelerators here"
    ]


def test_whether_replicas_outlive_the_control_plane_is_the_engines_own_word() -> None:
    from kingpost.engines.docker import DockerEngine
    from kingpost.engines.process import ProcessEngine

    for name, engine in (("process", ProcessEngine), ("docker", DockerEngine)):
        assert registry.engine_kind(name).keeps_replicas is engine.keeps_replicas, name
    assert registry.engine_kind("fake").keeps_replicas is FakeEngine.keeps_replicas
