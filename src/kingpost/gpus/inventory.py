"""The host's accelerators: read through NVML, ``nvidia-smi`` as a fallback.

An inventory is a value (:class:`Inventory`); where it comes from is a seam
(:data:`InventorySource`, a function of no arguments). The server's source is
:func:`source_for`: a JSON file named by ``KINGPOST_FAKE_GPUS`` (for tests only: it lets an
integration test give a real ``kingpost server`` GPUs it does not have), else NVML, else
``nvidia-smi``. No NVIDIA driver means an empty inventory, never an error.

A GPU in MIG mode is listed with ``mig_mode`` set and is not placeable itself: its MIG
slices are listed after it as devices of their own (their UUIDs start ``MIG-``).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "Gpu",
    "Inventory",
    "InventorySource",
    "parse_nvidia_smi",
    "read_fake",
    "read_inventory",
    "read_nvidia_smi",
    "read_nvml",
    "source_for",
]

log = logging.getLogger(__name__)
_MIB = 1024**2


@dataclass(frozen=True)
class Gpu:
    """One device: a whole GPU, a GPU in MIG mode (not placeable), or a MIG slice."""

    index: str
    """NVML's index (``"0"``); a MIG slice's is ``"GPU:SLICE"`` (``"0:1"``)."""
    uuid: str
    """``GPU-…`` or ``MIG-…``: what ``CUDA_VISIBLE_DEVICES`` and Docker take."""
    name: str
    """As NVML reports it, e.g. ``NVIDIA H100 80GB HBM3``; a slice's ends ``MIG 3g.40gb``."""
    memory_bytes: int
    mig_mode: bool = False
    """The GPU is in MIG mode: replicas get its slices, never the GPU itself."""
    parent_uuid: str | None = None
    """A MIG slice's GPU."""

    @property
    def is_slice(self) -> bool:
        return self.parent_uuid is not None

    @property
    def placeable(self) -> bool:
        return not self.mig_mode or self.is_slice

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "uuid": self.uuid,
            "name": self.name,
            "memory_bytes": self.memory_bytes,
            "mig_mode": self.mig_mode,
            "parent_uuid": self.parent_uuid,
        }


@dataclass(frozen=True)
class Inventory:
    devices: tuple[Gpu, ...] = ()
    source: str = "none"
    """``nvml``, ``nvidia-smi``, ``fake:PATH`` or ``none`` (no driver found)."""
    note: str = ""
    """Why the inventory is empty, where it is (e.g. NVML's error)."""

    @property
    def placeable(self) -> tuple[Gpu, ...]:
        return tuple(d for d in self.devices if d.placeable)

    def describe(self) -> str:
        """One line for messages: ``0: NVIDIA L4 (22 GiB), 1: …`` or why there is none."""
        if not self.placeable:
            why = f" ({self.note})" if self.note else ""
            return f"no NVIDIA GPU on this host{why}"
        return ", ".join(
            f"{d.index}: {d.name} ({d.memory_bytes // 1024**3} GiB)" for d in self.placeable
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "note": self.note,
            "devices": [d.to_json() for d in self.devices],
        }


InventorySource = Callable[[], Inventory]
"""What the controller reads the host's devices through (the seam tests replace)."""


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def read_nvml(nvml: Any = None) -> Inventory:
    """The devices NVML reports (``nvml``: the ``pynvml`` module, or a fake of it)."""
    if nvml is None:
        import importlib

        nvml = importlib.import_module("pynvml")
    try:
        nvml.nvmlInit()
    except Exception as exc:  # no driver, no library: no GPU here
        return Inventory(source="none", note=f"NVML: {exc}")
    try:
        devices: list[Gpu] = []
        for i in range(nvml.nvmlDeviceGetCount()):
            devices.extend(_nvml_device(nvml, i))
        return Inventory(tuple(devices), source="nvml")
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:
            log.debug("nvmlShutdown failed", exc_info=True)


def _nvml_device(nvml: Any, i: int) -> list[Gpu]:
    handle = nvml.nvmlDeviceGetHandleByIndex(i)
    uuid = _text(nvml.nvmlDeviceGetUUID(handle))
    name = _text(nvml.nvmlDeviceGetName(handle))
    memory = int(nvml.nvmlDeviceGetMemoryInfo(handle).total)
    try:
        mig = nvml.nvmlDeviceGetMigMode(handle)[0] == nvml.NVML_DEVICE_MIG_ENABLE
    except Exception:  # NotSupported: a GPU without MIG
        mig = False
    gpu = Gpu(str(i), uuid, name, memory, mig_mode=mig)
    if not mig:
        return [gpu]
    slices = [gpu]
    for j in range(nvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
        try:
            sub = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, j)
        except Exception:  # NotFound: no slice at this index
            continue
        slices.append(
            Gpu(
                f"{i}:{j}",
                _text(nvml.nvmlDeviceGetUUID(sub)),
                _text(nvml.nvmlDeviceGetName(sub)),
                int(nvml.nvmlDeviceGetMemoryInfo(sub).total),
                mig_mode=True,
                parent_uuid=uuid,
            )
        )
    return slices


