"""Load a ``config.yaml``: parse, validate, collect every error, return warnings."""

from __future__ import annotations

import base64
import datetime
import difflib
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pydantic
from pydantic_core import ErrorDetails

from kingpost.config._yaml import (
    MAX_EXPANDED_BYTES,
    Issue,
    PathPart,
    SourceMap,
    format_path,
    load_yaml,
)
from kingpost.config.mirrored import DerivedWeights, derived_weights
from kingpost.config.models import TrussConfig
from kingpost.config.rules import config_warnings, cross_key_errors
from kingpost.config.sources import mount_root_problem
from kingpost.errors import ConfigError

__all__ = ["CONFIG_FILENAME", "LoadedConfig", "load_config", "parse_config"]

CONFIG_FILENAME = "config.yaml"
_MSG_PREFIXES = ("Value error, ", "Assertion failed, ")


@dataclass(frozen=True)
class LoadedConfig:
    """A validated config with the warnings it earned and the document it came from."""

    config: TrussConfig
    warnings: tuple[str, ...]
    path: str
    raw: dict[str, Any]

    def document(self) -> dict[str, Any]:
        """``raw`` as JSON data (for the store): YAML dates and times become ISO strings,
        binary base64, sets lists, and every mapping key a string."""
        plain: dict[str, Any] = _plain(self.raw)
        return plain


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {_key(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | set):
        return [_plain(v) for v in value]
    if isinstance(value, datetime.date):  # datetime.datetime too
        return value.isoformat()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    return value


def _key(key: Any) -> str:
    if key is None or isinstance(key, bool):
        return json.dumps(key)  # `null`, `true`: what json.dumps would have made of them
    plain = _plain(key)
    return plain if isinstance(plain, str) else str(plain)


def load_config(project_dir: Path, engine: str | None = None) -> LoadedConfig:
    """Read and validate ``project_dir/config.yaml``; ``engine`` adds the warnings about
    keys that engine cannot honour."""
    path = Path(project_dir) / CONFIG_FILENAME
    if not path.is_file():
        hint = (
            f"found {path.with_suffix('.yml').name}; rename it to {CONFIG_FILENAME}"
            if path.with_suffix(".yml").is_file()
            else f"is {project_dir} a Truss project? create {CONFIG_FILENAME} there"
        )
        raise ConfigError(f"{path}: no {CONFIG_FILENAME} found; {hint}", file=str(path), errors=[])
    try:
        size = path.stat().st_size
        if size > MAX_EXPANDED_BYTES:  # not read, let alone parsed: it could not pass
            raise ConfigError(
                f"{path}: the file is {size} bytes, more than the limit of "
                f"{MAX_EXPANDED_BYTES} bytes (8 MiB) for a config; keep big data in files "
                "of the project or in weights",
                file=str(path),
                errors=[{"path": "<root>", "line": None, "message": "file too large",
                         "value": size}],
            )  # fmt: skip
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"{path}: cannot read the file ({exc}); check its permissions and that it is UTF-8",
            file=str(path),
            errors=[],
        ) from exc
    return parse_config(text, filename=str(path), engine=engine)


def parse_config(
    text: str, filename: str = CONFIG_FILENAME, engine: str | None = None
) -> LoadedConfig:
    """Validate the text of a config (YAML or JSON); raise one ConfigError listing all errors."""
    data, source_map, issues = load_yaml(text, filename)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        _raise(
            filename,
            source_map,
            [
                Issue(
                    (),
                    "the top level must be a mapping of keys, e.g. `model_name: my-model`",
                    type(data).__name__,
                )
            ],
        )
    raw: dict[str, Any] = data
    prepared, legacy = _prepare(raw)
    issues += cross_key_errors(prepared)
    config: TrussConfig | None = None
    try:
        config = TrussConfig.model_validate(prepared)
    except pydantic.ValidationError as exc:
        issues += [_from_pydantic(err, prepared) for err in exc.errors()]
    if issues or config is None:
        _raise(filename, source_map, issues)
    derived = _derived(config)
    issues = _derived_mount_issues(derived)
    if issues:
        _raise(filename, source_map, issues)
    from kingpost.engines.registry import engine_config_warnings  # engines import config

    warnings = legacy + config_warnings(config, prepared) + engine_config_warnings(config, engine)
    if derived:
        config = config.model_copy(update={"weights": [*config.weights, *derived]})
    return LoadedConfig(
        config=config,
        warnings=tuple(_format_warning(filename, source_map, w) for w in warnings),
        path=filename,
        raw=raw,
    )


