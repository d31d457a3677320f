"""Rules that span several keys, and the warnings a valid config can still earn.

Cross-key rules run on the raw document (not the validated model) so they are
reported together with field errors: a file with a bad port *and* both
``weights`` and ``model_cache`` lists both problems at once.
"""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel

from kingpost.config._yaml import Issue, PathPart
from kingpost.config.environment import RESERVED_ENV_HINT, is_reserved_env
from kingpost.config.models import TrussConfig
from kingpost.config.resources import KNOWN_ACCELERATORS
from kingpost.config.sources import normalize_mount
from kingpost.config.unread import unread_key_warnings

__all__ = [
    "NO_BUILD_IGNORED",
    "config_warnings",
    "cross_key_errors",
    "process_engine_refusals",
    "process_engine_warnings",
    "unknown_key_warnings",
]

NO_BUILD_IGNORED = (
    "requirements",
    "requirements_file",
    "system_packages",
    "build_commands",
    "build",
    "external_package_dirs",
    "bundled_packages_dir",
    "external_data",
    "model_cache",
    "cache_internal",
    "python_version",
    "apply_library_patches",
    "live_reload",
    "model_module_dir",
    "model_class_filename",
    "model_class_name",
    "use_local_src",
    "trt_llm",
)
"""Top-level keys with no effect when ``docker_server.no_build`` is true.

No-build images run unmodified: only ``docker_server``, ``base_image``,
``environment_variables``, ``secrets`` and the ``data`` directory reach them
(plus what the platform itself uses: resources, runtime, weights, metadata).
"""


def _mapping(value: object) -> dict[Any, Any]:
    return value if isinstance(value, dict) else {}


def _items(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def cross_key_errors(raw: dict[str, Any]) -> list[Issue]:
    """Rules relating several keys, checked on the raw document."""
    issues: list[Issue] = []
    if raw.get("requirements") and raw.get("requirements_file"):
        issues.append(
            Issue(
                ("requirements_file",),
                "`requirements` and `requirements_file` are mutually exclusive; keep one of them",
                raw["requirements_file"],
            )
        )
    if _items(raw.get("weights")) and _items(raw.get("model_cache")):
        issues.append(
            Issue(
                ("model_cache",),
                "`weights` and `model_cache` are mutually exclusive; move the "
                "model_cache entries to `weights` (model_cache is deprecated)",
                f"{len(raw['model_cache'])} entries",
            )
        )
    if raw.get("truss_version") is not None:
        issues += _truss_version(raw["truss_version"])
    issues += _duplicate_mounts(_items(raw.get("weights")))
    issues += _docker_server_errors(raw)
    issues += _model_cache_volumes(_items(raw.get("model_cache")))
    issues += _duplicate_values("model_cache", "volume_folder", raw, "the same folder")
    issues += _duplicate_values("external_data", "local_data_path", raw, "the same file")
    issues += _baseten_only(raw)
    issues += _transport_errors(raw)
    issues += _model_server_errors(raw)
    return issues


TRT_LLM_SERVER_REFUSED = (
    "model_server TRT_LLM builds a TensorRT-LLM engine on Baseten's own inference stack, "
    "which Kingpost does not have; serve the model with `docker_server` instead (e.g. vLLM "
    "or SGLang) or remove `build.model_server` (TrussServer is the default)"
)
"""Why ``build.model_server: TRT_LLM`` is refused, and what to use instead."""


def _model_server_errors(raw: dict[str, Any]) -> list[Issue]:
    server = _mapping(raw.get("build")).get("model_server")
    if isinstance(server, str) and server.strip().upper() == "TRT_LLM":
        return [Issue(("build", "model_server"), TRT_LLM_SERVER_REFUSED, server)]
    return []


GRPC_REFUSED = (
    "gRPC replicas are not served yet: Kingpost's gateway speaks HTTP/1.1 to replicas, and "
    "a gRPC server needs HTTP/2 end to end (Baseten proxies it to the model's gRPC server), "
    "so every call would fail; serve the model over HTTP (remove `runtime.transport` or set "
    "`kind: http`), or `kind: websocket` for a long-lived bidirectional stream"
)
"""Why ``runtime.transport.kind: grpc`` is refused at push, and what to use instead."""


def _transport_errors(raw: dict[str, Any]) -> list[Issue]:
    transport = _mapping(_mapping(raw.get("runtime")).get("transport"))
    kind = transport.get("kind")
    if isinstance(kind, str) and kind.strip().lower() == "grpc":
        return [Issue(("runtime", "transport", "kind"), GRPC_REFUSED, kind)]
    return []


BASETEN_ONLY = {
    "trt_llm": "TensorRT-LLM engine builds run on Baseten's own inference stack, which "
    "Kingpost does not have; serve the model with `docker_server` instead (e.g. vLLM or "
    "SGLang for an LLM, text-embeddings-inference for an encoder) and remove `trt_llm`",
    "bis_llm": "Baseten Inference Stack deployments run on Baseten's own serving stack, "
    "which Kingpost does not have; serve the model with `docker_server` instead (e.g. "
    "vLLM's OpenAI-compatible server) and remove `bis_llm`",
    "training_checkpoints": "checkpoints of Baseten training jobs are stored at Baseten, "
    "which Kingpost cannot reach; copy them to S3, GCS or Hugging Face, list them under "
    "`weights` and remove `training_checkpoints`",
    "bdn": "BDN volumes are stored at Baseten, which Kingpost cannot reach; list where their "
    "files come from (hf://, s3://, gs://...) under `weights`, which Kingpost mirrors and "
    "mounts read-only, and remove `bdn`",
}
"""Keys that only Baseten's own infrastructure can honour, and what to use instead.

A project that sets one would deploy and then not do what it says (no engine, no
checkpoints, nothing at a volume's mount path), so it is refused before anything is
built. A value that asks for nothing passes: empty, or made only of empty lists and
false flags (besides the settings in :data:`_SETTINGS_ONLY`), as Truss writes `bdn` and
`training_checkpoints` when it dumps a config with its defaults."""

_SETTINGS_ONLY = {"training_checkpoints": frozenset({"download_folder"})}
"""Fields that only say how to honour what the rest asks for, and that Truss fills in
with a default when it dumps a config (`download_folder: /tmp/training_checkpoints`)."""


def _asks_nothing(value: object) -> bool:
    if isinstance(value, dict):
        return all(_asks_nothing(v) for v in value.values())
    return value is None or value is False or value == [] or value == ""


def _baseten_only(raw: dict[str, Any]) -> list[Issue]:
    issues = []
    for key, rule in BASETEN_ONLY.items():
        value = raw.get(key)
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if k not in _SETTINGS_ONLY.get(key, ())}
        if not _asks_nothing(value):
            issues.append(Issue((key,), rule, raw[key]))
    return issues