SMI_QUERY = "index,uuid,name,memory.total,mig.mode.current"
_SMI_MIG = re.compile(r"^\s*MIG\s+(\S+)\s+Device\s+(\d+):\s+\(UUID:\s*(MIG-[^)\s]+)\)")
_SMI_GPU = re.compile(r"^GPU\s+(\d+):.*\(UUID:\s*(GPU-[^)\s]+)\)")
_PROFILE_GB = re.compile(r"\.(\d+)gb$", re.IGNORECASE)


def parse_nvidia_smi(query_csv: str, listing: str = "") -> Inventory:
    """``nvidia-smi --query-gpu=SMI_QUERY --format=csv,noheader,nounits`` output, plus the
    MIG slices that ``nvidia-smi -L`` (``listing``) names under each GPU in MIG mode."""
    devices: list[Gpu] = []
    slices: dict[str, list[tuple[str, str, str]]] = {}
    parent = None
    for line in listing.splitlines():
        gpu = _SMI_GPU.match(line)
        if gpu:
            parent = gpu.group(2)
            continue
        mig = _SMI_MIG.match(line)
        if mig and parent is not None:
            slices.setdefault(parent, []).append((mig.group(2), mig.group(1), mig.group(3)))
    for row in csv.reader(io.StringIO(query_csv)):
        cells = [c.strip() for c in row]
        if len(cells) < 4 or not cells[0].isdigit():
            continue
        index, uuid, name, memory = cells[:4]
        in_mig = len(cells) > 4 and cells[4].lower() == "enabled"
        mib = int(memory) if memory.isdigit() else 0
        devices.append(Gpu(index, uuid, name, mib * _MIB, mig_mode=in_mig))
        for number, profile, mig_uuid in slices.get(uuid, []) if in_mig else []:
            gb = _PROFILE_GB.search(profile)
            size = int(gb.group(1)) * 1024**3 if gb else 0
            devices.append(
                Gpu(f"{index}:{number}", mig_uuid, f"{name} MIG {profile}", size, True, uuid)
            )
    return Inventory(tuple(devices), source="nvidia-smi")


def read_nvidia_smi(run: Callable[[list[str]], str] | None = None) -> Inventory:
    """The fallback where NVML's library cannot be loaded but ``nvidia-smi`` runs."""
    if run is None:
        if shutil.which("nvidia-smi") is None:
            return Inventory(source="none", note="no NVIDIA driver (NVML and nvidia-smi absent)")
        run = _run
    try:
        query = run(["nvidia-smi", f"--query-gpu={SMI_QUERY}", "--format=csv,noheader,nounits"])
        listing = run(["nvidia-smi", "-L"])
    except (OSError, subprocess.SubprocessError) as exc:
        return Inventory(source="none", note=f"nvidia-smi: {exc}")
    return parse_nvidia_smi(query, listing)


def _run(argv: list[str]) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=20).stdout


def read_fake(path: Path) -> Inventory:
    """A made-up inventory, FOR TESTS: ``[{"uuid": "GPU-…", "name": "NVIDIA L4",
    "memory_mib": 23034, "mig": [{"uuid": "MIG-…", "name": "…", "memory_mib": …}]}]``
    (``index`` defaults to the position; ``mig`` present means the GPU is in MIG mode)."""
    entries = json.loads(path.read_text())
    devices: list[Gpu] = []
    for i, e in enumerate(entries):
        index = str(e.get("index", i))
        mig = e.get("mig")
        devices.append(
            Gpu(index, e["uuid"], e["name"], int(e.get("memory_mib", 0)) * _MIB, mig is not None)
        )
        for j, s in enumerate(mig or []):
            devices.append(
                Gpu(
                    f"{index}:{j}",
                    s["uuid"],
                    s["name"],
                    int(s.get("memory_mib", 0)) * _MIB,
                    True,
                    e["uuid"],
                )
            )
    return Inventory(tuple(devices), source=f"fake:{path}")


def read_inventory() -> Inventory:
    """NVML, else ``nvidia-smi``, else empty."""
    found = read_nvml()
    if found.source == "nvml":
        return found
    fallback = read_nvidia_smi()
    if fallback.source == "nvidia-smi":
        return fallback
    return Inventory(source="none", note=found.note or fallback.note)


def source_for(fake_gpus: Path | None) -> InventorySource:
    """The server's source: the fake file when set (tests), else the host's driver."""
    if fake_gpus is not None:
        path = fake_gpus
        return lambda: read_fake(path)
    return read_inventory
