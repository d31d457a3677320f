"""The ``secrets`` mapping a model class receives, and a lazy data resolver stand-in."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from kingpost.errors import SecretError

__all__ = ["LazyDataResolver", "Secrets", "UndeclaredSecretError"]


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


class LazyDataResolver:
    """Truss's ``lazy_data_resolver``: weights are mounted before start, so nothing waits."""

    def __init__(self, data_dir: Path) -> None:
        self._data_dir = data_dir

    def block_until_download_complete(self, *_: Any, **__: Any) -> str:
        return str(self._data_dir)
