"""``kingpost init NAME``: write a minimal, working model-class Truss project."""

from __future__ import annotations

import re
from pathlib import Path

from kingpost.errors import ConflictError, ValidationError

__all__ = ["scaffold_project"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,62}$")

CONFIG = """\
model_name: {name}
python_version: py311
requirements: []
resources:
  cpu: "1"
  memory: 1Gi
  use_gpu: false
runtime:
  predict_concurrency: 1
secrets: {{}}
environment_variables: {{}}
model_metadata:
  example_model_input: {{"text": "hello"}}
"""

MODEL = '''\
"""The model class Kingpost (and Truss) serves: load() once, predict() per request."""


class Model:
    def __init__(self, **kwargs):
        # kwargs may hold config, data_dir, secrets, environment, lazy_data_resolver.
        self._config = kwargs.get("config")
        self._model = None

    def load(self):
        # Load weights here; readiness stays false until this returns.
        self._model = str.upper

    def predict(self, model_input):
        text = model_input.get("text", "") if isinstance(model_input, dict) else str(model_input)
        return {"output": self._model(text)}
'''


def scaffold_project(target: Path, name: str) -> None:
    """Create ``target`` with ``config.yaml`` and ``model/model.py`` for model ``name``.

    Raises :class:`ValidationError` for a bad name and :class:`ConflictError`
    when ``target`` exists and is not an empty directory.
    """
    if not _NAME.match(name):
        raise ValidationError(
            f"model name {name!r} is not allowed: use letters, digits, space, '.', '_' or '-' "
            f"(at most 63 characters), e.g. `my-model`"
        )
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ConflictError(
            f"{target} already exists and is not empty; choose another directory with --dir"
        )
    (target / "model").mkdir(parents=True, exist_ok=True)
    (target / "config.yaml").write_text(CONFIG.format(name=name), encoding="utf-8")
    (target / "model" / "model.py").write_text(MODEL, encoding="utf-8")
