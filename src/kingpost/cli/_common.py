"""Shared CLI plumbing: settings, the client, output in tables or JSON."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import click
from rich.cells import cell_len
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.progress import Progress as RichProgress
from rich.table import Table
from rich.text import Text

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
    "upload_progress",
]

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)
"""Nothing is wrapped by rich, on stdout or stderr: piped into a log or a script, a
wrapped line had breaks in the middle of a phrase, a name or a path (rich assumes 80
columns when not on a terminal); a terminal wraps long lines itself. Tables are laid out
by ``print_rows``, which knows the terminal's width."""

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


@contextmanager
def upload_progress() -> Iterator[Callable[[int, int], None] | None]:
    """A progress bar on stderr for an upload, when stderr is a terminal; else nothing."""
    if not err_console.is_terminal:
        yield None
        return
    columns = (
        TextColumn("uploading"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        TimeRemainingColumn(),
    )  # fmt: skip
    with RichProgress(*columns, console=err_console, transient=True) as bar:
        task = bar.add_task("upload", total=None)

        def update(sent: int, total: int) -> None:
            bar.update(task, completed=sent, total=total)

        yield update


def client() -> KingpostClient:
    return KingpostClient.from_settings(settings())


WRAPPED = frozenset({"message", "labels", "environments", "source"})
"""Free-text columns that may wrap in a terminal; every other cell (ids, names, statuses,
times) is shown whole, so that it can be copied."""


def print_rows(
    rows: Sequence[dict[str, Any]], columns: Sequence[str], output: str, title: str = ""
) -> None:
    """Rows as JSON or as a table. In a terminal wide enough, a boxed table whose ids,
    names and times are whole; otherwise (piped, or too narrow) plain aligned lines, one
    row per line with nothing cut short, for grep and awk, as kubectl prints."""
    if output == "json":
        click.echo(json.dumps(list(rows), indent=2, default=str))
        return
    headers = [col.replace("_", " ").upper() for col in columns]
    cells = [[_cell(row.get(col)) for col in columns] for row in rows]
    # In terminal cells, not characters: a CJK character takes two.
    widths = [max([cell_len(h), *(cell_len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    # Each column takes 3 more for its padding and border; a wrapped one gets at least 16.
    needed = 1 + sum(
        3 + (min(w, 16) if c in WRAPPED else w) for c, w in zip(columns, widths, strict=True)
    )
    if not console.is_terminal or needed > console.width:
        console.out(_plain(headers, cells, title), highlight=False, end="")  # no wrapping
        return
    table = Table(title=Text(title) if title else None)
    for col, header, width in zip(columns, headers, widths, strict=True):
        if col in WRAPPED:
            table.add_column(header, min_width=min(width, 16))
        else:
            table.add_column(header, no_wrap=True, min_width=width)
    for row_cells in cells:
        # Text, not strings: neither markup (`[/x]`) nor emoji codes (`:x:`) are read in them.
        table.add_row(*[Text(c) for c in row_cells])
    console.print(table)


def _plain(headers: list[str], cells: list[list[str]], title: str) -> str:
    lines = [[" ".join(c.split()) for c in row] for row in [headers, *cells]]
    widths = [max(cell_len(row[i]) for row in lines) for i in range(len(headers))]
    out = [title] if title else []
    out += [
        "   ".join(c + " " * (w - cell_len(c)) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in lines
    ]
    return "\n".join(out) + "\n"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value) or "-"
    if isinstance(value, dict):
        return json.dumps(value) if value else "-"
    return str(value)
