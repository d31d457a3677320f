"""The table of Truss config keys (``kingpost.config.support``) against what Kingpost does.

Every field of ``TrussConfig`` needs a row; every key a sweep config sets is checked on
each engine: an *applied* key earns no warning or error naming it, a *warned* one a
warning naming it from the loader, a *refused* one an error naming it (at load, or the
engine's and the weights' checks at push). The sweep configs under
``tests/fixtures/configs/sweep/`` are written after the shapes common in
basetenlabs/truss-examples (vLLM and TEI servers, model classes, model_cache,
external_data, ...).
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from kingpost.config import TrussConfig, load_config
from kingpost.config.support import (
    ENGINES,
    README_END,
    README_START,
    ROWS,
    SAME_AS,
    Status,
    field_paths,
    markdown,
    row_for,
    support,
    with_table,
)
from kingpost.config.support import (
    _is_list as is_list,
)
from kingpost.config.support import (
    _models_in as models_in,
)
from kingpost.engines.registry import engine_kind, engine_names
from kingpost.errors import ConfigError
from kingpost.weights import validate_weights

ROOT = Path(__file__).resolve().parents[2]
SWEEP = ROOT / "tests" / "fixtures" / "configs" / "sweep"
SWEEP_FILES = sorted(SWEEP.glob("*.yaml"))


# -- the table covers the schema ------------------------------------------------------------
def _children(path: str) -> list[str]:
    return [p for p in field_paths() if re.fullmatch(re.escape(path) + r"(\[\])?\.[^.\[]+", p)]


def _covered(path: str) -> bool:
    if row_for(path) is not None:
        return True
    children = _children(path)
    return bool(children) and all(_covered(c) for c in children)


def test_every_config_field_has_a_row() -> None:
    missing = [p for p in field_paths() if not _covered(p)]
    assert not missing, (
        f"config keys with no row in kingpost.config.support.ROWS: {missing}; say there "
        "whether each engine applies, warns about or refuses them"
    )


def test_every_row_names_a_config_field() -> None:
    paths = set(field_paths())
    assert [r.key for r in ROWS if r.key not in paths] == []
    assert len({r.key for r in ROWS}) == len(ROWS)


def test_a_new_field_without_a_row_is_found() -> None:
    class Extra(BaseModel):
        brand_new: int = 0

    class Grown(TrussConfig):
        brand_new_section: Extra = Extra()

    paths = list(field_paths(Grown))
    assert "brand_new_section.brand_new" in paths
    assert row_for("brand_new_section.brand_new") is None


def test_the_table_has_a_column_per_user_facing_engine() -> None:
    assert set(ENGINES) | set(SAME_AS) == set(engine_names())


def test_the_readme_section_is_the_tables_output() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert README_START in text and README_END in text, "README lacks the config-keys markers"
    section = text.split(README_START, 1)[1].split(README_END, 1)[0]
    assert section.strip() == markdown().strip(), (
        "README.md's Truss config keys table is stale; regenerate it with "
        "`python -m kingpost.config.support --readme README.md`"
    )


def test_with_table_replaces_only_the_marked_section() -> None:
    readme = f"# T\n\nintro\n{README_START}\nold table\n{README_END}\n\n## Next\n"
    out = with_table(readme)
    assert out.startswith("# T\n\nintro\n") and out.endswith(f"{README_END}\n\n## Next\n")
    assert "old table" not in out and markdown() in out
    assert with_table(out) == out
    with pytest.raises(ValueError, match="markers"):
        with_table("# no markers\n")


# -- which keys a config sets ---------------------------------------------------------------
def _default(model: type[BaseModel], name: str) -> Any:
    field = model.model_fields[name]
    if field.default_factory is not None:
        return field.default_factory()  # type: ignore[call-arg]
    return field.default


def set_keys(
    raw: dict[str, Any], model: type[BaseModel] = TrussConfig, prefix: str = ""
) -> dict[str, list[Any]]:
    """Keys of the schema that ``raw`` sets to something other than their default, with
    the values it gives them (one per list item)."""
    keys: dict[str, list[Any]] = {}

    def add(found: dict[str, list[Any]]) -> None:
        for key, values in found.items():
            keys.setdefault(key, []).extend(values)

    for name, value in raw.items():
        if name not in model.model_fields:
            continue  # unknown keys are warned about as such
        path = f"{prefix}{name}"
        annotation = model.model_fields[name].annotation
        subs = models_in(annotation)
        if subs and is_list(annotation) and isinstance(value, list):
            for item in value:
                if isinstance(item, dict):
                    add(set_keys(item, subs[0], f"{path}[]."))
        elif subs and isinstance(value, dict):
            add(set_keys(value, subs[0], f"{path}."))
        elif value != _default(model, name) or _default(model, name) is PydanticUndefined:
            add({path: [value]})
    return keys


def test_set_keys_skips_defaults_and_walks_sections() -> None:
    raw = {
        "model_name": "m",
        "apply_library_patches": True,
        "runtime": {"predict_concurrency": 8, "transport": {"kind": "http"}},
        "model_cache": [{"repo_id": "a/b", "use_volume": False}],
        "trt_llm": {"build": {}},
    }
    assert set_keys(raw) == {
        "model_name": ["m"],
        "runtime.predict_concurrency": [8],
        "model_cache[].repo_id": ["a/b"],
        "model_cache[].use_volume": [False],
        "trt_llm": [{"build": {}}],
    }


# -- what the loader says about them --------------------------------------------------------
_WARNING = re.compile(r"^[^:]+:(?:\d+:)? (?P<path>[^ :]+): ")


def _norm(path: str) -> str:
    return re.sub(r"\[\d+\]", "[]", path)


def outcome(text: str, engine: str) -> tuple[list[str], list[str]]:
    """(paths warned about, paths refused) for a project with ``text`` as its config.yaml,
    pushed to ``engine``: what ``load_config`` says, then the engine's and the weights'
    checks that the API runs at push."""
    with tempfile.TemporaryDirectory() as project:
        (Path(project) / "config.yaml").write_text(text, encoding="utf-8")
        try:
            loaded = load_config(Path(project), engine=engine)
        except ConfigError as exc:
            return [], [_norm(e["path"]) for e in exc.details["errors"]]
    warned = []
    for warning in loaded.warnings:
        match = _WARNING.match(warning)
        assert match, f"a warning that names no key: {warning}"
        warned.append(_norm(match["path"]))
    refused = [
        _norm(".".join(map(str, i.path))) for i in engine_kind(engine).refusals(loaded.config)
    ]
    refused += [_norm(path) for path, _ in validate_weights(loaded.config.weights)]
    return warned, refused


def _below(path: str, key: str) -> bool:
    return path == key or path.startswith((key + ".", key + "["))


def names(path: str, key: str) -> bool:
    """Whether an issue at ``path`` is about ``key``: the key itself, a key below it, or
    the section it is in."""
    return _below(path, key) or _below(key, path)


def _without(raw: dict[str, Any], key: str) -> dict[str, Any]:
    assert "[" not in key, f"a refused key inside a list ({key}) needs its own handling"
    out = dict(raw)
    parts = key.split(".")
    node = out
    for part in parts[:-1]:
        node[part] = dict(node[part])
        node = node[part]
    del node[parts[-1]]
    return out


def _mismatches(raw: dict[str, Any], text: str, engine: str) -> list[str]:
    """Where the loader's answer for ``engine`` differs from the table, one line each."""
    no_build = bool((raw.get("docker_server") or {}).get("no_build"))
    asked = [
        (key, value, support(key, engine, value, no_build=no_build))
        for key, values in sorted(set_keys(raw).items())
        for value in values
    ]
    problems: list[str] = []
    warned, refused = outcome(text, engine)
    refused_keys = sorted({k for k, _, s in asked if s.status is Status.REFUSED})
    for key in refused_keys:
        if not any(names(p, key) for p in refused):
            problems.append(f"{key}: refused in the table, but no error names it ({refused})")
    if refused_keys:  # the rest is checked on the config without the refused keys
        for key in refused_keys:
            raw = _without(raw, key)
        warned, refused = outcome(yaml.safe_dump(raw, sort_keys=False), engine)
    for key, value, answer in asked:
        if key in refused_keys:
            continue
        what = f"{key} ({value!r}): {answer.status} in the table, but"
        if any(_below(p, key) for p in refused):
            problems.append(f"{what} an error names it ({refused})")
        if answer.status is Status.APPLIED and any(_below(p, key) for p in warned):
            problems.append(f"{what} a warning names it ({warned})")
        if answer.status is Status.WARNED and not any(names(p, key) for p in warned):
            problems.append(f"{what} no warning names it ({warned})")
    return problems


