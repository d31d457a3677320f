"""Accelerators: the host's inventory, accelerator kinds matched to it, placement."""

from kingpost.gpus.inventory import (
    Gpu,
    Inventory,
    InventorySource,
    parse_nvidia_smi,
    read_fake,
    read_inventory,
    read_nvidia_smi,
    read_nvml,
    source_for,
)
from kingpost.gpus.names import AcceleratorNames, matches, normalize_names
from kingpost.gpus.placement import Placed, Request, Waiting, candidates, place, unsatisfiable

__all__ = [
    "AcceleratorNames",
    "Gpu",
    "Inventory",
    "InventorySource",
    "Placed",
    "Request",
    "Waiting",
    "candidates",
    "matches",
    "normalize_names",
    "parse_nvidia_smi",
    "place",
    "read_fake",
    "read_inventory",
    "read_nvidia_smi",
    "read_nvml",
    "source_for",
    "unsatisfiable",
]
