"""`kingpost webhooks secret ...`: the secrets async inference signs webhooks with."""

from __future__ import annotations

import click

from kingpost.cli._common import client, console, output_option, print_rows

__all__ = ["webhooks"]


@click.group()
def webhooks() -> None:
    """Async inference webhooks."""


@webhooks.group()
def secret() -> None:
    """Signing secrets: every active one signs each delivery (X-BASETEN-SIGNATURE)."""


@secret.command("create")
def secret_create() -> None:
    """Create a secret and print its value, once (keep it with your receiver)."""
    with client() as c:
        made = c.create_webhook_secret()
    console.print(f"webhook secret [bold]{made['id']}[/] created; its value, shown once:")
    click.echo(made["secret"])


@secret.command("list")
@output_option
def secret_list(output: str) -> None:
    """List secret ids and creation times (never values)."""
    with client() as c:
        rows = c.webhook_secrets()
    print_rows(rows, ["id", "created_at"], output)


@secret.command("delete")
@click.argument("secret_id")
def secret_delete(secret_id: str) -> None:
    """Delete a secret: deliveries stop carrying its signature (rotate: create, then
    delete the old one once receivers have the new one)."""
    with client() as c:
        c.delete_webhook_secret(secret_id)
    console.print(f"webhook secret [bold]{secret_id}[/] deleted")
