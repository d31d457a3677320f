"""GPU inventory readers (a fake pynvml module, sample nvidia-smi output), accelerator
names matched to NVML's, and the placement table (0, 1, 8 GPUs and MIG slices)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from kingpost.config import Accelerator
from kingpost.gpus import (
    Gpu,
    Inventory,
    Placed,
    Request,
    Waiting,
    matches,
    normalize_names,
    parse_nvidia_smi,
    place,
    read_fake,
    read_nvidia_smi,
    read_nvml,
    unsatisfiable,
)

GIB = 1024**3


def gpu(i: int, name: str = "NVIDIA H100 80GB HBM3", gib: int = 80) -> Gpu:
    return Gpu(str(i), f"GPU-{i:04d}", name, gib * GIB)


def inventory(*devices: Gpu) -> Inventory:
    return Inventory(tuple(devices), source="test")


NONE = inventory()
ONE_L4 = inventory(gpu(0, "NVIDIA L4", 22))
EIGHT_H100 = inventory(*(gpu(i) for i in range(8)))
MIG_H100 = inventory(
    Gpu("0", "GPU-m", "NVIDIA H100 80GB HBM3", 80 * GIB, mig_mode=True),
    Gpu("0:0", "MIG-a", "NVIDIA H100 80GB HBM3 MIG 3g.40gb", 40 * GIB, True, "GPU-m"),
    Gpu("0:1", "MIG-b", "NVIDIA H100 80GB HBM3 MIG 3g.40gb", 40 * GIB, True, "GPU-m"),
    gpu(1),
)


# -- names ---------------------------------------------------------------------------------
NAMES = [
    ("L4", "NVIDIA L4", True),
    ("L4", "NVIDIA L40S", False),
    ("L40S", "NVIDIA L40S", True),
    ("A10G", "NVIDIA A10G", True),
    ("a10g", "NVIDIA A10G", True),  # case aside
    ("A10", "NVIDIA A10G", False),
    ("T4", "Tesla T4", True),
    ("V100", "Tesla V100-SXM2-16GB", True),
    ("H100", "NVIDIA H100 80GB HBM3", True),
    ("H100", "NVIDIA H100 PCIe", True),
    ("H100", "NVIDIA H100 NVL", True),
    ("H100", "NVIDIA H200", False),
    ("H200", "NVIDIA H200", True),
    ("A100", "NVIDIA A100-SXM4-80GB", True),
    ("A100_40GB", "NVIDIA A100-SXM4-40GB", True),
    ("A100_40GB", "NVIDIA A100-SXM4-80GB", False),
    ("A100_40GB", "NVIDIA A100-PCIE-40GB", True),
    ("H100_40GB", "NVIDIA H100 80GB HBM3", False),  # a whole H100 is not H100_40GB
    ("B200", "NVIDIA B200", True),
    ("RTX_PRO_6000", "NVIDIA RTX PRO 6000 Blackwell Server Edition", True),
]


@pytest.mark.parametrize(("kind", "name", "expected"), NAMES, ids=[f"{k}~{n}" for k, n, _ in NAMES])
def test_kinds_match_nvml_names(kind: str, name: str, expected: bool) -> None:
    assert matches(kind, Gpu("0", "GPU-x", name, 0)) is expected


def test_a_size_kind_matches_mig_slices_of_that_size_and_a_plain_kind_does_not() -> None:
    slice_ = MIG_H100.devices[1]
    assert matches("H100_40GB", slice_)
    assert not matches("H100", slice_)  # H100 is a whole card
    assert not matches("H100_20GB", slice_)
    assert not matches("A100_40GB", slice_)


def test_a_user_mapping_replaces_the_rules_for_its_kind() -> None:
    names = normalize_names({"mycard": "NVIDIA GeForce RTX 4090", "H100": ["NVIDIA H800"]})
    assert names == {"MYCARD": ("NVIDIA GeForce RTX 4090",), "H100": ("NVIDIA H800",)}
    assert matches("MYCARD", Gpu("0", "u", "nvidia geforce rtx 4090", 0), names)
    assert not matches("MYCARD", Gpu("0", "u", "NVIDIA GeForce RTX 4080", 0), names)
    assert matches("H100", Gpu("0", "u", "NVIDIA H800", 0), names)
    assert not matches("H100", Gpu("0", "u", "NVIDIA H100 80GB HBM3", 0), names)
    assert matches("L4", Gpu("0", "u", "NVIDIA L4", 0), names)  # other kinds: the rules


# -- placement -----------------------------------------------------------------------------
def req(key: str, spec: str) -> Request:
    found = Accelerator.parse(spec)
    assert found is not None
    return Request(key, found)


def outcome(results: list[Placed | Waiting]) -> list[tuple[str, ...] | str]:
    return [r.devices if isinstance(r, Placed) else r.reason for r in results]


PLACEMENT: list[tuple[str, Inventory, list[Request], dict[str, list[str]], list[Any]]] = [
    ("no gpu", NONE, [req("r", "L4")], {},
     ["this host has no L4 for 1\u00d7L4 (inventory: no NVIDIA GPU on this host)"]),
    ("one free", ONE_L4, [req("r", "L4")], {}, [("GPU-0000",)]),
    ("one held", ONE_L4, [req("r", "L4")], {"old": ["GPU-0000"]},
     ["waiting for 1\u00d7L4: 0 free of 1"]),
    ("one, two asks", ONE_L4, [req("a", "L4"), req("b", "L4")], {},
     [("GPU-0000",), "waiting for 1\u00d7L4: 0 free of 1"]),
    ("wrong kind", ONE_L4, [req("r", "A10G")], {},
     ["this host has no A10G for 1\u00d7A10G (inventory: 0: NVIDIA L4 (22 GiB))"]),
    ("too many", ONE_L4, [req("r", "L4:2")], {},
     ["this host has 1 L4 for 2\u00d7L4 (inventory: 0: NVIDIA L4 (22 GiB))"]),
    ("eight, two of them", EIGHT_H100, [req("r", "H100:2")], {}, [("GPU-0000", "GPU-0001")]),
    ("eight, skips held", EIGHT_H100, [req("r", "H100:2")], {"x": ["GPU-0000", "GPU-0002"]},
     [("GPU-0001", "GPU-0003")]),
    ("eight, 1 free of 8", EIGHT_H100, [req("r", "H100:2")],
     {f"x{i}": [f"GPU-{i:04d}"] for i in range(7)}, ["waiting for 2\u00d7H100: 1 free of 8"]),
    ("eight, in turn", EIGHT_H100, [req("a", "H100:4"), req("b", "H100:4"), req("c", "H100")], {},
     [tuple(f"GPU-{i:04d}" for i in range(4)), tuple(f"GPU-{i:04d}" for i in range(4, 8)),
      "waiting for 1\u00d7H100: 0 free of 8"]),
    ("mig slices", MIG_H100, [req("a", "H100_40GB"), req("b", "H100_40GB"), req("c", "H100")], {},
     [("MIG-a",), ("MIG-b",), ("GPU-0001",)]),
    ("mig, the mig gpu is not whole", MIG_H100, [req("a", "H100:2")], {},
     ["this host has 1 H100 for 2\u00d7H100 (inventory: 0:0: NVIDIA H100 80GB HBM3 MIG 3g.40gb "
      "(40 GiB), 0:1: NVIDIA H100 80GB HBM3 MIG 3g.40gb (40 GiB), 1: NVIDIA H100 80GB HBM3 "
      "(80 GiB))"]),
    ("mig slice held", MIG_H100, [req("a", "H100_40GB:2")], {"x": ["MIG-b"]},
     ["waiting for 2\u00d7H100_40GB: 1 free of 2"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("inv", "requests", "held", "expected"),
    [p[1:] for p in PLACEMENT],
    ids=[p[0] for p in PLACEMENT],
)
def test_placement(
    inv: Inventory, requests: list[Request], held: dict[str, list[str]], expected: list[Any]
) -> None:
    assert outcome(place(requests, inv, held)) == expected


def test_sharing_is_opt_in_and_picks_the_least_held_devices() -> None:
    two = inventory(gpu(0), gpu(1))
    held = {"x": ["GPU-0000"], "y": ["GPU-0000"], "z": ["GPU-0001"]}
    assert outcome(place([req("r", "H100")], two, held)) == ["waiting for 1\u00d7H100: 0 free of 2"]
    assert outcome(place([req("r", "H100")], two, held, share=True)) == [("GPU-0001",)]
    # Sharing never makes an impossible request possible.
    got = place([req("r", "H100:3")], two, {}, share=True)
    assert isinstance(got[0], Waiting) and "has 2 H100 for 3\u00d7H100" in got[0].reason


def test_unsatisfiable_names_the_inventory() -> None:
    assert unsatisfiable(Accelerator("H100", 8), EIGHT_H100) is None
    assert unsatisfiable(Accelerator("H100", 9), EIGHT_H100) is not None
    why = unsatisfiable(Accelerator("MYCARD", 1), ONE_L4, normalize_names({"MYCARD": "NVIDIA L4"}))
    assert why is None


# -- readers -------------------------------------------------------------------------------
class NVMLError(Exception):
    pass


def fake_nvml(devices: list[dict[str, Any]], fail_init: bool = False) -> Any:
    """A stand-in for the pynvml module: handles are the dicts themselves."""
    calls: list[str] = []

    def init() -> None:
        calls.append("init")
        if fail_init:
            raise NVMLError("NVML Shared Library Not Found")

    def mig_mode(h: dict[str, Any]) -> tuple[int, int]:
        if "mig" not in h:
            raise NVMLError("Not Supported")
        return (1, 1)

    def mig_handle(h: dict[str, Any], j: int) -> dict[str, Any]:
        if j >= len(h["mig"]) or h["mig"][j] is None:
            raise NVMLError("Not Found")
        return dict(h["mig"][j])

    return SimpleNamespace(
        calls=calls,
        NVML_DEVICE_MIG_ENABLE=1,
        nvmlInit=init,
        nvmlShutdown=lambda: calls.append("shutdown"),
        nvmlDeviceGetCount=lambda: len(devices),
        nvmlDeviceGetHandleByIndex=lambda i: devices[i],
        nvmlDeviceGetUUID=lambda h: h["uuid"],
        nvmlDeviceGetName=lambda h: h["name"],
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(total=h["mib"] * 1024**2),
        nvmlDeviceGetMigMode=mig_mode,
        nvmlDeviceGetMaxMigDeviceCount=lambda h: 7,
        nvmlDeviceGetMigDeviceHandleByIndex=mig_handle,
    )


def test_nvml_reader_lists_gpus_and_mig_slices() -> None:
    nvml = fake_nvml([
        {"uuid": "GPU-a", "name": b"NVIDIA L4", "mib": 23034},  # old pynvml: bytes
        {"uuid": "GPU-m", "name": "NVIDIA H100 80GB HBM3", "mib": 81559,
         "mig": [{"uuid": "MIG-1", "name": "NVIDIA H100 80GB HBM3 MIG 3g.40gb", "mib": 40320},
                 None,
                 {"uuid": "MIG-2", "name": "NVIDIA H100 80GB HBM3 MIG 1g.10gb", "mib": 9856}]},
    ])  # fmt: skip
    inv = read_nvml(nvml)
    assert inv.source == "nvml" and nvml.calls == ["init", "shutdown"]
    assert [(d.index, d.uuid, d.name, d.mig_mode, d.parent_uuid) for d in inv.devices] == [
        ("0", "GPU-a", "NVIDIA L4", False, None),
        ("1", "GPU-m", "NVIDIA H100 80GB HBM3", True, None),
        ("1:0", "MIG-1", "NVIDIA H100 80GB HBM3 MIG 3g.40gb", True, "GPU-m"),
        ("1:2", "MIG-2", "NVIDIA H100 80GB HBM3 MIG 1g.10gb", True, "GPU-m"),
    ]
    assert inv.devices[0].memory_bytes == 23034 * 1024**2
    assert [d.uuid for d in inv.placeable] == ["GPU-a", "MIG-1", "MIG-2"]


def test_no_driver_is_an_empty_inventory_not_an_error() -> None:
    inv = read_nvml(fake_nvml([], fail_init=True))
    assert inv.devices == () and inv.source == "none"
    assert "NVML Shared Library Not Found" in inv.note
    assert "no NVIDIA GPU on this host" in inv.describe()


SMI_QUERY = """\
0, GPU-11111111-2222-3333-4444-555555555555, NVIDIA H100 80GB HBM3, 81559, Disabled
1, GPU-66666666-2222-3333-4444-555555555555, NVIDIA H100 80GB HBM3, 81559, Enabled
2, GPU-77777777-2222-3333-4444-555555555555, Tesla T4, 15360, [N/A]
"""
SMI_LIST = """\
GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-11111111-2222-3333-4444-555555555555)
GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-66666666-2222-3333-4444-555555555555)
  MIG 3g.40gb     Device  0: (UUID: MIG-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee)
  MIG 3g.40gb     Device  1: (UUID: MIG-ffffffff-bbbb-cccc-dddd-eeeeeeeeeeee)
