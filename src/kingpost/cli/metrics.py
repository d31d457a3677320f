"""``kingpost metrics [MODEL]``: a live view of traffic per deployment, refreshing like
``top``, or one JSON snapshot (``-o json``) for scripts. Both read the control plane's
``/metrics`` twice, ``--interval`` apart, and show what happened in between."""

from __future__ import annotations

import json
import time

import click
from rich.live import Live
from rich.table import Table

from kingpost.cli._common import client, console, output_option
from kingpost.client.http import KingpostClient
from kingpost.errors import KingpostError
from kingpost.metrics.summary import Row, Samples, parse, summarize

__all__ = ["metrics"]


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def _scrape(c: KingpostClient) -> Samples:
    """The control plane's ``/metrics``, parsed. Text the parser refuses (a replica's
    series re-exposed by a control plane that did not escape them) is one line of error,
    naming where it came from, not a traceback."""
    text = c.metrics_text()
    try:
        return parse(text)
    except ValueError as exc:
        detail = str(exc) or "a malformed line"
        raise KingpostError(
            f"cannot parse the control plane's /metrics text at {c.api_url}: {detail}"
        ) from exc


def _pointed_at(c: KingpostClient, model: str | None, environment: str) -> set[tuple[str, str]]:
    """(model, deployment) names of what ``environment`` points at now, of ``model`` or of
    every model: from the API, since a series' ``environment`` label names only one of the
    environments that point at its deployment."""
    names = {m["id"]: m["name"] for m in c.models()}
    return {
        (names[d["model_id"]], d["name"])
        for d in c.deployments()  # one call: each lists the environments pointing at it
        if environment in d["environments"]
        and d["model_id"] in names
        and (model is None or names[d["model_id"]] == model)
    }


def _rows(
    c: KingpostClient,
    before: Samples,
    after: Samples,
    seconds: float,
    model: str | None,
    environment: str | None,
) -> list[Row]:
    pointed = _pointed_at(c, model, environment) if environment is not None else None
    return summarize(before, after, seconds, model, environment, pointed)


def _table(rows: list[Row], interval: float) -> Table:
    table = Table(title=f"kingpost metrics (last {interval:g} s; Ctrl-C to stop)")
    for header in (
        "MODEL", "DEPLOYMENT", "ENVIRONMENT", "REQ/S", "P50 MS", "P99 MS", "ERRORS",
        "REPLICAS", "IN FLIGHT", "QUEUED",
    ):  # fmt: skip
        table.add_column(header, no_wrap=True)
    for r in rows:
        table.add_row(
            r.model,
            r.deployment,
            r.environment or "-",
            f"{r.requests_per_s:.1f}",
            _ms(r.p50_s),
            _ms(r.p99_s),
            "-" if r.error_rate is None else f"{r.error_rate:.1%}",
            f"{r.replicas_ready}/{r.replicas}",
            str(r.in_flight),
            str(r.queued),
        )
    return table


@click.command()
@click.argument("model", required=False)
@click.option("--environment", help="Only deployments this environment points at.")
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1),
    default=2.0,
    show_default=True,
    help="Seconds between scrapes (the live view's refresh; the JSON snapshot's window).",
)
@output_option
def metrics(model: str | None, environment: str | None, interval: float, output: str) -> None:
    """Requests/s, p50/p99 latency, error rate, replicas and queue per deployment."""
    with client() as c:
        before, at = _scrape(c), time.monotonic()
        if output == "json":
            time.sleep(interval)
            after, now = _scrape(c), time.monotonic()
            rows = _rows(c, before, after, now - at, model, environment)
            click.echo(json.dumps([r.to_json() for r in rows], indent=2))
            return
        try:
            with Live(console=console, auto_refresh=False) as live:
                while True:
                    time.sleep(interval)
                    after, now = _scrape(c), time.monotonic()
                    rows = _rows(c, before, after, now - at, model, environment)
                    live.update(_table(rows, interval), refresh=True)
                    before, at = after, now
        except KeyboardInterrupt:
            pass