def _duplicate_mounts(weights: list[Any]) -> list[Issue]:
    issues: list[Issue] = []
    first: dict[str, int] = {}
    for index, entry in enumerate(weights):
        mount = _mapping(entry).get("mount_location")
        if not isinstance(mount, str):
            continue
        key = normalize_mount(mount)
        if key in first:
            issues.append(
                Issue(
                    ("weights", index, "mount_location"),
                    f"mount_location must be unique, but weights[{first[key]}] already "
                    "mounts there; give each source its own directory",
                    mount,
                )
            )
        else:
            first[key] = index
    return issues


def _duplicate_values(section: str, key: str, raw: dict[str, Any], what: str) -> list[Issue]:
    """Items of ``section`` whose ``key`` repeats an earlier one's: both would be mirrored
    to one path, where only one can be."""
    issues: list[Issue] = []
    first: dict[str, int] = {}
    for index, item in enumerate(_items(raw.get(section))):
        value = _mapping(item).get(key)
        if not isinstance(value, str) or not value:
            continue
        norm = normalize_mount("/" + value.strip("/"))
        if norm in first:
            issues.append(
                Issue(
                    (section, index, key),
                    f"{key} must be unique, but {section}[{first[norm]}] already has it and "
                    f"both would be written to {what}; give each item its own {key}",
                    value,
                )
            )
        else:
            first[norm] = index
    return issues


def _docker_server_errors(raw: dict[str, Any]) -> list[Issue]:
    server = raw.get("docker_server")
    if not isinstance(server, dict):
        return []
    no_build = server.get("no_build") is True
    issues: list[Issue] = []
    if not no_build and server.get("start_command") is None:
        issues.append(
            Issue(
                ("docker_server", "start_command"),
                "start_command is required unless `no_build: true` (then the image's "
                "entrypoint runs); add e.g. `start_command: python -m my_server`",
                has_value=False,
            )
        )
    image = _mapping(raw.get("base_image")).get("image")
    if no_build and not image:
        issues.append(
            Issue(
                ("docker_server", "no_build"),
                "no_build: true runs `base_image.image` unmodified, so it needs one; add "
                "`base_image: {image: REGISTRY/IMAGE:TAG}`",
                True,
            )
        )
    return issues