def test_the_sweep_has_configs() -> None:
    assert len(SWEEP_FILES) >= 10


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.stem)
def test_each_set_key_behaves_as_its_row_says(path: Path, engine: str) -> None:
    text = path.read_text(encoding="utf-8")
    raw = yaml.safe_load(text)
    assert set_keys(raw), f"{path.name} sets no key"
    assert _mismatches(raw, text, engine) == []


def test_the_sweep_sets_most_rows() -> None:
    """The sweep exercises the table: most rows have a config that sets their key."""
    seen = {
        row.key
        for path in SWEEP_FILES
        for key in set_keys(yaml.safe_load(path.read_text(encoding="utf-8")))
        if (row := row_for(key)) is not None
    }
    unexercised = sorted(r.key for r in ROWS if r.key not in seen)
    assert len(unexercised) <= len(ROWS) // 10, unexercised


# -- keys that were accepted and then ignored, each now warned or refused -------------------
UNREAD = [
    ("examples_filename: my_examples.yaml", "examples_filename"),
    ("spec_version: '1.0'", "spec_version"),
    ("input_type: image", "input_type"),
    ("model_framework: sklearn", "model_framework"),
    ("model_type: ModelWithDataLoader", "model_type"),
    ("live_reload: true", "live_reload"),
    ("use_local_src: true", "use_local_src"),
    ("external_package_dirs: [../shared]", "external_package_dirs"),
    (
        "base_image: {image: ghcr.io/a/b:1, docker_auth: "
        "{auth_method: REGISTRY_SECRET, secret_name: pull}}",
        "base_image.docker_auth",
    ),
    ("cache_internal: [{repo_id: a/b}]", "cache_internal"),
    ("build: {arguments: {engine: x}}", "build.arguments"),
    ("build: {secret_to_path_mapping: {hf_token: /root/.hf}}", "build.secret_to_path_mapping"),
    ("resources: {instance_type: H100:8x80}", "resources.instance_type"),
    ("resources: {node_count: 2}", "resources.node_count"),
    ("resources: {fabric: {kind: infiniband}}", "resources.fabric"),
    (
        "docker_server: {start_command: serve, server_port: 8000, predict_endpoint: /p, "
        "readiness_endpoint: /r, liveness_endpoint: /l}\nruntime: {enable_tracing_data: true}",
        "runtime.enable_tracing_data",
    ),
    ("runtime: {enable_debug_logs: true}", "runtime.enable_debug_logs"),
    ("runtime: {oidc: {enabled: true}}", "runtime.oidc"),
    ("runtime: {remote_ssh: {enabled: true}}", "runtime.remote_ssh"),
    (
        "runtime: {egress_restrictions: {ip_allow_list: [10.0.0.0/8]}}",
        "runtime.egress_restrictions",
    ),
    ("runtime: {truss_server_version_override: 0.9.50}", "runtime.truss_server_version_override"),
]


