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
            # As in the shell: a `]` first in the class (after any `!`) is a member, and a
            # `[` with no closing `]` is a plain character.
            first = i + 2 if pattern.startswith("[!", i) else i + 1
            end = pattern.find("]", first + 1 if pattern.startswith("]", first) else first)
            if end == -1:
                out.append(re.escape("["))
                i += 1
            else:
                out.append(_bracket(pattern[first:end], negate=first == i + 2))
                i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def _bracket(members: str, negate: bool) -> str:
    """A regex class for a shell bracket expression's members: ranges kept when in order
    (a reversed one, `z-a`, holds nothing), every other character literal."""
    parts, k = [], 0
    while k < len(members):
        if k + 2 < len(members) and members[k + 1] == "-":
            low, high = members[k], members[k + 2]
            if low <= high:
                parts.append(f"{re.escape(low)}-{re.escape(high)}")
            k += 3
        else:
            parts.append(re.escape(members[k]))
            k += 1
    if not parts:
        return "[^/]" if negate else "(?!)"  # `[!z-a]`: any one character; `[z-a]`: none
    return "[" + ("^" if negate else "") + "".join(parts) + "]"


def selected(path: str, allow: Sequence[str] | None, ignore: Sequence[str] | None) -> bool:
    """Whether ``path`` (relative, ``/``-separated) is mirrored."""
    if allow and not any(_compile(p).match(path) for p in allow):
        return False
    return not (ignore and any(_compile(p).match(path) for p in ignore))
