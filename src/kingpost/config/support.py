"""What each engine does with every key of a Truss ``config.yaml``: one table.

Accepting a config is a promise: a key a user sets is either *applied* by the engine,
*warned* about when the config is loaded for that engine (the push goes on, with the
reason said), or *refused* with an error naming the key, the rule and the value. Never
ignored without a word. :data:`ROWS` says which, per key and per engine, with a line on
what Kingpost does; ``tests/unit/test_config_support.py`` holds it to the loader's
behaviour over real-world configs and fails when a field of :class:`TrussConfig` has no
row. The README's "Truss config keys" section is :func:`markdown`'s output
(``python -m kingpost.config.support --readme README.md`` rewrites it there).

A row's status is for the key set to a value that asks for something (not its default);
a value that changes the answer has a case of its own (``runtime.transport.kind: grpc``
is refused, ``http`` applied); answers that hang on other keys are in the note. A row
whose key is a section (``cache_internal``) covers every key below it that has no row of
its own. Under ``docker_server.no_build: true``
the keys of :data:`~kingpost.config.rules.NO_BUILD_IGNORED` are warned about on every
engine (the image runs unmodified), whatever the row says.
"""

from __future__ import annotations

import sys
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel

from kingpost.config.models import TrussConfig
from kingpost.config.rules import NO_BUILD_IGNORED

__all__ = [
    "ENGINES",
    "README_END",
    "README_START",
    "ROWS",
    "Row",
    "Status",
    "Support",
    "ValueCase",
    "field_paths",
    "main",
    "markdown",
    "row_for",
    "support",
    "with_table",
]

ENGINES = ("process", "docker")
"""The user-facing engines of :mod:`kingpost.engines.registry`, in the table's order."""

SAME_AS = {"ray": "process"}
"""Engines whose column is another's: the ray engine runs each replica with the process
engine's code on a node (``resources`` also place it there: Ray's CPU, memory, GPUs)."""


class Status(StrEnum):
    APPLIED = "applied"  # the engine does what the key asks
    WARNED = "warned"  # accepted; loading for the engine warns that it is not honoured
    REFUSED = "refused"  # the config is refused with an error naming the key


@dataclass(frozen=True)
class Support:
    status: Status
    note: str


@dataclass(frozen=True)
class ValueCase:
    """What the engines do when the key holds this one value (compared as text)."""

    value: str
    process: Support
    docker: Support


@dataclass(frozen=True)
class Row:
    key: str
    """A key path: ``runtime.transport.kind``; ``[]`` marks list items."""
    process: Support
    docker: Support
    cases: tuple[ValueCase, ...] = ()

    def on(self, engine: str, value: object = None) -> Support:
        """What ``engine`` does with the key (holding ``value``, when it is given)."""
        engine = SAME_AS.get(engine, engine)
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")
        holder: Row | ValueCase = self
        for case in self.cases:
            if value is not None and str(value) == case.value:
                holder = case
        support: Support = getattr(holder, engine)
        return support


A, W, R = Status.APPLIED, Status.WARNED, Status.REFUSED


_Answer = tuple[Status, str]


def _row(
    key: str,
    process: _Answer,
    docker: _Answer | None = None,
    cases: tuple[tuple[str, _Answer, _Answer | None], ...] = (),
) -> Row:
    """A row; ``docker`` left out means the same as ``process`` (in ``cases`` too)."""
    return Row(
        key,
        Support(*process),
        Support(*(docker or process)),
        tuple(ValueCase(v, Support(*p), Support(*(d or p))) for v, p, d in cases),
    )


_NO_IMAGE = "the process engine builds no image"
_BASETEN = "Baseten's own infrastructure only"
_OLD_PY = ("py38", "py39")

