"""`kingpost engines`: the server's engines and, for a cluster engine (ray), its nodes,
their resources and the replicas Kingpost runs on each."""

from __future__ import annotations

import json
from typing import Any

import click

from kingpost.cli._common import client, output_option, print_rows

__all__ = ["engines", "node_rows"]

_COLUMNS = ["engine", "node", "alive", "cpu", "memory", "gpu", "replicas"]


def node_rows(answer: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per node of each cluster engine, one per engine that runs on this machine."""
    rows = []
    for e in answer.get("engines", []):
        if not e["running"]:
            continue
        for n in e.get("nodes") or [{"address": "this machine", "alive": True, "resources": {}}]:
            res = n.get("resources", {})
            rows.append(
                {
                    "engine": e["name"] + (" (default)" if e["default"] else ""),
                    "node": n["address"],
                    "alive": "yes" if n["alive"] else "no",
                    "cpu": f"{res['CPU']:g}" if "CPU" in res else "",
                    "memory": f"{res['memory'] / 2**30:.1f} GiB" if "memory" in res else "",
                    "gpu": f"{res['GPU']:g}" if "GPU" in res else "",
                    "replicas": ", ".join(r["replica_id"] for r in n.get("replicas", [])),
                }
            )
    return rows


@click.command()
@output_option
def engines(output: str) -> None:
    """The engines that run replicas now; a Ray cluster's nodes and what runs on each."""
    with client() as c:
        answer = c.engines()
    if output == "json":
        click.echo(json.dumps(answer, indent=2))
        return
    print_rows(node_rows(answer), _COLUMNS, output, title="Engines")
