"""Shared CLI plumbing: settings, the client, output in tables or JSON."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kingpost.client import KingpostClient
from kingpost.settings import Settings

__all__ = [
    "client",
    "console",
    "err_console",
    "output_option",
    "print_rows",
    "print_warning",
    "settings",
]

console = Console()
err_console = Console(stderr=True)

output_option = click.option(
    "--output",
    "-o",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    help="Readable table or JSON.",
)


def print_warning(text: str) -> None:
    """A warning on stderr, its text printed as it is (a config path may hold brackets)."""
    err_console.print(f"[yellow]warning:[/] {escape(text)}", highlight=False)


def settings() -> Settings:
    return Settings()


def client() -> KingpostClient:
    return KingpostClient.from_settings(settings())


def print_rows(
    rows: Sequence[dict[str, Any]], columns: Sequence[str], output: str, title: str = ""
) -> None:
    if output == "json":
        click.echo(json.dumps(list(rows), indent=2, default=str))
        return
    table = Table(title=title or None)
    for col in columns:
        table.add_column(col.replace("_", " ").upper())
    for row in rows:
        table.add_row(*[escape(_cell(row.get(c))) for c in columns])
    console.print(table)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value) or "-"
    if isinstance(value, dict):
        return json.dumps(value) if value else "-"
    return str(value)