def _derived(config: TrussConfig) -> list[DerivedWeights]:
    """The ``weights`` entries that ``model_cache`` and ``external_data`` stand for (see
    :mod:`kingpost.config.mirrored`), appended to ``weights`` so they are mirrored and
    mounted as weights."""
    if config.no_build:  # the image runs unmodified: Truss fetches neither
        return []
    return derived_weights(config.model_cache, config.external_data)


def _derived_mount_issues(derived: list[DerivedWeights]) -> list[Issue]:
    """Derived entries skip ``WeightsSource``'s validation, so the rule on where weights may
    be mounted is applied here too: a second line behind the items' own rules (no `..`, no
    absolute ``volume_folder``), since the engines create and bind whatever gets through."""
    issues = []
    for entry in derived:
        problem = mount_root_problem(entry.mount_location)
        if problem is not None:
            key, index = entry.origin.rstrip("]").split("[")  # e.g. "model_cache[0]"
            issues.append(Issue((key, int(index)), problem, entry.mount_location))
    return issues


def _prepare(raw: dict[str, Any]) -> tuple[dict[str, Any], list[Issue]]:
    """Apply Truss's legacy renames to a copy of the document."""
    data = {str(k): v for k, v in raw.items()}
    notes: list[Issue] = []
    if "hf_cache" in data:
        value = data.pop("hf_cache")
        if "model_cache" not in data:
            data["model_cache"] = value or []
            note = "`hf_cache` is deprecated; it was read as `model_cache` (prefer `weights`)"
        else:
            note = "`hf_cache` is deprecated and ignored because `model_cache` is also set"
        notes.append(Issue(("hf_cache",), note, has_value=False))
    return data, notes


def _from_pydantic(err: ErrorDetails, raw: dict[str, Any]) -> Issue:
    path, parent, found = _raw_path(err["loc"], raw)
    message = err["msg"]
    for prefix in _MSG_PREFIXES:
        message = message.removeprefix(prefix)
    if err["type"] == "missing":
        name = str(path[-1]) if path else "?"
        message = f"required key `{name}` is missing"
        # A key that is itself a field of the model is spelt right: never a candidate.
        fields = _fields_at(err["loc"])
        unknown = [str(k) for k in parent if str(k) not in fields]
        close = difflib.get_close_matches(name, unknown, n=1, cutoff=0.75)
        if close and close[0] != name:
            message += f"; found `{close[0]}`, did you mean `{name}`?"
            return Issue(path, message, has_value=False, at=(*path[:-1], close[0]))
        return Issue(path, message + f"; add `{name}:` here", has_value=False)
    value = err.get("input")
    if isinstance(value, dict | list):
        if not err["type"].endswith("_type"):  # a rule about a whole section
            return Issue(path, message, has_value=False)
        message += f", not a {'mapping' if isinstance(value, dict) else 'list'}"
    return Issue(path, message, value, has_value=found)


def _fields_at(loc: tuple[int | str, ...]) -> frozenset[str]:
    """The field names of the config model that ``loc``'s last part belongs to, found by
    walking the models' annotations; empty where the walk loses its way."""
    annotation: Any = TrussConfig
    for part in loc[:-1]:
        model = _model_in(annotation)
        if model is not None and isinstance(part, str) and part in model.model_fields:
            annotation = model.model_fields[part].annotation
        elif model is None and (isinstance(part, int) or _origin_in(annotation) is dict):
            annotation = _item_type(annotation)
        # else a part pydantic adds on its own (a union tag, a validator's name): skip it
    model = _model_in(annotation)
    return frozenset(model.model_fields) if model is not None else frozenset()


