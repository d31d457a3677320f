"""Which devices a Truss accelerator kind (``L4``, ``H100``, ``H100_40GB``) means.

Truss names kinds by model; NVML names devices in full (``NVIDIA H100 80GB HBM3``,
``NVIDIA A100-SXM4-40GB``, ``NVIDIA L4``, ``NVIDIA A10G``, ``NVIDIA H200``; a MIG slice
``NVIDIA H100 80GB HBM3 MIG 3g.40gb``). The rules (README, "GPUs"):

1. A kind the user mapped (``KINGPOST_ACCELERATOR_NAMES='{"MYCARD": "NVIDIA RTX 4090"}'``,
   a name or a list of names) matches exactly those device names, case aside, and nothing
   else. A mapping replaces the rules below for that kind.
2. Otherwise the kind is split on ``_``; a last part like ``40GB`` is a memory size, the
   rest is the model (``RTX_PRO_6000``: ``RTX PRO 6000``). The device name is split into
   words at spaces and ``-``; the model's words must appear in it in a row, case aside
   (``L4`` matches ``NVIDIA L4`` and not ``NVIDIA L40S``; ``V100`` matches
   ``Tesla V100-SXM2-16GB``).
3. Without a size, only whole GPUs match (``H100`` is a whole H100, whatever its memory).
   With one, a whole GPU matches when its name has that word (``A100_40GB``:
   ``NVIDIA A100-PCIE-40GB``), and a MIG slice when its profile ends with it
   (``H100_40GB``: ``… MIG 3g.40gb``, which is what Baseten's H100_40GB is).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from kingpost.gpus.inventory import Gpu

__all__ = ["AcceleratorNames", "matches", "normalize_names"]

AcceleratorNames = Mapping[str, Sequence[str]]
"""A user's own kinds: kind (upper case) -> the device names it means."""
_SIZE = re.compile(r"^\d+GB$", re.IGNORECASE)
_WORDS = re.compile(r"[\s\-]+")


def normalize_names(raw: Mapping[str, str | Sequence[str]]) -> dict[str, tuple[str, ...]]:
    """The setting's value with kinds in upper case and every value a tuple of names."""
    out: dict[str, tuple[str, ...]] = {}
    for kind, names in raw.items():
        listed = (names,) if isinstance(names, str) else tuple(names)
        out[kind.upper()] = tuple(n.strip() for n in listed)
    return out


def _words(text: str) -> list[str]:
    return [w.upper() for w in _WORDS.split(text.strip()) if w]


def _in_a_row(needle: list[str], words: list[str]) -> bool:
    n = len(needle)
    return n > 0 and any(words[i : i + n] == needle for i in range(len(words) - n + 1))


def matches(kind: str, device: Gpu, names: AcceleratorNames | None = None) -> bool:
    """Whether ``device`` is a ``kind`` (see the module docstring for the rules)."""
    kind = kind.upper()
    mapped = (names or {}).get(kind)
    if mapped is not None:
        return device.name.strip().upper() in {n.upper() for n in mapped}
    parts = kind.split("_")
    size = parts.pop() if len(parts) > 1 and _SIZE.match(parts[-1]) else None
    model, _, profile = device.name.partition(" MIG ")
    if not _in_a_row(parts, _words(model)):
        return False
    if size is None:
        return not device.is_slice
    if device.is_slice:
        return profile.strip().upper().endswith(f".{size}")
    return size in _words(model)
