"""What the model server needs from ``config.yaml``, behind one function.

:func:`load_server_config` validates the file with :func:`kingpost.config.load_config`
when that module is available. The model's ``__init__(config=...)`` gets the file's own
mapping with every key it leaves out filled in with its default, as Truss's image does (it
writes the full config), so ``config["model_metadata"]`` or
``config["runtime"]["predict_concurrency"]`` work without being written out.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kingpost.errors import ConfigError

__all__ = ["ServerConfig", "load_server_config"]

log = logging.getLogger("kingpost.server")


@dataclass(frozen=True)
class ServerConfig:
    """The parts of a Truss config the server acts on (Truss defaults)."""

    app_dir: Path
    raw: dict[str, Any]
    """The file's mapping, with defaults for the keys it leaves out when known."""
    model_module_dir: str = "model"
    model_class_filename: str = "model.py"
    model_class_name: str = "Model"
    data_dir: str = "data"
    bundled_packages_dir: str = "packages"
    external_package_dirs: tuple[str, ...] = ()
    secrets: dict[str, Any] = field(default_factory=dict)
    predict_concurrency: int = 1
    streaming_read_timeout: float = 60.0
    ws_ping_interval: float = 20.0
    """``runtime.transport.ping_interval_seconds``: a WebSocket is pinged this often."""
    ws_ping_timeout: float = 20.0
    """``runtime.transport.ping_timeout_seconds``: a ping unanswered this long fails it."""
    enable_tracing_data: bool = False
    """``runtime.enable_tracing_data``: a traced request's preprocess, predict and
    postprocess times go back to the gateway as spans (``gateway/tracing.py``)."""

    @property
    def model_file(self) -> Path:
        return self.app_dir / self.model_module_dir / self.model_class_filename

    @property
    def data_path(self) -> Path:
        return self.app_dir / self.data_dir

    def package_paths(self) -> list[Path]:
        """Directories Truss puts on ``sys.path``: bundled packages, then external ones."""
        paths = [self.app_dir / self.bundled_packages_dir]
        paths += [(self.app_dir / p).resolve() for p in self.external_package_dirs]
        return [p for p in paths if p.is_dir()]


def _read_raw(app_dir: Path) -> dict[str, Any]:
    path = app_dir / "config.yaml"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}; fix the syntax") from exc
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, found {type(raw).__name__}")
    return raw


def _validate(app_dir: Path) -> dict[str, Any] | None:
    """Run the platform's own validation when kingpost.config provides it; the config with
    every default, as a plain mapping, or ``None`` without that module."""
    try:
        module = importlib.import_module("kingpost.config")
    except Exception:  # no pydantic v2 in a user's environment: validated at push time
        return None
    load = getattr(module, "load_config", None)
    if load is None or not (app_dir / "config.yaml").exists():
        return None
    config = load(app_dir).config
    try:
        full: dict[str, Any] = config.model_dump(mode="json", by_alias=True)
    except Exception:  # a value JSON cannot hold (``!!binary`` bytes…): the file as written
        log.warning("config.yaml: cannot fill in defaults for the model's `config`", exc_info=True)
        return None
    return full


def _with_defaults(raw: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """``raw`` as written, plus the keys of ``defaults`` it does not have (recursively)."""
    merged = dict(raw)
    for key, value in defaults.items():
        if key not in merged or (merged[key] is None and isinstance(value, dict)):
            merged[key] = value  # left out, or an empty section (``runtime:``)
        elif isinstance(merged[key], dict) and isinstance(value, dict):
            merged[key] = _with_defaults(merged[key], value)
    return merged


def _str(raw: dict[str, Any], key: str, default: str) -> str:
    value = raw.get(key)
    return default if value in (None, "") else str(value)


def load_server_config(app_dir: Path, *, validate: bool = True) -> ServerConfig:
    """Read ``app_dir/config.yaml`` into a :class:`ServerConfig`."""
    app_dir = app_dir.resolve()
    raw = _read_raw(app_dir)
    if validate and (defaults := _validate(app_dir)) is not None:
        raw = _with_defaults(raw, defaults)
    runtime = raw.get("runtime") or {}
    if not isinstance(runtime, dict):
        raise ConfigError(f"{app_dir / 'config.yaml'}: `runtime` must be a mapping")
    try:
        concurrency = max(1, int(runtime.get("predict_concurrency") or 1))
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"{app_dir / 'config.yaml'}: `runtime.predict_concurrency` must be an integer, "
            f"found {runtime.get('predict_concurrency')!r}"
        ) from exc
    transport = runtime.get("transport") or {}
    if not isinstance(transport, dict):
        raise ConfigError(f"{app_dir / 'config.yaml'}: `runtime.transport` must be a mapping")
    return ServerConfig(
        app_dir=app_dir,
        raw=raw,
        model_module_dir=_str(raw, "model_module_dir", "model"),
        model_class_filename=_str(raw, "model_class_filename", "model.py"),
        model_class_name=_str(raw, "model_class_name", "Model"),
        data_dir=_str(raw, "data_dir", "data"),
        bundled_packages_dir=_str(raw, "bundled_packages_dir", "packages"),
        external_package_dirs=tuple(str(p) for p in raw.get("external_package_dirs") or ()),
        secrets=dict(raw.get("secrets") or {}),
        predict_concurrency=concurrency,
        streaming_read_timeout=float(runtime.get("streaming_read_timeout") or 60.0),
        # As Truss: unset (or 0) keeps uvicorn's defaults of 20 s.
        ws_ping_interval=_seconds(transport, "ping_interval_seconds", app_dir),
        ws_ping_timeout=_seconds(transport, "ping_timeout_seconds", app_dir),
        enable_tracing_data=runtime.get("enable_tracing_data") is True,
    )


def _seconds(transport: dict[str, Any], key: str, app_dir: Path) -> float:
    try:
        value = float(transport.get(key) or 20.0)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"{app_dir / 'config.yaml'}: `runtime.transport.{key}` must be a number of "
            f"seconds, found {transport.get(key)!r}"
        ) from exc
    return value if value > 0 else 20.0
