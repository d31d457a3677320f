"""``allow_patterns`` / ``ignore_patterns`` with the seed's semantics.

Unix shell wildcards over the path relative to the source root, where ``*`` and ``?``
never cross ``/``: ``*.safetensors`` matches top-level files only, and
``**/*.safetensors`` matches at any depth (including the top level).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

__all__ = ["selected"]


@functools.cache
def _compile(pattern: str) -> re.Pattern[str]:
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[":
            end = pattern.find("]", i + 1)
            if end == -1:
                out.append(re.escape("["))
                i += 1
            else:
                body = pattern[i + 1 : end].replace("\\", "\\\\")
                out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
                i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def selected(path: str, allow: Sequence[str] | None, ignore: Sequence[str] | None) -> bool:
    """Whether ``path`` (relative, ``/``-separated) is mirrored."""
    if allow and not any(_compile(p).match(path) for p in allow):
        return False
    return not (ignore and any(_compile(p).match(path) for p in ignore))
