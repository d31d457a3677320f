from __future__ import annotations

import pytest

from kingpost.weights import selected

CASES = [
    ("model.safetensors", ["*.safetensors"], None, True),
    ("sub/model.safetensors", ["*.safetensors"], None, False),
    ("sub/model.safetensors", ["**/*.safetensors"], None, True),
    ("model.safetensors", ["**/*.safetensors"], None, True),
    ("a/b/c.bin", ["a/*/c.bin"], None, True),
    ("a/b/d/c.bin", ["a/*/c.bin"], None, False),
    ("README.md", None, ["*.md"], False),
    ("docs/x.md", None, ["*.md"], True),
    ("config.json", ["*.json", "*.safetensors"], ["tokenizer*"], True),
    ("tokenizer.json", ["*.json"], ["tokenizer*"], False),
    ("w1.bin", ["w?.bin"], None, True),
    ("w10.bin", ["w?.bin"], None, False),
    ("w1.bin", ["w[0-9].bin"], None, True),
    ("wa.bin", ["w[!0-9].bin"], None, True),
    # Bracket expressions the shell accepts and a naive translation to a regex does not.
    ("]", ["[]a]"], None, True),
    ("a", ["[]a]"], None, True),
    ("b", ["[!]]"], None, True),
    ("]", ["[!]]"], None, False),
    ("[!]", ["[!]"], None, True),
    ("-", ["[a-]"], None, True),
    ("m", ["[z-a]"], None, False),
    ("m", ["[!z-a]"], None, True),
    ("^", ["[^a]"], None, True),
    ("[a", ["[a"], None, True),
]


@pytest.mark.parametrize(("path", "allow", "ignore", "expected"), CASES)
def test_patterns(
    path: str, allow: list[str] | None, ignore: list[str] | None, expected: bool
) -> None:
    assert selected(path, allow, ignore) is expected


@pytest.mark.parametrize("pattern", ["[]a]", "[!]", "[!]]", "[z-a]", "[\\]", "[[]", "[a-\\]"])
def test_no_pattern_fails_to_compile(pattern: str) -> None:
    selected("x", [pattern], [pattern])  # raised re.error inside the mirror before
