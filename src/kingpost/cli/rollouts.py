"""Commands for environments (promotion settings) and the rollouts promotions start."""

from __future__ import annotations

import json
from typing import Any

import click

from kingpost.cli._common import client, output_option, print_rows

__all__ = ["environments", "rollouts"]

_ENV_COLUMNS = ["name", "deployment_id", "rolling", "promotion", "updated_at"]
_ROLLOUT_COLUMNS = [
    "id",
    "environment",
    "status",
    "step",
    "traffic",
    "replicas",
    "previous_deployment_id",
    "candidate_deployment_id",
    "requested",
    "message",
]


def _env_row(env: dict[str, Any]) -> dict[str, Any]:
    settings = env.get("promotion_settings") or {}
    config = settings.get("rolling_deploy_config") or {}
    rolling = "off"
    if settings.get("rolling_deploy"):
        rule = (
            f"surge {config['max_surge_percent']}%"
            if config.get("max_surge_percent") is not None
            else f"unavailable {config.get('max_unavailable_percent')}%"
        )
        rolling = f"{rule}, stabilize {config.get('stabilization_time_seconds', 0):g} s"
    elif settings.get("ramp_up_while_promoting"):
        rolling = f"canary over {settings.get('ramp_up_duration_seconds', 0):g} s"
    rollout = env.get("rollout")
    promotion = f"{rollout['status']} ({rollout['id']})" if rollout else ""
    return {**env, "rolling": rolling, "promotion": promotion}


def _rollout_row(r: dict[str, Any]) -> dict[str, Any]:
    return {
        **r,
        "step": f"{r['step']}/{r['steps']} {r['phase']}",
        "traffic": f"{r['previous_traffic_percent']:g}% -> {r['candidate_traffic_percent']:g}%",
        "replicas": f"{r['previous_replicas']} -> {r['candidate_replicas']}",
    }


@click.group()
def environments() -> None:
    """List environments, show one, set its promotion settings."""


@environments.command("list")
@click.argument("model")
@output_option
def environments_list(model: str, output: str) -> None:
    with client() as c:
        rows = c.environments(model)
    print_rows([_env_row(e) for e in rows], _ENV_COLUMNS, output)


@environments.command("describe")
@click.argument("model")
@click.argument("environment")
@output_option
def environments_describe(model: str, environment: str, output: str) -> None:
    """An environment, its promotion settings and its last rollout."""
    with client() as c:
        env = c.environment(model, environment)
    if output == "json":
        click.echo(json.dumps(env, indent=2, default=str))
        return
    print_rows([_env_row(env)], _ENV_COLUMNS, output)
    click.echo("promotion_settings: " + json.dumps(env.get("promotion_settings"), sort_keys=True))
    if env.get("rollout"):
        print_rows([_rollout_row(env["rollout"])], _ROLLOUT_COLUMNS, output, title="last rollout")


@environments.command("update")
@click.argument("model")
@click.argument("environment")
@click.option("--rolling/--no-rolling", default=None, help="Promote in steps (rolling_deploy).")
@click.option("--max-surge-percent", type=int, help="Candidate replicas each step may add.")
@click.option(
    "--max-unavailable-percent", type=int, help="Previous replicas each step may stop first."
)
@click.option("--stabilization-time-seconds", type=float, help="Wait after each step's replicas.")
@click.option("--replica-overhead-percent", type=int)
@click.option("--ready-timeout-seconds", type=float, help="Fail a step not ready by then.")
@click.option(
    "--canary/--no-canary",
    default=None,
    help="Move traffic in 10 stages (ramp_up_while_promoting).",
)
@click.option("--ramp-up-duration-seconds", type=float, help="The canary's whole window.")
@output_option
def environments_update(
    model: str,
    environment: str,
    rolling: bool | None,
    max_surge_percent: int | None,
    max_unavailable_percent: int | None,
    stabilization_time_seconds: float | None,
    replica_overhead_percent: int | None,
    ready_timeout_seconds: float | None,
    canary: bool | None,
    ramp_up_duration_seconds: float | None,
    output: str,
) -> None:
    """Change an environment's promotion settings; options not given keep their value
    (giving one of --max-surge-percent and --max-unavailable-percent drops the other)."""
    # The server lays the change over what is stored (null: keep), so only what was given
    # is sent; 0 is Baseten's "not this mode" for the rolling mode not chosen.
    config: dict[str, Any] = {
        "max_surge_percent": max_surge_percent,
        "max_unavailable_percent": max_unavailable_percent,
        "stabilization_time_seconds": stabilization_time_seconds,
        "replica_overhead_percent": replica_overhead_percent,
    }
    if max_surge_percent is not None and max_unavailable_percent is None:
        config["max_unavailable_percent"] = 0
    if max_unavailable_percent is not None and max_surge_percent is None:
        config["max_surge_percent"] = 0
    settings = {
        "rolling_deploy": rolling,
        "rolling_deploy_config": config,
        "ready_timeout_seconds": ready_timeout_seconds,
        "ramp_up_while_promoting": canary,
        "ramp_up_duration_seconds": ramp_up_duration_seconds,
    }
    with client() as c:
        env = c.update_environment(model, environment, settings)
    print_rows([_env_row(env)], _ENV_COLUMNS, output)


@click.group()
def rollouts() -> None:
    """Follow and steer a promotion into an environment that serves traffic."""


def _rollout_command(name: str, action: str | None, help_text: str) -> None:
    @rollouts.command(name, help=help_text)
    @click.argument("model")
    @click.option("--environment", "-e", default="production", show_default=True)
    @output_option
    def cmd(model: str, environment: str, output: str) -> None:
        with client() as c:
            if action is None:
                row = c.promotion(model, environment)
            else:
                row = c.promotion_action(model, environment, action)
        print_rows([_rollout_row(row)], _ROLLOUT_COLUMNS, output)


_rollout_command("status", None, "Where the environment's last rollout stands.")
_rollout_command("pause", "pause", "Pause the rollout after its current step.")
_rollout_command("resume", "resume", "Resume a paused rollout.")
_rollout_command(
    "cancel", "cancel", "Return all replicas, then all traffic, to the previous deployment."
)
_rollout_command(
    "force-complete", "force_complete", "Move all traffic to the candidate once it is ready."
)
