"""`kingpost gpus`: the server's accelerators, read again, and which replica holds each."""

from __future__ import annotations

import json
from typing import Any

import click

from kingpost.cli._common import client, console, output_option, print_rows

__all__ = ["gpu_rows", "gpus"]

_COLUMNS = ["index", "name", "memory", "mig", "uuid", "replica", "deployment"]


def gpu_rows(inventory: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per device, as the table shows it."""
    rows = []
    for d in inventory.get("devices", []):
        held = d.get("held_by") or {}
        mig = "slice" if d.get("parent_uuid") else ("on" if d.get("mig_mode") else "")
        rows.append(
            {
                "index": d["index"],
                "name": d["name"],
                "memory": f"{d['memory_bytes'] / 1024**3:.0f} GiB",
                "mig": mig,
                "uuid": d["uuid"],
                "replica": held.get("replica_id", ""),
                "deployment": held.get("deployment_id", ""),
            }
        )
    return rows


@click.command()
@output_option
def gpus(output: str) -> None:
    """The server's GPUs (NVML, else nvidia-smi) and the replica holding each."""
    with client() as c:
        inventory = c.gpus()
    if output == "json":  # what the API answers, whole, for scripts
        click.echo(json.dumps(inventory, indent=2))
        return
    if not inventory.get("devices"):
        note = inventory.get("note") or "no NVIDIA driver found"
        console.print(f"no GPU on the server ({note})")
        return
    print_rows(gpu_rows(inventory), _COLUMNS, output, title=f"GPUs ({inventory['source']})")
