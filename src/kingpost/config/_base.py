"""Shared pieces of the config models: the base class and name rules."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict

__all__ = ["ConfigModel", "check_secret_name"]

_SECRET_NAME = re.compile(r"^[-._a-zA-Z0-9]+$")
_SECRET_NAME_MAX = 253


class ConfigModel(BaseModel):
    """Base of every ``config.yaml`` model.

    The format is Truss's, not ours: unknown keys are kept (``extra="allow"``)
    and reported as warnings by the loader, as Truss does; numbers given where
    Truss expects strings (``cpu: 4``, ``spec_version: 2.0``) become strings.
    """

    model_config = ConfigDict(
        extra="allow",
        frozen=True,
        protected_namespaces=(),
        coerce_numbers_to_str=True,
    )


def check_secret_name(name: str) -> str:
    """Secret names follow Baseten's rule (Kubernetes object names)."""
    if not name or name in {".", ".."} or not _SECRET_NAME.match(name):
        raise ValueError(
            f"secret name `{name}` is invalid: use only letters, digits, `-`, `_` and `.` "
            "(and not `.` or `..` alone), e.g. `hf_access_token`"
        )
    if len(name) > _SECRET_NAME_MAX:
        raise ValueError(f"secret name is longer than {_SECRET_NAME_MAX} characters; shorten it")
    return name
