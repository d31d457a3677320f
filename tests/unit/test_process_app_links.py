"""The process engine links weights mounted under ``/app/`` into a replica's app directory,
where it has the project (and its data directory) that containers have at ``/app``."""

from __future__ import annotations

from pathlib import Path

import pytest

from kingpost.config import parse_config
from kingpost.controller.specs import replica_spec
from kingpost.engines.base import ReplicaSpec, WeightMount
from kingpost.engines.process import _link_app_weights
from kingpost.errors import EngineError


def test_weights_under_app_are_linked_where_the_replica_has_the_project(tmp_path: Path) -> None:
    app = tmp_path / "replica" / "app"
    (app / "assets" / "own").mkdir(parents=True)
    (app / "assets" / "replaced.txt").write_text("the project's own")
    tree = tmp_path / "trees" / "t1"
    tree.mkdir(parents=True)
    (tree / "config.json").write_text("{}")
    one = tmp_path / "trees" / "t2" / "words.txt"
    one.parent.mkdir()
    one.write_text("hola")
    spec = replica_spec(
        replica_id="r1", deployment_id="d1", model_id="m1", model_name="m", app_dir=app,
        config=parse_config("data_dir: assets\n").config, env={}, secrets={},
        weights=(
            WeightMount("/app/model_cache/esper", tree),
            WeightMount("/app/data/vocab/words.txt", one),
            WeightMount("/app/data/replaced.txt", one),
            WeightMount("/app/data/own", tree),
            WeightMount("/models/elsewhere", tree),
        ),
    )  # fmt: skip
    _link_app_weights(app, spec)
    assert (app / "model_cache" / "esper" / "config.json").read_text() == "{}"
    # /app/data is the data directory in a container: here it is `data_dir` in the app.
    assert (app / "assets" / "vocab" / "words.txt").read_text() == "hola"
    # A file of the project is replaced, as Truss's download would; a directory is kept.
    assert (app / "assets" / "replaced.txt").read_text() == "hola"
    assert (app / "assets" / "own").is_dir() and not (app / "assets" / "own").is_symlink()
    assert not (app / "models").exists() and not (app / "data").exists()


def _spec(app: Path, config: object, *weights: WeightMount) -> ReplicaSpec:
    return replica_spec(
        replica_id="r1", deployment_id="d1", model_id="m1", model_name="m", app_dir=app,
        config=config, env={}, secrets={}, weights=weights,
    )  # fmt: skip


def test_a_data_dir_out_of_the_app_directory_touches_no_host_file(tmp_path: Path) -> None:
    """A config stored before `data_dir` was checked: the engine still refuses to link
    outside the replica's copy (it runs as root, and `is_relative_to` compares text)."""
    app = tmp_path / "home" / "replicas" / "r1" / "app"
    app.mkdir(parents=True)
    victim = tmp_path / "victim.conf"
    victim.write_text("host file")
    weights = tmp_path / "trees" / "t1" / "victim.conf"
    weights.parent.mkdir(parents=True)
    weights.write_text("replaced")
    # as an older, unchecked config would have it
    config = parse_config("model_name: m\n").config.model_copy(update={"data_dir": "../" * 4})
    spec = _spec(app, config, WeightMount("/app/data/victim.conf", weights))
    with pytest.raises(EngineError, match="outside the replica's copy of the project"):
        _link_app_weights(app, spec)
    assert not victim.is_symlink() and victim.read_text() == "host file"


def test_a_link_in_the_project_is_not_followed_out_of_it(tmp_path: Path) -> None:
    """The project's own files (and what a replica may leave in its copy) can make a
    folder on the way a link: root must not create, replace or remove through it."""
    outside = tmp_path / "etc"
    outside.mkdir()
    (outside / "passwd").write_text("root:x:0:0")
    app = tmp_path / "replica" / "app"
    app.mkdir(parents=True)
    (app / "assets").symlink_to(outside)
    one = tmp_path / "trees" / "t2" / "passwd"
    one.parent.mkdir(parents=True)
    one.write_text("planted")
    config = parse_config("data_dir: assets\n").config
    spec = _spec(app, config, WeightMount("/app/data/passwd", one),
                 WeightMount("/app/data/new/file", one))  # fmt: skip
    with pytest.raises(EngineError, match="assets"):
        _link_app_weights(app, spec)
    assert (outside / "passwd").read_text() == "root:x:0:0"
    assert not (outside / "passwd").is_symlink() and not (outside / "new").exists()


def test_a_link_the_project_has_at_the_place_itself_is_replaced_not_followed(
    tmp_path: Path,
) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("kept")
    app = tmp_path / "replica" / "app"
    (app / "data").mkdir(parents=True)
    (app / "data" / "words.txt").symlink_to(outside)
    one = tmp_path / "trees" / "t2" / "words.txt"
    one.parent.mkdir(parents=True)
    one.write_text("hola")
    spec = _spec(app, parse_config("model_name: m\n").config,
                 WeightMount("/app/data/words.txt", one))  # fmt: skip
    _link_app_weights(app, spec)
    assert (app / "data" / "words.txt").read_text() == "hola"
    assert outside.read_text() == "kept"