def _model_cache_volumes(entries: list[Any]) -> list[Issue]:
    flags = [_mapping(e).get("use_volume") for e in entries]
    if len({bool(f) for f in flags}) <= 1:
        return []
    index = next(i for i, f in enumerate(flags) if bool(f) != bool(flags[0]))
    return [
        Issue(
            ("model_cache", index, "use_volume"),
            "all model_cache entries must use the same `use_volume`; set it to "
            f"{bool(flags[0])!s} everywhere (or migrate to `weights`)",
            flags[index],
        )
    ]


def _truss_version(value: object) -> list[Issue]:
    from kingpost.envs.baseset import parse_truss_version  # envs import config
    from kingpost.errors import ConfigError

    try:
        parse_truss_version(str(value), "truss_version")
    except ConfigError:
        rule = "a Truss version, major.minor[.patch], e.g. `0.18.5`"
        return [Issue(("truss_version",), f"must be {rule}", value)]
    return []


KINGPOST_KEYS = ("truss_version",)
"""Top-level keys Truss's model does not name that Kingpost reads (``truss_version``: the
Truss server packages a model class's environment gets, :mod:`kingpost.envs.baseset`)."""


def unknown_key_warnings(model: BaseModel, path: tuple[PathPart, ...] = ()) -> list[Issue]:
    """Keys Truss does not know, at any depth of the typed sections."""
    issues: list[Issue] = []
    known = list(type(model).model_fields)
    for key in model.model_extra or {}:
        if not path and key in KINGPOST_KEYS:
            continue
        close = difflib.get_close_matches(str(key), known, n=1)
        hint = f"; did you mean `{close[0]}`?" if close else "; it is ignored"
        issues.append(Issue((*path, key), f"unknown key `{key}`{hint}", has_value=False))
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            issues += unknown_key_warnings(value, (*path, name))
        elif isinstance(value, list):
            for index, item in enumerate(value):
                if isinstance(item, BaseModel):
                    issues += unknown_key_warnings(item, (*path, name, index))
    return issues


def config_warnings(config: TrussConfig, raw: dict[str, Any]) -> list[Issue]:
    """Warnings about a config that is valid but will not do all it says."""
    issues = unknown_key_warnings(config)
    issues += _env_warnings(config, raw)
    for name, value in config.secrets.items():
        if value is not None:
            issues.append(
                Issue(
                    ("secrets", name),
                    "secret given a real value in config.yaml; store it with "
                    f"`kingpost secrets set {name}` and set it to null here",
                    "<redacted>",
                )
            )
    issues += _resource_warnings(config, raw)
    if config.python_version in ("py38", "py39"):
        issues.append(
            Issue(
                ("python_version",),
                "this Python version is deprecated (Truss dropped 3.8); use py311 or newer",
                config.python_version,
            )
        )
    if config.model_cache:
        issues.append(
            Issue(
                ("model_cache",),
                "model_cache is deprecated; it is mirrored like `weights` (run `kingpost "
                "migrate` to write it as `weights`)",
                has_value=False,
            )
        )
    issues += _server_warnings(config, raw)
    issues += unread_key_warnings(config)
    return issues


def _env_warnings(config: TrussConfig, raw: dict[str, Any]) -> list[Issue]:
    issues: list[Issue] = []
    raw_env = _mapping(raw.get("environment_variables"))
    for name in config.environment_variables:
        if is_reserved_env(name):
            issues.append(
                Issue(
                    ("environment_variables", name),
                    f"environment variable `{name}` is dropped: {RESERVED_ENV_HINT}",
                    name,
                )
            )
        if name in raw_env and raw_env[name] is None:
            issues.append(
                Issue(
                    ("environment_variables", name),
                    "null value becomes the string `None` (as in Truss); give a value, or "
                    "declare it under `secrets:` if it is a credential",
                    None,
                )
            )
    return issues


def _resource_warnings(config: TrussConfig, raw: dict[str, Any]) -> list[Issue]:
    issues: list[Issue] = []
    resources = config.resources
    given = _mapping(raw.get("resources")).get("use_gpu")
    if isinstance(given, bool) and given != resources.use_gpu:
        reason = (
            "no `accelerator` is set; add e.g. `accelerator: T4`"
            if given
            else "an `accelerator` is set, so the replica gets a GPU"
        )
        issues.append(
            Issue(("resources", "use_gpu"), f"use_gpu is derived and ignored here: {reason}", given)
        )
    accelerator = resources.accelerator
    if accelerator is not None and accelerator.kind not in KNOWN_ACCELERATORS:
        upper = accelerator.kind.upper()
        hint = f"; did you mean `{upper}`?" if upper in KNOWN_ACCELERATORS else ""
        issues.append(
            Issue(
                ("resources", "accelerator"),
                f"accelerator kind `{accelerator.kind}` is unknown to Truss, so the project "
                f"would not deploy on Baseten{hint}",
                str(accelerator),
            )
        )
    return issues


