"""What a ``pyproject.toml`` named as ``requirements_file`` asks to install.

Truss installs such a file alone with ``uv pip install -r pyproject.toml``, so its
dependencies must be readable from the file itself: ``[project].dependencies``. When
they are ``dynamic``, a build backend would compute them from files that are not there
and nothing would be installed; without a ``[project]`` table (Poetry 1's
``[tool.poetry.dependencies]``) there is nothing to read. Both are refused, with the
invalid-TOML case, before anything is built.
"""

from __future__ import annotations

import tomllib

from kingpost.errors import ConfigError

__all__ = ["pyproject_dependencies"]

_NEXT_STEP = (
    "list them in [project].dependencies, or export a requirements.txt (e.g. `poetry "
    "export -f requirements.txt -o requirements.txt`) and name it in requirements_file"
)


def pyproject_dependencies(text: str, where: str) -> list[str]:
    """``[project].dependencies`` of ``text``; ``where`` names the file in errors."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _error(f"{where} is not valid TOML ({exc}); fix the file", where) from exc
    project = doc.get("project")
    if not isinstance(project, dict):
        found = ", ".join(f"[{key}]" for key in doc) or "no tables"
        raise _error(
            f"{where} has no [project] table (found {found}), so it names no dependencies "
            f"to install; {_NEXT_STEP}",
            where,
        )
    dynamic = project.get("dynamic", [])
    if isinstance(dynamic, list) and "dependencies" in dynamic:
        raise _error(
            f'{where}: [project].dynamic lists "dependencies", which only a build backend '
            "could compute, from files that are not installed from (only pyproject.toml "
            f"is, as in Truss), so nothing would be installed; {_NEXT_STEP}",
            where,
        )
    deps = project.get("dependencies", [])
    if not isinstance(deps, list) or not all(isinstance(d, str) for d in deps):
        raise _error(
            f"{where}: [project].dependencies must be a list of requirement strings, "
            f'found {deps!r}; e.g. dependencies = ["six==1.16.0"]',
            where,
        )
    return deps


def _error(message: str, where: str) -> ConfigError:
    return ConfigError(
        f"config.yaml: `requirements_file` {message}", field="requirements_file", value=where
    )
