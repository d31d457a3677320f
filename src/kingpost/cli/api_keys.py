"""`kingpost api-keys`: admin keys, and invoke-only keys limited to named models."""

from __future__ import annotations

import click

from kingpost.cli._common import client, console, err_console, output_option, print_rows

__all__ = ["api_keys"]


@click.group("api-keys")
def api_keys() -> None:
    """API keys: admin (everything) or invoke-only (call the named models)."""


@api_keys.command("create")
@click.argument("name")
@click.option(
    "--model",
    "models",
    multiple=True,
    help="Make an invoke-only key that may call this model (id or name); repeat for more.",
)
def api_keys_create(name: str, models: tuple[str, ...]) -> None:
    """Create a key and print it, once: it is stored only as a hash.

    The key alone goes to stdout (`KEY=$(kingpost api-keys create ci --model m)`); what
    it may do goes to stderr."""
    with client() as c:
        created = c.create_api_key(name, invoke_models=list(models) if models else None)
    if models:
        scope = f"invoke-only, for model(s) {', '.join(created['model_ids'])}"
    else:
        scope = "admin: every model and the management API"
    err_console.print(
        f"created API key [bold]{created['prefix']}[/] ({scope}); "
        "it is shown this once, so keep it now:",
        highlight=False,
    )
    console.out(created["api_key"], highlight=False)


@api_keys.command("list")
@output_option
def api_keys_list(output: str) -> None:
    """List keys by prefix, name and scope (never the keys themselves)."""
    with client() as c:
        rows = c.api_keys()
    print_rows(rows, ["prefix", "name", "type", "model_ids", "created_at"], output)


@api_keys.command("revoke")
@click.argument("prefix")
def api_keys_revoke(prefix: str) -> None:
    """Revoke the key PREFIX names (as `list` shows it); the gateway refuses it at once."""
    with client() as c:
        c.revoke_api_key(prefix)
    console.print(f"API key [bold]{prefix}[/] revoked", highlight=False)