ROWS: tuple[Row, ...] = (
    # -- identity and metadata
    _row("model_name", (A, "names the model at push (else the project folder's name)")),
    _row("model_metadata", (A, "passed to the model in its `config`, as Truss does")),
    _row("description", (A, "kept in the stored config and the model's `config`; not shown")),
    _row("examples_filename", (W, "Kingpost has no examples runner (Truss's CLI reads it)")),
    _row("spec_version", (W, "not read: Kingpost follows spec 2.0 whatever is written")),
    _row("input_type", (W, "legacy; not read (the model's predict signature decides)")),
    _row("model_framework", (W, "legacy; only custom model classes are served")),
    _row("model_type", (W, "legacy; not read")),
    # -- the model class
    _row("model_module_dir", (A, "where the model server imports the model class from")),
    _row("model_class_filename", (A, "the model class's file")),
    _row("model_class_name", (A, "the model class's name")),
    _row("data_dir", (A, "the model's `data_dir`; copied to /app/data in an image")),
    _row("bundled_packages_dir", (A, "put on the model's `sys.path` (and /packages in images)")),
    _row(
        "external_package_dirs",
        (W, "on the model's `sys.path` if inside the project; outside it: not uploaded"),
    ),
    _row("apply_library_patches", (A, "Kingpost patches no library, so `false` holds anyway")),
    _row("live_reload", (W, "Truss's development loop; push again instead")),
    _row("use_local_src", (W, "Truss's development option; not read")),
    # -- environment and image
    _row(
        "python_version",
        (A, "a venv of that Python if installed here, else warned at build; <3.11 warned"),
        (A, "3.11 on Kingpost's base (others warned at build), else the base_image's"),
        cases=tuple((v, (W, "deprecated: Truss dropped it; use py311"), None) for v in _OLD_PY),
    ),
    _row("requirements", (A, "installed into the model's venv"), (A, "pip-installed in the image")),
    _row(
        "requirements_file",
        (A, "installed into the model's venv (uv.lock/pyproject too)"),
        (A, "pip-installed in the image"),
    ),
    _row(
        "system_packages",
        (W, f"not installed: {_NO_IMAGE}"),
        (A, "apt-get installed in the image"),
    ),
    _row("build_commands", (W, f"not run: {_NO_IMAGE}"), (A, "RUN in the image, in /app")),
    _row("base_image.image", (W, f"not used: {_NO_IMAGE}"), (A, "the image's FROM")),
    _row(
        "base_image.python_executable_path",
        (W, f"not used: {_NO_IMAGE}"),
        (A, "the Python the image's server and installs run with"),
    ),
    _row(
        "base_image.docker_auth",
        (W, f"not used: {_NO_IMAGE}"),
        (W, "not used: the Docker Engine pulls with its own login (`docker login`)"),
    ),
    _row("environment_variables", (A, "set in each replica (reserved names dropped, warned)")),
    _row("secrets", (A, "files in /secrets from `kingpost secrets`; inline values warned")),
    # -- build
    _row("build.model_server", (R, f"TRT_LLM engine builds are {_BASETEN}")),
    _row("build.arguments", (W, "not read: they configure Baseten's engine builders")),
    _row("build.secret_to_path_mapping", (W, "no build-time secrets: nothing is mounted")),
    _row("build.no_cache", (R, "refused in config.yaml, as Truss does")),
    # -- custom servers
    _row("docker_server.start_command", (A, "run as the replica's server")),
    _row("docker_server.server_port", (A, "probed and proxied to (8080 warned: Baseten's)")),
    _row("docker_server.predict_endpoint", (A, "where predict requests go")),
    _row("docker_server.readiness_endpoint", (A, "the readiness probe")),
    _row("docker_server.liveness_endpoint", (A, "the liveness probe")),
    _row(
        "docker_server.run_as_user_id",
        (W, "not applied: replicas run as their deployment's own uid, never a host user"),
        (A, "the uid the server runs as"),
    ),
    _row(
        "docker_server.no_build",
        (A, "no environment is built: start_command runs as is (none: refused)"),
        (A, "`base_image.image` runs as is, its entrypoint unless start_command"),
    ),
    _row(
        "docker_server.kingpost_metrics_endpoint",
        (A, "Kingpost extension: the server's Prometheus path, scraped into /metrics"),
    ),
    # -- compute
    _row(
        "resources.cpu",
        (W, "not limited: the process engine sets no CPU quota"),
        (A, "the container's CPU quota"),
    ),
    _row(
        "resources.memory",
        (W, "not limited: the process engine sets no memory limit"),
        (A, "the container's memory limit (no swap)"),
    ),
    _row(
        "resources.accelerator",
        (A, "whole devices of that kind and count, as `CUDA_VISIBLE_DEVICES`"),
        (A, "a device request for those devices"),
    ),
    _row("resources.use_gpu", (A, "derived from `accelerator`; a contradicting value warned")),
    _row("resources.instance_type", (W, f"not read: instance types are {_BASETEN}")),
    _row("resources.node_count", (W, "one node per replica: multi-node replicas not built")),
    _row("resources.fabric", (W, f"not read: interconnects are {_BASETEN}")),
    # -- runtime
    _row("runtime.predict_concurrency", (A, "requests in flight per replica")),
    _row("runtime.streaming_read_timeout", (A, "the model server's wait for a first chunk")),
    _row(
        "runtime.enable_tracing_data",
        (A, "a model class's pre/predict/postprocess as spans (tracing on); custom: warned"),
    ),
    _row("runtime.enable_debug_logs", (W, "the model server's log level does not change")),
    _row(
        "runtime.transport.kind",
        (A, "http and websocket served"),
        cases=(("grpc", (R, "the gateway speaks HTTP/1.1, not HTTP/2, to replicas"), None),),
    ),
    _row("runtime.transport.ping_interval_seconds", (A, "WebSocket pings (model server)")),
    _row("runtime.transport.ping_timeout_seconds", (A, "WebSocket pings (model server)")),
    _row("runtime.is_websocket_endpoint", (A, "legacy spelling of `transport.kind: websocket`")),
    _row("runtime.health_checks", (A, "the probes' delay, thresholds and startup timeout")),
    _row("runtime.oidc", (W, f"no OIDC identity tokens: {_BASETEN}")),
    _row("runtime.remote_ssh", (W, "no SSH into replicas")),
    _row("runtime.egress_restrictions", (W, "not enforced: replicas reach any address")),
    _row("runtime.truss_server_version_override", (W, "Kingpost runs its own model server")),
    _row("runtime.num_workers", (A, "1 worker, as Truss; any other value refused")),
    # -- weights and data
    _row(
        "weights",
        (A, "mirrored once, mounted read-only (bt://, azure://, cw://, OIDC auth refused)"),
    ),
    _row(
        "model_cache",
        (W, "mirrored like `weights` at Truss's paths (azure refused); deprecated"),
    ),
    _row("external_data", (A, "downloaded by the mirror to `/app/data/<local_data_path>`")),
    _row("cache_internal", (W, "not mirrored: Baseten-internal; list them under `weights`")),
    # -- Baseten-only sections
    _row("trt_llm", (R, f"TensorRT-LLM builds are {_BASETEN}; use docker_server")),
    _row("bis_llm", (R, f"the Baseten Inference Stack is {_BASETEN}")),
    _row("training_checkpoints", (R, f"training checkpoints are {_BASETEN}")),
    _row("bdn", (R, f"BDN volumes are {_BASETEN}; list sources under `weights`")),
)


