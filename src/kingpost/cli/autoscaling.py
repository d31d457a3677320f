"""``kingpost autoscaling set|show``: autoscaling settings per environment or deployment."""

from __future__ import annotations

from typing import Any

import click

from kingpost.cli._common import client, console, output_option, print_rows
from kingpost.controller.autoscale import AUTOSCALING_FIELDS

__all__ = ["autoscaling"]

_OPTIONS = {name: "--" + name.replace("_", "-") for name in AUTOSCALING_FIELDS}
_HELP = {
    "min_replica": "Replicas kept however idle (0: scale to zero).",
    "max_replica": "Most replicas the autoscaler may run.",
    "autoscaling_window": "Seconds of traffic averaged per decision (10-3600).",
    "scale_down_delay": "Seconds of lower traffic before a replica is removed (0-3600).",
    "concurrency_target": "Requests one replica should carry at once.",
    "target_utilization_percentage": "Share of the concurrency target to aim at (1-100).",
    "max_scale_down_rate": "Per cent of replicas one scale-down step may remove (1-100).",
}


@click.group()
def autoscaling() -> None:
    """Autoscaling settings: show them, change them in place."""


def _with_setting_options(fn: Any) -> Any:
    for name in reversed(AUTOSCALING_FIELDS):
        fn = click.option(_OPTIONS[name], name, type=int, help=_HELP[name])(fn)
    return fn


@autoscaling.command("set")
@click.argument("model")
@click.option("--environment", help="Environment whose settings to change (default production).")
@click.option("--deployment", help="A deployment's own settings instead of an environment's.")
@_with_setting_options
def autoscaling_set(
    model: str, environment: str | None, deployment: str | None, **values: int | None
) -> None:
    """Change settings in place: no new deployment, no restart of serving replicas."""
    if environment is not None and deployment is not None:
        raise click.UsageError("give --environment or --deployment, not both")
    changes = {k: v for k, v in values.items() if v is not None}
    if not changes:
        raise click.UsageError(
            f"nothing to change: give at least one of {', '.join(_OPTIONS.values())}"
        )
    with client() as c:
        out = c.update_autoscaling(model, changes, environment=environment, deployment=deployment)
    console.print(f"{out['status']}: {out['message']}", highlight=False, markup=False)


@autoscaling.command("show")
@click.argument("model")
@click.option("--environment", help="Only this environment.")
@output_option
def autoscaling_show(model: str, environment: str | None, output: str) -> None:
    """Each deployment's settings (and where they come from) and its replica counts."""
    with client() as c:
        deps = c.deployments(model)
        if environment is not None:
            env = c.environment(model, environment)
            deps = [d for d in deps if d["id"] == env["deployment_id"]]
    rows = []
    for d in deps:
        row = {
            "deployment": d["name"],
            "environments": ",".join(d.get("environments") or []),
            "from": d.get("autoscaling_settings_from") or "deployment",
            **d.get("autoscaling_settings", {}),
            "replicas": _replicas(d),
            "reason": d.get("scaling_reason", ""),
        }
        rows.append(row)
    columns = ["deployment", "environments", "from", *AUTOSCALING_FIELDS, "replicas", "reason"]
    print_rows(rows, columns, output)


def _replicas(d: dict[str, Any]) -> str:
    """wanted/starting/ready, or "" before the autoscaler has looked at it."""
    if d.get("replicas_wanted") is None:
        return ""
    return f"{d['replicas_wanted']}/{d['replicas_starting']}/{d['replicas_ready']}"
