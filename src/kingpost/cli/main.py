"""The `kingpost` command. Thin: commands call the typed client; errors map to exit codes."""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path

import click
from rich.markup import escape

from kingpost.cli._common import err_console, settings
from kingpost.cli.api_keys import api_keys
from kingpost.cli.autoscaling import autoscaling
from kingpost.cli.engines import engines
from kingpost.cli.gpus import gpus
from kingpost.cli.image import image
from kingpost.cli.logs import logs
from kingpost.cli.manage import deployments, models, predict, push
from kingpost.cli.metrics import metrics
from kingpost.cli.rollouts import environments, rollouts
from kingpost.cli.secrets import secrets
from kingpost.cli.watch import watch
from kingpost.cli.webhooks import webhooks
from kingpost.cli.weights import gc, migrate, venvs, weights
from kingpost.engines.registry import engine_names
from kingpost.errors import KingpostError

__all__ = ["cli", "main"]


@click.group()
@click.version_option(package_name="kingpost")
def cli() -> None:
    """Kingpost: deploy Truss projects on your own machines."""


@cli.command()
@click.option("--engine", type=click.Choice(engine_names()), help="Default engine.")
@click.option(
    "--push",
    "push_dirs",
    multiple=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Push these projects once the server is up (e.g. examples/echo-server).",
)
@click.option("--log-level", default="info", show_default=True)
@click.option(
    "--stop-replicas-on-exit",
    is_flag=True,
    help="Stop docker replicas too when the server stops (by default the next server adopts "
    "them without a restart).",
)
def server(
    engine: str | None, push_dirs: tuple[Path, ...], log_level: str, stop_replicas_on_exit: bool
) -> None:
    """Run the API, the controller and the gateway (embedded SQLite under KINGPOST_HOME)."""
    from kingpost.serve import run_server

    configure_server_logging(log_level)
    s = settings()
    if engine is not None:
        s = s.model_copy(update={"engine": engine})
    if stop_replicas_on_exit:
        s = s.model_copy(update={"stop_replicas_on_exit": True})
    run_server(s, push_dirs)


def configure_server_logging(level: str) -> None:
    """Log lines for people: the HTTP client's line per request only at debug level.

    The controller pushes the routing table to the gateway on every pass, so httpx's INFO
    line per request would fill the server's log with one line every few seconds.
    """
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("httpx").setLevel(logging.WARNING)


@cli.command()
@click.argument("name")
@click.option("--dir", "target", type=click.Path(path_type=Path), help="Where (default ./NAME).")
def init(name: str, target: Path | None) -> None:
    """Create a working model-class Truss project.

    NAME may be a path (``kingpost init models/my-model``, as ``truss init`` takes a
    directory): the project goes there and the model is named after its last part."""
    from kingpost.server.scaffold import scaffold_project

    dest = target or Path(name)
    scaffold_project(dest, name if target is not None else Path(name).name)
    # Quoted for the shell: the command is there to be copied, and a name may hold spaces.
    click.echo(f"created {dest}; deploy it with `kingpost push {shlex.quote(str(dest))}`")


for command in (
    push,
    watch,
    models,
    deployments,
    environments,
    rollouts,
    logs,
    predict,
    secrets,
    api_keys,
    weights,
    venvs,
    gc,
    migrate,
    image,
    autoscaling,
    gpus,
    engines,
    metrics,
    webhooks,
):
    cli.add_command(command)


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KingpostError as exc:
        err_console.print(f"[red]error:[/] {escape(exc.message)}", highlight=False)
        sys.exit(exc.exit_code)
