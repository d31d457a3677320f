"""``kingpost logs``: a deployment's output as before, or queries of the log store."""

from __future__ import annotations

import json
import time
from typing import Any

import click

from kingpost.cli._common import client, output_option
from kingpost.client import KingpostClient

__all__ = ["logs"]

_FOLLOW_S = 1.0
_PAGE = 1000
"""Lines per request while following."""
_LEVEL_CHOICE = click.Choice(
    ["debug", "info", "warning", "error", "critical"], case_sensitive=False
)


def _stamp(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"


def _line(rec: dict[str, Any]) -> str:
    where = rec.get("replica") or rec.get("deployment_id") or "-"
    rid = f" rid={rec['request_id']}" if rec.get("request_id") else ""
    extra = ""
    if rec.get("source") == "gateway" and rec.get("duration_ms") is not None:
        extra = f" {rec['duration_ms']}ms in={rec.get('bytes_in', 0)} out={rec.get('bytes_out', 0)}"
    return (
        f"{_stamp(float(rec.get('ts', 0)))} {rec.get('level', 'INFO'):<8} "
        f"[{rec.get('source', '?')}/{where}]{rid} {rec.get('message', '')}{extra}"
    )


def _emit(records: list[dict[str, Any]], output: str, follow: bool) -> None:
    if output == "json" and not follow:
        click.echo(json.dumps(records, indent=2))
        return
    for rec in records:
        click.echo(json.dumps(rec) if output == "json" else _line(rec))


def _follow(c: KingpostClient, filters: dict[str, Any], output: str) -> None:
    """Print the newest lines, then every line as it is stored, until interrupted.

    Each poll reads every line since a few seconds before the newest seen (lines land a
    little out of order: a replica's line is read a moment after it is written), oldest
    first, a page at a time, each page after the last line of the one before; a line
    already printed is not printed again. Asking for only the newest N of them, as
    before, lost the rest whenever more than N arrived in a second."""
    seen: dict[str, float] = {}
    since = filters.pop("since", None)
    records = c.log_query(**filters, since=since)
    while True:
        fresh = [r for r in records if r.get("cursor") not in seen]
        _emit(fresh, output, True)
        for r in fresh:
            seen[str(r.get("cursor"))] = float(r.get("ts", 0))
        if seen:
            newest = max(seen.values())
            since = str(newest - 5)
            seen = {k: v for k, v in seen.items() if v >= newest - 10}
        time.sleep(_FOLLOW_S)
        records = _since(c, filters, since)


def _since(c: KingpostClient, filters: dict[str, Any], since: str | None) -> list[dict[str, Any]]:
    """Every line from ``since`` on, oldest first, in pages of :data:`_PAGE`."""
    page_filters = {**filters, "limit": _PAGE, "order": "oldest"}
    out: list[dict[str, Any]] = []
    got: set[str] = set()
    after = None
    while True:
        page = c.log_query(**page_filters, since=since, after=after)
        cursors = {str(r.get("cursor")) for r in page}
        # A full page has more behind it, unless it brought nothing new: a server that
        # does not page (it ignores ``after``) answers the same lines again.
        if cursors <= got:
            return out
        out += page
        got |= cursors
        if len(page) < _PAGE:
            return out
        after = page[-1]["cursor"]


@click.command()
@click.option("--deployment", "-d", "deployment", help="Deployment id, or its name with --model.")
@click.option("--model", "-m", help="Model id or name.")
@click.option("--environment", "-e", help="Environment of --model (its current deployment).")
@click.option("--replica", help="One replica's id.")
@click.option("--since", help="From: a duration ago (10m, 2h, 1d), an ISO time or epoch seconds.")
@click.option("--until", help="To: as --since.")
@click.option("--level", type=_LEVEL_CHOICE, help="Least level shown.")
@click.option("--search", help="Text the line contains (any case).")
@click.option("--request-id", help="Every line of one request: gateway and replica, in order.")
@click.option(
    "--source", type=click.Choice(["gateway", "replica", "build"]), help="One kind of line."
)
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines.")
@click.option("--tail", type=int, default=200, show_default=True, help="The newest N lines.")
@output_option
def logs(
    deployment: str | None,
    model: str | None,
    environment: str | None,
    replica: str | None,
    since: str | None,
    until: str | None,
    level: str | None,
    search: str | None,
    request_id: str | None,
    source: str | None,
    follow: bool,
    tail: int,
    output: str,
) -> None:
    """Show build and replica output and the gateway's access lines.

    With --deployment (and --model, --tail) alone: that deployment's recent build and
    replica output, as the engine keeps it. With any other option: the log store, whose
    lines carry times, levels and request ids, and outlive restarts."""
    store_filters = (environment, replica, since, until, level, search, request_id, source)
    with client() as c:
        plain = not follow and output != "json" and all(f is None for f in store_filters)
        if deployment is not None and plain:
            dep_id = deployment if model is None else c.deployment(deployment, model)["id"]
            for line in c.logs(dep_id, tail):
                click.echo(f"[{line['replica']}] {line['text']}")
            return
        filters: dict[str, Any] = {
            "model": model,
            "environment": environment,
            "deployment": deployment,
            "replica": replica,
            "since": since,
            "until": until,
            "level": level,
            "search": search,
            "request_id": request_id,
            "source": source,
            "limit": tail,
        }
        if follow:
            try:
                _follow(c, filters, output)
            except KeyboardInterrupt:
                return
        _emit(c.log_query(**filters), output, False)