@pytest.mark.parametrize(("text", "key"), UNREAD, ids=[k for _, k in UNREAD])
def test_a_key_kingpost_does_not_act_on_is_warned_about(text: str, key: str) -> None:
    for engine in ENGINES:
        warned, refused = outcome(text, engine)
        assert refused == [] and key in warned, (engine, warned, refused)


def test_the_defaults_of_those_keys_earn_no_warning() -> None:
    text = (
        "examples_filename: examples.yaml\nspec_version: '2.0'\ninput_type: Any\n"
        "live_reload: false\nexternal_package_dirs: [shared]\n"
        "resources: {node_count: 1}\nruntime: {enable_debug_logs: false, oidc: {enabled: false},"
        " enable_tracing_data: true}\n"  # a model class's tracing: applied
    )
    for engine in ENGINES:
        assert outcome(text, engine) == ([], [])


PROCESS_ONLY = [
    ("resources: {cpu: '4'}", "resources.cpu"),
    ("resources: {memory: 16Gi}", "resources.memory"),
    (
        "base_image: {python_executable_path: /usr/bin/python3}",
        "base_image.python_executable_path",
    ),
    (  # a user of an image: on this machine it would be a host uid shared across deployments
        "docker_server: {start_command: python3 s.py, server_port: 8000, predict_endpoint: /p,"
        " readiness_endpoint: /h, liveness_endpoint: /h, run_as_user_id: 1000}",
        "docker_server.run_as_user_id",
    ),
]


@pytest.mark.parametrize(("text", "key"), PROCESS_ONLY, ids=[k for _, k in PROCESS_ONLY])
def test_what_the_process_engine_does_not_enforce_is_warned_about(text: str, key: str) -> None:
    assert key in outcome(text, "process")[0]
    assert key not in outcome(text, "docker")[0]


def test_trt_llm_model_server_is_refused() -> None:
    for engine in ENGINES:
        assert outcome("build: {model_server: TRT_LLM}", engine) == ([], ["build.model_server"])
        assert outcome("build: {model_server: TrussServer}", engine) == ([], [])