def _server_warnings(config: TrussConfig, raw: dict[str, Any]) -> list[Issue]:
    server = config.docker_server
    if server is None:
        return []
    issues: list[Issue] = []
    if server.no_build:
        for key in NO_BUILD_IGNORED:
            if key in raw:
                issues.append(
                    Issue(
                        (key,),
                        "ignored with `docker_server.no_build: true` (the image runs "
                        "unmodified); remove it or pass the setting as an environment variable",
                        has_value=False,
                    )
                )
    elif server.server_port == 8080:
        issues.append(
            Issue(
                ("docker_server", "server_port"),
                "port 8080 is reserved by Baseten's reverse proxy in builds other than "
                "no_build; Kingpost accepts it, but pick another port to stay portable",
                8080,
            )
        )
    return issues


def process_engine_refusals(config: TrussConfig) -> list[Issue]:
    """What the process engine cannot run at all: it runs no image, so a custom server
    needs its own command (``no_build: true`` would run the image's entrypoint)."""
    ds = config.docker_server
    if ds is None or ds.start_command:
        return []
    return [
        Issue(
            ("docker_server", "start_command"),
            "start_command is required on the process engine, which runs no image "
            "(`no_build: true` runs the image's entrypoint); add one, or push with "
            "--engine docker",
            has_value=False,
        )
    ]


def process_engine_warnings(config: TrussConfig) -> list[Issue]:
    """Keys that the process engine cannot honour.

    It runs replicas on this machine with no image, so nothing that builds or chooses an
    image reaches them. A project pushed there keeps its meaning on the docker engine;
    the push goes on, with this said.
    """
    no_image = "the process engine builds no image and runs replicas on this machine"
    issues: list[Issue] = []
    if config.system_packages:
        issues.append(
            Issue(
                ("system_packages",),
                f"not installed: {no_image}; install them here yourself, or push with "
                "--engine docker",
                config.system_packages,
            )
        )
    if config.build_commands:
        issues.append(
            Issue(
                ("build_commands",),
                f"not run: {no_image}; push with --engine docker to run them",
                has_value=False,
            )
        )
    if not config.is_custom_server and config.python_version in ("py38", "py39", "py310"):
        issues.append(
            Issue(
                ("python_version",),
                "the model server needs Python 3.11 or newer; on the process engine the "
                "project runs on the platform's Python instead",
                config.python_version,
            )
        )
    if config.base_image is not None and config.base_image.image:
        issues.append(
            Issue(
                ("base_image", "image"),
                f"not used: {no_image}, with its own Python and files; push with "
                "--engine docker to run in this image",
                config.base_image.image,
            )
        )
    if config.base_image is not None and config.base_image.python_executable_path:
        issues.append(
            Issue(
                ("base_image", "python_executable_path"),
                f"not used: {no_image}; the project runs on a Python of this machine "
                "(python_version picks which)",
                config.base_image.python_executable_path,
            )
        )
    if config.docker_server is not None and config.docker_server.run_as_user_id is not None:
        issues.append(
            Issue(
                ("docker_server", "run_as_user_id"),
                "not applied: it names a user inside an image, and the process engine runs "
                "replicas on this machine, where that uid would be a real user's and shared "
                "with every deployment that sets it (each could read the others' secrets); "
                "replicas run as a uid of their deployment's own instead. Push with "
                "--engine docker to run as it",
                config.docker_server.run_as_user_id,
            )
        )
    return issues + _process_resource_warnings(config)


def _process_resource_warnings(config: TrussConfig) -> list[Issue]:
    """The process engine sets no CPU or memory limit (README, "Trust model"): a replica
    may use the whole machine's. GPUs it does assign (``CUDA_VISIBLE_DEVICES``)."""
    resources = config.resources
    issues: list[Issue] = []
    for key, value, default in (("cpu", resources.cpu, "1"),
                                ("memory", resources.memory, "2Gi")):  # fmt: skip
        if value != default:
            issues.append(
                Issue(
                    ("resources", key),
                    f"not limited: the process engine sets no {key} limit, so a replica "
                    "may use the whole machine's; push with --engine docker to enforce it",
                    value,
                )
            )
    return issues
