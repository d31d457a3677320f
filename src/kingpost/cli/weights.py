"""`kingpost migrate` (model_cache -> weights), `kingpost weights` (the mirror's store) and
`kingpost venvs` (the deployments' Python environments): what sits on this machine's disk."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import click
from rich.syntax import Syntax

from kingpost.cli._common import (
    client,
    console,
    err_console,
    output_option,
    print_rows,
    print_warning,
    settings,
)
from kingpost.errors import NotFoundError
from kingpost.weights.migrate import plan_migration

__all__ = ["gc", "migrate", "venvs", "weights"]


@click.command()
@click.argument(
    "project_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default="."
)
@click.option("--yes", "-y", is_flag=True, help="Apply without asking.")
def migrate(project_dir: Path, yes: bool) -> None:
    """Convert model_cache in config.yaml to weights (a backup is kept)."""
    plan = plan_migration(project_dir)
    for warning in plan.warnings:
        print_warning(warning)
    if not plan.changed:
        console.print("nothing to migrate: no model_cache in config.yaml")
        return
    console.print(Syntax(plan.diff(), "diff", theme="ansi_dark"))
    if not yes and not click.confirm("Apply these changes?", default=False):
        raise click.exceptions.Abort()
    config = project_dir / "config.yaml"
    backup = config.with_name(f"config.yaml.bak-{time.strftime('%Y%m%d%H%M%S')}")
    shutil.copy2(config, backup)
    config.write_text(plan.migrated)
    console.print(f"migrated {config}; the original is in {backup.name}", markup=False)


@click.group()
def weights() -> None:
    """The weights mirror: manifests, per-deployment status, garbage collection."""


@weights.command("list")
@output_option
def weights_list(output: str) -> None:
    """List mirrored manifests (source, files, bytes)."""
    with client() as c:
        rows = c.weights()
    print_rows(rows, ["id", "source", "files", "bytes"], output)


@weights.command("status")
@click.option("--deployment", "-d", required=True, help="Deployment id.")
@output_option
def weights_status(deployment: str, output: str) -> None:
    """Mirror progress of a deployment."""
    with client() as c:
        row = c.weights_status(deployment)
    print_rows([row], list(row), output)


@weights.command("gc")
@click.option("--budget-bytes", type=int, help="Keep unused blobs while the store fits in this.")
def weights_gc(budget_bytes: int | None) -> None:
    """Remove blobs no manifest references."""
    with client() as c:
        report = c.weights_gc(budget_bytes)
    console.print(
        f"removed {report['removed_blobs']} blobs ({report['removed_bytes']} bytes); "
        f"kept {report['kept_bytes']} bytes"
    )


@click.group()
def venvs() -> None:
    """The deployments' Python environments (one per set of requirements, shared)."""


@venvs.command("list")
@output_option
def venvs_list(output: str) -> None:
    """List environments: size, last use, the deployments that use them."""
    with client() as c:
        rows = c.venvs()
    columns = [
        "hash", "python", "requirements", "packages", "size_bytes", "last_used", "deployments"
    ]  # fmt: skip
    if output == "table":  # lists as counts and ids; JSON keeps them whole
        rows = [
            {**r, "requirements": len(r["requirements"]), "packages": len(r["packages"])}
            for r in rows
        ]
    print_rows(rows, columns, output)


@venvs.command("show")
@click.argument("env_hash", metavar="HASH")
@output_option
def venvs_show(env_hash: str, output: str) -> None:
    """The packages an environment was built with, as `name==version` lines."""
    with client() as c:
        rows = c.venvs()
    found = [r for r in rows if r["hash"].startswith(env_hash)] if env_hash else []
    if len(found) != 1:
        what = "no environment" if not found else f"{len(found)} environments"
        raise NotFoundError(
            f"{what} with a hash starting {env_hash!r}; `kingpost venvs list` shows them"
        )
    (row,) = found
    if output == "json":
        click.echo(json.dumps(row, indent=2))
        return
    if not row["packages"]:
        console.print(f"{row['hash']}: built before Kingpost recorded versions; no list")
        return
    for line in row["packages"]:
        click.echo(line)


@venvs.command("gc")
def venvs_gc() -> None:
    """Remove the environments no deployment uses (deleted ones' and stale builds)."""
    with client() as c:
        report = c.venvs_gc()
    console.print(
        f"removed {len(report['removed'])} environments ({report['removed_bytes']} bytes); "
        f"kept {report['kept']}"
    )


@venvs.command("base")
@click.option(
    "--truss-version",
    default=None,
    help="The Truss version whose server packages to build (default: KINGPOST_TRUSS_VERSION, "
    "else the newest Kingpost knows).",
)
@click.option(
    "--python",
    "python_version",
    default=None,
    help="Build it for this Python (e.g. 3.12, found on this machine); default: Kingpost's.",
)
def venvs_base(truss_version: str | None, python_version: str | None) -> None:
    """Build the shared base environment of Truss's server packages now (once per machine
    and Python), so that the first model-class push does not wait for it; print its path.
    Runs here, without a server; uses KINGPOST_BASE_ENVS_DIR (default {home}/envs/_base)."""
    from kingpost.envs import ModelEnvPolicy
    from kingpost.envs.base import ensure_base
    from kingpost.envs.baseset import base_set_for
    from kingpost.envs.interpreters import find_interpreter

    current = settings()

    def show(line: str) -> None:
        err_console.print(line, markup=False, highlight=False)

    base_set = base_set_for(truss_version, current.truss_version, show, "--truss-version")
    interpreter = find_interpreter(python_version, show)
    base_dir = ModelEnvPolicy(base_dir=current.base_envs_dir).base_dir_for(current.envs_dir)
    built = ensure_base(base_set, interpreter, base_dir, show)
    console.print(str(built.path), markup=False, highlight=False)


@click.command()
@output_option
def gc(output: str) -> None:
    """Remove what no deployment uses: uploaded projects, old replica directories,
    Python environments and unreferenced weight blobs."""
    with client() as c:
        report = c.gc()
    if output == "json":
        click.echo(json.dumps(report, indent=2))
        return
    disk, envs, blobs = report["projects_and_replicas"], report["venvs"], report["weights"]
    console.print(
        f"projects and replica dirs: removed {len(disk['removed'])} "
        f"({disk['removed_bytes']} bytes), kept {disk['kept']}"
    )
    console.print(
        f"environments: removed {len(envs['removed'])} ({envs['removed_bytes']} bytes), "
        f"kept {envs['kept']}"
    )
    console.print(
        f"weights: removed {blobs['removed_blobs']} blobs ({blobs['removed_bytes']} bytes), "
        f"kept {blobs['kept_bytes']} bytes"
    )
    images = report.get("images", {})
    if images.get("skipped"):
        print_warning(f"images not collected: {images['skipped']}")
    else:
        console.print(
            f"docker images: removed {len(images.get('removed', []))} "
            f"({images.get('removed_bytes', 0)} bytes)"
        )
    for error in disk["errors"]:
        print_warning(f"not removed: {error}")