def _arms(annotation: Any) -> tuple[Any, ...]:
    """``X | None`` -> ``(X,)``; anything else -> itself alone."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return tuple(a for a in typing.get_args(annotation) if a is not type(None))
    return (annotation,)


def _model_in(annotation: Any) -> type[pydantic.BaseModel] | None:
    for arm in _arms(annotation):
        if isinstance(arm, type) and issubclass(arm, pydantic.BaseModel):
            return arm
    return None


def _origin_in(annotation: Any) -> Any:
    return next((o for a in _arms(annotation) if (o := typing.get_origin(a))), None)


def _item_type(annotation: Any) -> Any:
    """The items' type of a ``list[X]`` (X) or ``dict[K, V]`` (V), optional or not."""
    for arm in _arms(annotation):
        args = typing.get_args(arm)
        if typing.get_origin(arm) in (list, dict) and args:
            return args[-1]
    return None


def _raw_path(
    loc: tuple[int | str, ...], raw: dict[str, Any]
) -> tuple[tuple[PathPart, ...], dict[Any, Any], bool]:
    """Map a pydantic location onto the document: (path, parent mapping, value found).

    Parts pydantic adds on its own (``[key]``, union tags, validator names) are
    dropped; a part missing from the document is kept (it names a missing key).
    """
    path: list[PathPart] = []
    cur: Any = raw
    parent: dict[Any, Any] = raw
    found = True
    for part in loc:
        if isinstance(cur, dict) and str(part) in {str(k) for k in cur}:
            parent = cur
            cur = next(v for k, v in cur.items() if str(k) == str(part))
            path.append(str(part))
        elif isinstance(cur, list) and isinstance(part, int) and 0 <= part < len(cur):
            cur = cur[part]
            path.append(part)
        elif isinstance(part, str) and ("[" in part or not found or not isinstance(cur, dict)):
            continue
        else:
            if isinstance(cur, dict):
                parent = cur
            path.append(part)
            found = False
            cur = None
    return tuple(path), parent, found


def _value_text(value: Any, limit: int = 80) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _jsonable(value: Any) -> Any:
    """``value`` as the API can answer it: strict JSON, where ``.inf`` and ``.nan`` (which
    YAML reads as floats) are no numbers, so those become text like anything else."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return str(value)
    return value


def _describe(source_map: SourceMap, issue: Issue, with_line: bool) -> tuple[int | None, str]:
    line = source_map.line(issue.at if issue.at is not None else issue.path)
    where = format_path(issue.path)
    if with_line and line is not None:
        where += f" (line {line})"
    found = f" (found {_value_text(issue.value)})" if issue.has_value else ""
    return line, f"{where}: {issue.message}{found}"


def _raise(filename: str, source_map: SourceMap, issues: list[Issue]) -> NoReturn:
    described = [(_describe(source_map, i, with_line=True), i) for i in issues]
    described.sort(key=lambda d: (d[0][0] or 0, format_path(d[1].path)))
    count = len(described)
    head = f"{filename}: {count} error{'s' if count != 1 else ''} in the Truss config"
    lines = [head + "; fix them and try again:"]
    lines += [f"  - {text}" for (_, text), _ in described]
    errors = [
        {
            "path": format_path(issue.path),
            "line": line,
            "message": issue.message,
            "value": _jsonable(issue.value) if issue.has_value else None,
        }
        for (line, _), issue in described
    ]
    raise ConfigError("\n".join(lines), file=filename, errors=errors)


def _format_warning(filename: str, source_map: SourceMap, issue: Issue) -> str:
    line, text = _describe(source_map, issue, with_line=False)
    return f"{filename}:{line}: {text}" if line is not None else f"{filename}: {text}"