GPU 2: Tesla T4 (UUID: GPU-77777777-2222-3333-4444-555555555555)
"""


def test_nvidia_smi_output_is_parsed_with_mig_slices() -> None:
    inv = parse_nvidia_smi(SMI_QUERY, SMI_LIST)
    assert inv.source == "nvidia-smi"
    assert [(d.index, d.name, d.mig_mode, d.memory_bytes // 1024**2) for d in inv.devices] == [
        ("0", "NVIDIA H100 80GB HBM3", False, 81559),
        ("1", "NVIDIA H100 80GB HBM3", True, 81559),
        ("1:0", "NVIDIA H100 80GB HBM3 MIG 3g.40gb", True, 40 * 1024),
        ("1:1", "NVIDIA H100 80GB HBM3 MIG 3g.40gb", True, 40 * 1024),
        ("2", "Tesla T4", False, 15360),
    ]
    assert inv.devices[2].uuid == "MIG-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
    assert inv.devices[2].parent_uuid == inv.devices[1].uuid
    assert [matches("H100_40GB", d) for d in inv.placeable] == [False, True, True, False]


def test_nvidia_smi_runs_the_two_queries_and_a_failure_reads_as_none() -> None:
    seen: list[list[str]] = []

    def run(argv: list[str]) -> str:
        seen.append(argv)
        return SMI_QUERY if "--format=csv,noheader,nounits" in argv else SMI_LIST

    assert len(read_nvidia_smi(run).devices) == 5
    assert seen[0][1] == "--query-gpu=index,uuid,name,memory.total,mig.mode.current"

    def broken(argv: list[str]) -> str:
        raise OSError("nvidia-smi: driver not loaded")

    inv = read_nvidia_smi(broken)
    assert inv.devices == () and "driver not loaded" in inv.note


def test_fake_inventory_file(tmp_path: Path) -> None:
    path = tmp_path / "gpus.json"
    path.write_text(json.dumps([
        {"uuid": "GPU-a", "name": "NVIDIA L4", "memory_mib": 23034},
        {"uuid": "GPU-m", "name": "NVIDIA H100 80GB HBM3", "memory_mib": 81559,
         "mig": [{"uuid": "MIG-1", "name": "NVIDIA H100 80GB HBM3 MIG 3g.40gb"}]},
    ]))  # fmt: skip
    inv = read_fake(path)
    assert inv.source == f"fake:{path}"
    assert [(d.index, d.uuid, d.placeable) for d in inv.devices] == [
        ("0", "GPU-a", True), ("1", "GPU-m", False), ("1:0", "MIG-1", True)
    ]  # fmt: skip


def test_the_environment_a_replica_gets_for_its_devices() -> None:
    from kingpost.engines.base import gpu_environment

    assert gpu_environment(None) == {}  # no GPU here, none asked for: left alone
    assert gpu_environment(()) == {"CUDA_VISIBLE_DEVICES": "", "NVIDIA_VISIBLE_DEVICES": "none"}
    assert gpu_environment(("GPU-a", "MIG-b")) == {
        "CUDA_VISIBLE_DEVICES": "GPU-a,MIG-b",
        "NVIDIA_VISIBLE_DEVICES": "GPU-a,MIG-b",
    }
