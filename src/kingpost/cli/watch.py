"""`kingpost watch`: follow a project folder and apply each change to the model's
development deployment (live reload; see ``kingpost.controller.devloop``).

Watching polls the files a push would upload (``.truss_ignore``/``.gitignore`` honored)
for their size and modification time: no dependency, and the same on every OS."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.markup import escape

from kingpost.cli._common import client, console, err_console, print_warning
from kingpost.client import KingpostClient
from kingpost.errors import KingpostError
from kingpost.packaging import project_files

__all__ = ["snapshot", "watch", "watch_loop"]

POLL_S = 0.2
SETTLE_S = 0.05
"""After a change is seen, how long the files must stay unchanged before they are sent (an
editor that writes a file in several steps)."""


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Each project file's (modification time in ns, size)."""
    out: dict[str, tuple[int, int]] = {}
    for rel in project_files(root):
        try:
            st = (root / rel).stat()
        except OSError:  # removed while listed
            continue
        out[rel.as_posix()] = (st.st_mtime_ns, st.st_size)
    return out


def model_name_of(project_dir: Path) -> str:
    from kingpost.config import load_config

    name = load_config(project_dir).config.model_name
    return name or project_dir.resolve().name


def apply_once(c: KingpostClient, project_dir: Path, model: str) -> dict[str, Any] | None:
    """Check the config here (its errors name file and line), upload, apply; print what
    happened. ``None`` when the config is invalid: the deployment serves on unchanged."""
    from kingpost.config import load_config

    try:
        loaded = load_config(project_dir)
    except KingpostError as exc:
        err_console.print(
            f"[red]invalid config, not applied[/] (the development deployment keeps serving "
            f"the last good version):\n{escape(exc.message)}",
            highlight=False,
        )
        return None
    for warning in loaded.warnings:
        print_warning(warning)
    try:
        sha = c.upload(project_dir)
        result = c.development_sync(model, sha)
    except KingpostError as exc:
        err_console.print(f"[red]not applied:[/] {escape(exc.message)}", highlight=False)
        return None
    except OSError as exc:
        # A file the editor is still juggling (unreadable, replaced while read): the next
        # change is tried again, so watching goes on.
        err_console.print(f"[red]not applied:[/] {escape(str(exc))}", highlight=False)
        return None
    report(result)
    return result


def report(result: dict[str, Any]) -> None:
    kind, took = result["kind"], result["took_s"]
    files = [*result["changed"], *(f"-{r}" for r in result["removed"])]
    what = ", ".join(files[:8]) + (f" and {len(files) - 8} more" if len(files) > 8 else "")
    if kind == "unchanged":
        return
    if result["ok"]:
        how = {"reload": "reloaded in place", "recorded": f"recorded ({result['why']})"}.get(
            kind, f"swapped ({result['why']})"
        )
        console.print(f"{how} in {took:.2f} s: {escape(what)}", highlight=False)
        return
    how = "reload" if kind == "reload" else f"swap ({result['why']})"
    err_console.print(
        f"[red]{how} failed after {took:.2f} s[/] ({escape(what)}); the development "
        f"deployment serves the previous version:\n{escape(result['error'])}",
        highlight=False,
    )
    if result["traceback"]:
        err_console.print(escape(result["traceback"].rstrip()), highlight=False)


def watch_loop(
    project_dir: Path,
    on_change: Callable[[], object],
    *,
    stop: Callable[[], bool] = lambda: False,
    poll_s: float = POLL_S,
    seen: dict[str, tuple[int, int]] | None = None,
) -> None:
    """Call ``on_change`` each time the project's files change from ``seen`` (default:
    as they are now), until ``stop()``."""
    if seen is None:
        seen = snapshot(project_dir)
    while not stop():
        time.sleep(poll_s)
        now = snapshot(project_dir)
        if now == seen:
            continue
        while True:  # let a burst of writes finish
            time.sleep(SETTLE_S)
            settled = snapshot(project_dir)
            if settled == now:
                break
            now = settled
        seen = now
        on_change()


def follow(c: KingpostClient, project_dir: Path, model: str) -> None:
    console.print(
        f"watching {escape(str(project_dir))} for model {escape(model)}'s development "
        "deployment (Ctrl-C to stop)",
        highlight=False,
    )
    # What changed while nothing watched (between a push and now, or since the last
    # watch) is applied first; a change made meanwhile is seen after it.
    seen = snapshot(project_dir)
    try:
        apply_once(c, project_dir, model)
        watch_loop(project_dir, lambda: apply_once(c, project_dir, model), seen=seen)
    except KeyboardInterrupt:
        console.print("stopped watching; the development deployment keeps running")


@click.command()
@click.argument(
    "project_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default="."
)
@click.option("--model-name", help="Model (default: config.yaml model_name, else the folder name).")
def watch(project_dir: Path, model_name: str | None) -> None:
    """Apply each change of a project folder to its model's development deployment."""
    model = model_name or model_name_of(project_dir)
    with client() as c:
        deps = [d for d in c.deployments(model) if d.get("is_development")]
        if not deps:
            raise KingpostError(
                f"model {model!r} has no development deployment; create it with "
                f"`kingpost push --watch {project_dir}`"
            )
        follow(c, project_dir, model)
