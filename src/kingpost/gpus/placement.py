"""Placement: which devices each new replica gets, as a pure function.

``place(requests, inventory, assignments)`` -> one :class:`Placed` (the devices) or
:class:`Waiting` (why not: ``waiting for 2`` TIMES ``H100: 1 free of 8``) per request, in
order; each request placed is counted as taken for those after it. A device held by a
live replica (``assignments``) is not given again unless ``share`` is on (the user's
opt-in, ``KINGPOST_GPU_SHARING``), which then picks the least-held devices first.
:func:`unsatisfiable` says whether a request could never be placed on this inventory,
which the API refuses at push.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kingpost.config import Accelerator
from kingpost.gpus.inventory import Gpu, Inventory
from kingpost.gpus.names import AcceleratorNames, matches

__all__ = ["TIMES", "Placed", "Request", "Waiting", "candidates", "place", "unsatisfiable"]

TIMES = "\u00d7"
"""The multiplication sign of ``2×H100`` in messages."""  # noqa: RUF001


@dataclass(frozen=True)
class Request:
    key: str
    """The replica the devices are for."""
    accelerator: Accelerator


@dataclass(frozen=True)
class Placed:
    key: str
    devices: tuple[str, ...]
    """Device UUIDs, in inventory order."""


@dataclass(frozen=True)
class Waiting:
    key: str
    reason: str


def candidates(
    accelerator: Accelerator, inventory: Inventory, names: AcceleratorNames | None = None
) -> list[Gpu]:
    """The placeable devices of the kind asked for."""
    return [d for d in inventory.placeable if matches(accelerator.kind, d, names)]


def unsatisfiable(
    accelerator: Accelerator, inventory: Inventory, names: AcceleratorNames | None = None
) -> str | None:
    """Why ``accelerator`` can never be placed on this host (``None``: it can be)."""
    found = len(candidates(accelerator, inventory, names))
    if found >= accelerator.count:
        return None
    what = f"{accelerator.count}{TIMES}{accelerator.kind}"
    if found == 0:
        return f"this host has no {accelerator.kind} for {what} (inventory: {inventory.describe()})"
    return (
        f"this host has {found} {accelerator.kind} for {what} (inventory: {inventory.describe()})"
    )


def place(
    requests: Sequence[Request],
    inventory: Inventory,
    assignments: Mapping[str, Sequence[str]],
    *,
    names: AcceleratorNames | None = None,
    share: bool = False,
) -> list[Placed | Waiting]:
    """Devices for each request, or why it waits (see the module docstring)."""
    held: Counter[str] = Counter(u for devices in assignments.values() for u in devices)
    out: list[Placed | Waiting] = []
    for req in requests:
        fit = candidates(req.accelerator, inventory, names)
        what = f"{req.accelerator.count}{TIMES}{req.accelerator.kind}"
        free = [d for d in fit if held[d.uuid] == 0]
        if share and len(fit) >= req.accelerator.count:
            free = sorted(fit, key=lambda d: held[d.uuid])  # stable: inventory order on ties
        if len(free) < req.accelerator.count:
            reason = unsatisfiable(req.accelerator, inventory, names)
            out.append(
                Waiting(req.key, reason or f"waiting for {what}: {len(free)} free of {len(fit)}")
            )
            continue
        chosen = tuple(d.uuid for d in free[: req.accelerator.count])
        held.update(chosen)
        out.append(Placed(req.key, chosen))
    return out
