"""`kingpost secrets`: values come from stdin or a prompt, never the command line."""

from __future__ import annotations

import sys

import click

from kingpost.cli._common import client, console, output_option, print_rows
from kingpost.errors import ValidationError

__all__ = ["secrets"]


@click.group()
def secrets() -> None:
    """Secrets, stored encrypted and mounted read-only into replicas."""


@secrets.command("set")
@click.argument("name")
def secrets_set(name: str) -> None:
    """Set NAME; the value is read from stdin (piped) or a hidden prompt."""
    if sys.stdin.isatty():
        value = click.prompt(f"value of {name}", hide_input=True, confirmation_prompt=True)
    else:
        value = sys.stdin.read()
        if value.endswith("\n"):
            value = value[:-1]
    if not value:
        raise ValidationError(f"secret {name!r}: empty value; pipe the value on stdin")
    with client() as c:
        c.set_secret(name, value)
    console.print(f"secret [bold]{name}[/] set")


@secrets.command("list")
@output_option
def secrets_list(output: str) -> None:
    """List secret names and update times (never values)."""
    with client() as c:
        rows = c.secrets()
    print_rows(rows, ["name", "created_at", "updated_at"], output)


@secrets.command("delete")
@click.argument("name")
def secrets_delete(name: str) -> None:
    """Delete a secret."""
    with client() as c:
        c.delete_secret(name)
    console.print(f"secret [bold]{name}[/] deleted")
