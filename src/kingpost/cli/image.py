"""`kingpost image`: build a project's container image without deploying it."""

from __future__ import annotations

from pathlib import Path

import click

from kingpost.cli._common import console, err_console, print_warning

__all__ = ["image"]


@click.group()
def image() -> None:
    """Container images for the docker engine (built locally, no registry needed)."""


@image.command("build")
@click.argument(
    "project_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default="."
)
@click.option("--quiet", "-q", is_flag=True, help="Print only the image tag.")
def image_build(project_dir: Path, quiet: bool) -> None:
    """Build the image of the Truss project in PROJECT_DIR; print its tag."""
    from kingpost.config import load_config
    from kingpost.images import build_image

    loaded = load_config(project_dir)  # a bad config fails before any build step
    for warning in loaded.warnings:
        print_warning(warning)

    def show(line: str) -> None:
        if not quiet:
            err_console.print(line, markup=False, highlight=False)

    tag = build_image(loaded.config, project_dir, show)
    console.print(tag, markup=False, highlight=False)


@image.command("base")
def image_base() -> None:
    """Build the Kingpost Python base image (debootstrap; once per machine)."""
    from kingpost.images import ensure_base_image

    def show(line: str) -> None:
        err_console.print(line, markup=False, highlight=False)

    console.print(ensure_base_image(log=show), markup=False, highlight=False)
