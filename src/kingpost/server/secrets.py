"""The ``secrets`` mapping a model class receives, and Truss's lazy data resolver."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from kingpost.errors import SecretError

__all__ = ["LazyDataResolver", "Secrets", "UndeclaredSecretError", "uses_volume_cache"]


ENV_PREFIX = "TRUSS_SECRET_"
"""``TRUSS_SECRET_{name}`` in the replica's environment gives a secret a value (Truss)."""


class UndeclaredSecretError(SecretError, KeyError):
    """A model asked for a secret its config.yaml does not declare."""


class Secrets(Mapping[str, Any]):
    """Declared secrets, read from ``secrets_dir/{name}`` on each access.

    As in Truss, the file wins over a ``TRUSS_SECRET_{name}`` environment variable, which
    wins over the value written in config.yaml. Asking for an undeclared name raises
    :class:`UndeclaredSecretError` (a ``KeyError``) that says how to declare it, from
    ``get()`` too: Truss raises there as well, and a silent ``None`` would hide a secret
    left out of config.yaml until the model used it.
    """

    def __init__(self, declared: Mapping[str, Any], secrets_dir: Path) -> None:
        self._declared = dict(declared)
        self._dir = secrets_dir

    def __getitem__(self, name: str) -> Any:
        if name not in self._declared:
            raise UndeclaredSecretError(
                f"secret {name!r} is not declared in config.yaml; add it under `secrets:` "
                f"(e.g. `secrets: {{{name}: null}}`) and store its value with "
                f"`kingpost secrets set {name}`",
                secret=name,
            )
        path = self._dir / name
        try:
            return path.read_text(encoding="utf-8")
        except (FileNotFoundError, NotADirectoryError):
            return os.environ.get(ENV_PREFIX + name, self._declared[name])

    def get(self, name: str, default: Any = None) -> Any:
        value = self[name]  # an undeclared name raises, as in Truss
        return default if value is None else value

    def __iter__(self) -> Iterator[str]:
        return iter(self._declared)

    def __len__(self) -> int:
        return len(self._declared)

    def __contains__(self, name: object) -> bool:
        return name in self._declared

    def __repr__(self) -> str:
        return f"Secrets({sorted(self._declared)!r})"


NOT_COLLECTED = (
    "model_cache: the model did not call lazy_data_resolver.block_until_download_complete() "
    "in __init__ or load(); Truss requires that call before a `use_volume: true` model_cache "
    "is used (on Baseten the files may still be downloading). Keep the resolver from "
    '`__init__(self, **kwargs)` as `self._lazy_data_resolver = kwargs["lazy_data_resolver"]` '
    "and call `self._lazy_data_resolver.block_until_download_complete()` in load() before "
    "reading /app/model_cache"
)


class LazyDataResolver:
    """Truss's ``lazy_data_resolver`` (``LazyDataResolverV2``), over files already there.

    Kingpost mirrors ``model_cache`` before the replica starts, so the call that waits for
    the download returns at once. The rest is Truss's contract: with a ``use_volume: true``
    model_cache it returns the data directory, and a model that never called it fails its
    load (:meth:`raise_if_not_collected`, which the server calls after ``load()``), so a
    project that loads here also loads on Baseten; without one it returns ``""`` and
    nothing is required.
    """

    def __init__(self, data_dir: Path, volume_cache: bool = False) -> None:
        self._data_dir = data_dir
        self._volume_cache = volume_cache
        self._collected = not volume_cache

    def block_until_download_complete(self, *_: Any, **__: Any) -> str:
        self._collected = True
        return str(self._data_dir) if self._volume_cache else ""

    def raise_if_not_collected(self) -> None:
        if not self._collected:
            raise RuntimeError(NOT_COLLECTED)


def uses_volume_cache(raw: Mapping[str, Any]) -> bool:
    """Whether a config's ``model_cache`` (or legacy ``hf_cache``) has ``use_volume: true``
    entries, which Truss serves through the lazy data resolver."""
    cache = raw.get("model_cache", raw.get("hf_cache")) or []
    return isinstance(cache, list) and any(
        isinstance(item, Mapping) and item.get("use_volume") is True for item in cache
    )