def _models_in(annotation: object) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _is_list(annotation: object) -> bool:
    if typing.get_origin(annotation) is list:
        return True
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        return any(_is_list(arg) for arg in typing.get_args(annotation))
    return False


def field_paths(model: type[BaseModel] = TrussConfig, prefix: str = "") -> Iterator[str]:
    """Every key of ``model`` and the sections below it, leaves and sections alike."""
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        yield path
        inner = f"{path}[]." if _is_list(field.annotation) else f"{path}."
        for sub in _models_in(field.annotation):
            yield from field_paths(sub, inner)


_BY_KEY = {row.key: row for row in ROWS}


def row_for(key: str) -> Row | None:
    """The row of ``key`` (indices written ``[]``), or of the nearest section above it."""
    path = key
    while path:
        if path in _BY_KEY:
            return _BY_KEY[path]
        cut = max(path.rfind("."), path.rfind("["))
        path = path[:cut] if cut > 0 else ""
    return None


def support(key: str, engine: str, value: object = None, *, no_build: bool = False) -> Support:
    """What ``engine`` does with ``key`` (holding ``value``, when it is given);
    ``no_build``: under ``docker_server.no_build``."""
    top = key.split(".", 1)[0].split("[", 1)[0]
    if no_build and top in NO_BUILD_IGNORED:
        return Support(W, "ignored with `docker_server.no_build: true`: the image runs as is")
    row = row_for(key)
    if row is None:
        raise KeyError(f"no row for config key `{key}` in kingpost.config.support.ROWS")
    return row.on(engine, value)


