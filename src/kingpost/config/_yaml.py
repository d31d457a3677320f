"""YAML loading that keeps the node tree, so errors can name line numbers.

A config is composed once into a node tree; the plain data is constructed from
that tree, and :class:`SourceMap` answers "on which line is ``weights[1].source``"
by walking the same tree. Duplicate mapping keys are reported (Truss refuses
them too) instead of silently keeping the last one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import yaml

from kingpost.errors import ConfigError

__all__ = ["Issue", "PathPart", "SourceMap", "format_path", "load_yaml"]

PathPart = str | int

try:  # the C loader is several times faster; fall back to pure Python
    _Base: type[yaml.SafeLoader] = yaml.CSafeLoader  # type: ignore[assignment]
except AttributeError:  # pragma: no cover - depends on how PyYAML was built
    _Base = yaml.SafeLoader


class _Loader(_Base):  # type: ignore[valid-type,misc]
    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        # A scalar that looks like a date or an integer but is not one (`2024-02-30`, an
        # integer past Python's 4300-digit limit) raises a bare ValueError: give it a mark.
        try:
            return super().construct_object(node, deep)
        except ValueError as exc:
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read `{str(node.value)[:40]}` as a "
                f"{node.tag.rsplit(':', 1)[-1]} ({exc}); quote it to keep it as a string",
                node.start_mark,
            ) from exc  # fmt: skip


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


MAX_DEPTH = 100
"""Deepest nesting of mappings and lists a config may have."""
MAX_VALUES = 1_000_000
"""Most values a config may hold once its aliases are expanded."""
MAX_EXPANDED_BYTES = 8 * 1024**2
"""Most bytes of values a config may hold once its aliases are expanded (each scalar's
UTF-8 text, and at least one byte per value): about the size of the JSON the store keeps."""


def _expanded(node: yaml.Node, sizes: dict[int, tuple[int, int]]) -> tuple[int, int]:
    """(values, bytes) of ``node`` with its aliases expanded, from its children's."""
    if isinstance(node, yaml.ScalarNode):
        return 1, max(1, len(str(node.value).encode("utf-8", "surrogatepass")))
    values, size = 1, 1
    for _, child in _children(node):
        child_values, child_bytes = sizes[id(child)]
        values, size = values + child_values, size + child_bytes
    return values, size


def _mib(size: int) -> str:
    return f"{size / 1024**2:.1f} MiB" if size >= 1024**2 else f"{size} bytes"


def _children(node: yaml.Node) -> list[tuple[PathPart, yaml.Node]]:
    if isinstance(node, yaml.MappingNode):
        out: list[tuple[PathPart, yaml.Node]] = []
        for key_node, value_node in node.value:
            key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "?"
            out += [(key, key_node), (key, value_node)]
        return out
    if isinstance(node, yaml.SequenceNode):
        return list(enumerate(node.value))
    return []


def _structure_error(
    filename: str, path: tuple[PathPart, ...], line: int, problem: str
) -> NoReturn:
    where = format_path(path)
    raise ConfigError(
        f"{filename}: {where} (line {line}): {problem}",
        file=filename,
        errors=[{"path": where, "line": line, "message": problem, "value": None}],
        line=line,
    )


def _check_nodes(root: yaml.Node, filename: str) -> list[Issue]:
    """Walk the node tree once per node (aliases share nodes): duplicate-key issues.

    Raises :class:`ConfigError` for an alias inside its own anchor and for a document
    whose aliases expand it beyond :data:`MAX_VALUES` values or
    :data:`MAX_EXPANDED_BYTES` bytes; a walk that followed every alias would recurse
    forever on the first and take exponential time on the second, and the store would
    keep every expanded copy (10 KB of aliases made a 222 MB database).
    """
    issues: list[Issue] = []
    sizes: dict[int, tuple[int, int]] = {}  # expanded (values, bytes) of each finished node
    open_nodes: set[int] = set()  # the nodes on the path from the root
    stack: list[tuple[yaml.Node, tuple[PathPart, ...], bool]] = [(root, (), False)]
    while stack:
        node, path, leaving = stack.pop()
        if leaving:
            open_nodes.discard(id(node))
            values, size = _expanded(node, sizes)
            if values > MAX_VALUES:
                _structure_error(
                    filename, path, node.start_mark.line + 1,
                    f"the document holds more than {MAX_VALUES} values once its aliases "
                    "(`*name`) are expanded; write the values out or use fewer aliases",
                )  # fmt: skip
            if size > MAX_EXPANDED_BYTES:
                _structure_error(
                    filename, path, node.start_mark.line + 1,
                    f"this value holds {_mib(size)} ({size} bytes) once its aliases "
                    f"(`*name`) are expanded, more than the limit of "
                    f"{_mib(MAX_EXPANDED_BYTES)} for a whole config; keep big data in "
                    "files of the project or in weights, not in config.yaml",
                )  # fmt: skip
            sizes[id(node)] = values, size
            continue
        if id(node) in open_nodes:
            _structure_error(
                filename, path, node.start_mark.line + 1,
                "an alias (`*name`) refers to an anchor that contains it, which makes an "
                "endless value; remove the alias or move it out of its anchor",
            )  # fmt: skip
        if id(node) in sizes:
            continue  # reached again through an alias: already checked
        open_nodes.add(id(node))
        stack.append((node, path, True))
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for key_node, _ in node.value:
                key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "?"
                if key in seen:
                    issues.append(
                        Issue(
                            (*path, key),
                            f"duplicate key `{key}` (line {key_node.start_mark.line + 1}); "
                            "YAML keeps only one of them: remove or merge the repeated key",
                            key,
                        )
                    )
                seen.add(key)
        for part, child in reversed(_children(node)):
            stack.append((child, (*path, part), False))
    return issues


def _too_deep(filename: str, line: int) -> NoReturn:
    _structure_error(
        filename, (), line,
        f"mappings and lists are nested more than {MAX_DEPTH} levels deep; "
        "flatten the structure",
    )  # fmt: skip


def _libyaml_depth_limit(exc: yaml.MarkedYAMLError) -> bool:
    """Whether ``exc`` is libyaml's own nesting limit (PyYAML 6.0.3+ builds with a libyaml
    that refuses 1000 levels while scanning, before any event reaches :func:`_check_depth`:
    in flow style the scanner reads ahead past every ``[`` looking for a ``:``)."""
    return "maximum nesting depth" in (exc.problem or "")


def _check_depth(text: str, filename: str, loader: type[yaml.SafeLoader] | None = None) -> None:
    """Refuse nesting deeper than :data:`MAX_DEPTH` before composing: the C composer
    recurses once per level and overflows the C stack (a crash, not an exception).

    Whichever refuses first, this walk or libyaml's scanner, the user gets the same error."""
    depth = 0
    try:
        for event in yaml.parse(text, Loader=loader or _Loader):
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_DEPTH:
                    _too_deep(filename, event.start_mark.line + 1 if event.start_mark else 0)
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
    except yaml.MarkedYAMLError as exc:
        if not _libyaml_depth_limit(exc):
            raise
        mark = exc.problem_mark or exc.context_mark
        _too_deep(filename, mark.line + 1 if mark is not None else 0)


def load_yaml(text: str, filename: str) -> tuple[Any, SourceMap, list[Issue]]:
    """Parse ``text``: (data, source map, duplicate-key issues).

    Raises :class:`ConfigError` naming line and column for invalid YAML.
    """
    loader = _Loader(text)
    try:
        _check_depth(text, filename)
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
    issues = _check_nodes(node, filename) if node is not None else []
    return data, SourceMap(node), issues
