"""The process engine links weights mounted under ``/app/`` into a replica's app directory,
where it has the project (and its data directory) that containers have at ``/app``."""

from __future__ import annotations

from pathlib import Path

from kingpost.config import parse_config
from kingpost.controller.specs import replica_spec
from kingpost.engines.base import WeightMount
from kingpost.engines.process import _link_app_weights


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