def _cells(process: Support, docker: Support) -> str:
    text = [f"**{s.status}**: {s.note}" for s in (process, docker)]
    return f"{text[0]} | {'same' if process == docker else text[1]}"


def markdown() -> str:
    """The README's table of keys: a line per row and per value case, a column per engine."""
    lines = [
        "| key | process | docker |",
        "| --- | --- | --- |",
    ]
    for row in ROWS:
        lines.append(f"| `{row.key}` | {_cells(row.process, row.docker)} |")
        lines += [f"| `{row.key}: {c.value}` | {_cells(c.process, c.docker)} |" for c in row.cases]
    ignored = ", ".join(f"`{k}`" for k in NO_BUILD_IGNORED)
    lines += [
        "",
        f"With `docker_server.no_build: true` these are warned about on both engines (the "
        f"image runs unmodified): {ignored}. The legacy `hf_cache` is read as "
        "`model_cache`, with a warning; a key Truss does not know is warned about by name "
        "(with the known key it is closest to). The ray engine runs each replica with the "
        "process engine's code on a node of the cluster: its column is the process engine's, "
        "and `resources` also place the replica there (Ray's CPU, memory and GPUs).",
        "",
        "`truss_version` is a top-level key of Kingpost's own (major.minor[.patch]): it picks "
        "the set of Truss server packages a model class runs on, the newest set Kingpost has "
        "at or below that version (older than the oldest: the oldest, warned). Without it, "
        "`KINGPOST_TRUSS_VERSION`, else the newest set. A value that is not a version is "
        "refused at push.",
    ]
    return "\n".join(lines) + "\n"


README_START = "<!-- config-keys:start -->"
README_END = "<!-- config-keys:end -->"
"""The markers around the table in README.md."""


def with_table(readme: str) -> str:
    """``readme`` with the text between :data:`README_START` and :data:`README_END`
    replaced by :func:`markdown`."""
    if README_START not in readme or README_END not in readme:
        raise ValueError(f"README has no {README_START} ... {README_END} markers")
    head, rest = readme.split(README_START, 1)
    tail = rest.split(README_END, 1)[1]
    return f"{head}{README_START}\n{markdown()}{README_END}{tail}"


def main(argv: list[str]) -> int:
    """``--markdown``: print the table; ``--readme PATH``: rewrite it in that README."""
    if argv == ["--markdown"]:
        sys.stdout.write(markdown())
        return 0
    if len(argv) == 2 and argv[0] == "--readme":
        path = Path(argv[1])
        path.write_text(with_table(path.read_text(encoding="utf-8")), encoding="utf-8")
        return 0
    print(
        "usage: python -m kingpost.config.support --markdown | --readme README.md", file=sys.stderr
    )
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
