"""YAML loading that keeps the node tree, so errors can name line numbers.

A config is composed once into a node tree; the plain data is constructed from
that tree, and :class:`SourceMap` answers "on which line is ``weights[1].source``"
by walking the same tree. Duplicate mapping keys are reported (Truss refuses
them too) instead of silently keeping the last one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from kingpost.errors import ConfigError

__all__ = ["Issue", "PathPart", "SourceMap", "format_path", "load_yaml"]

PathPart = str | int

try:  # the C loader is several times faster; fall back to pure Python
    _Loader: type[yaml.SafeLoader] = yaml.CSafeLoader  # type: ignore[assignment]
except AttributeError:  # pragma: no cover - depends on how PyYAML was built
    _Loader = yaml.SafeLoader


@dataclass(frozen=True)
class Issue:
    """One problem (or warning) found in a config, before it is formatted."""

    path: tuple[PathPart, ...]
    message: str
    value: Any = None
    has_value: bool = True
    at: tuple[PathPart, ...] | None = None
    """Where to look up the line, when not at ``path`` (e.g. a misspelt key)."""


def format_path(path: Sequence[PathPart]) -> str:
    """``("weights", 1, "source")`` -> ``weights[1].source``; ``()`` -> ``<root>``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "<root>"


class SourceMap:
    """Maps key paths of a loaded document to 1-based line numbers."""

    def __init__(self, root: yaml.Node | None) -> None:
        self._root = root

    def line(self, path: Sequence[PathPart]) -> int | None:
        """Line of the deepest node along ``path`` that exists in the document.

        For a mapping entry the line of its key is used; for a list item the
        line where the item starts. A path into a missing key answers with the
        line of its nearest existing parent.
        """
        node = self._root
        if node is None:
            return None
        best = node.start_mark.line + 1 if path == () else None
        for part in path:
            found = _child(node, part)
            if found is None:
                break
            line_node, node = found
            best = line_node.start_mark.line + 1
        if best is None:
            best = self._root.start_mark.line + 1 if self._root is not None else None
        return best


def _child(node: yaml.Node, part: PathPart) -> tuple[yaml.Node, yaml.Node] | None:
    """(node whose line names ``part``, value node) of one step down, or None."""
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.value == str(part):
                return key_node, value_node
        return None
    if (
        isinstance(node, yaml.SequenceNode)
        and isinstance(part, int)
        and 0 <= part < len(node.value)
    ):
        item: yaml.Node = node.value[part]
        return item, item
    return None


def _duplicates(node: yaml.Node, path: tuple[PathPart, ...], out: list[Issue]) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "?"
            if key in seen:
                out.append(
                    Issue(
                        (*path, key),
                        f"duplicate key `{key}` (line {key_node.start_mark.line + 1}); "
                        "YAML keeps only one of them: remove or merge the repeated key",
                        key,
                    )
                )
            seen.add(key)
            _duplicates(value_node, (*path, key), out)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _duplicates(item, (*path, index), out)


def load_yaml(text: str, filename: str) -> tuple[Any, SourceMap, list[Issue]]:
    """Parse ``text``: (data, source map, duplicate-key issues).

    Raises :class:`ConfigError` naming line and column for invalid YAML.
    """
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        column = mark.column + 1 if mark is not None else None
        problem = exc.problem or exc.context or "invalid YAML"
        where = f"line {line}, column {column}" if line is not None else "unknown position"
        raise ConfigError(
            f"{filename}: invalid YAML at {where}: {problem}; fix the syntax "
            "(check indentation and quoting) and try again",
            file=filename,
            errors=[{"path": "<root>", "line": line, "message": problem, "value": None}],
            line=line,
            column=column,
        ) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"{filename}: invalid YAML: {exc}",
            file=filename,
            errors=[{"path": "<root>", "line": None, "message": str(exc), "value": None}],
        ) from exc
    finally:
        loader.dispose()
    issues: list[Issue] = []
    if node is not None:
        _duplicates(node, (), issues)
    return data, SourceMap(node), issues
