"""Commands that manage models, deployments, environments and logs."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click
from rich.cells import cell_len
from rich.markup import escape
from rich.progress import (
    DownloadColumn,
    Progress,
    SpinnerColumn,
    Task,
    TextColumn,
    TransferSpeedColumn,
)
from rich.text import Text

from kingpost.cli._common import (
    client,
    console,
    err_console,
    output_option,
    print_rows,
    print_warning,
    upload_progress,
)
from kingpost.client import KingpostClient
from kingpost.engines.registry import engine_names
from kingpost.errors import KingpostError, ValidationError

__all__ = ["deployments", "models", "predict", "push"]

_DEPLOYMENT_COLUMNS = [
    "id", "name", "model", "status", "replicas", "environments", "labels", "created_at",
]  # fmt: skip
_REASON_CELLS = 160
"""A table shows a one-line reason; the whole message is in JSON output and in `logs`."""
_DESCRIBE_COLUMNS = [
    "id", "name", "model_id", "status", "replicas", "scaling_reason", "environments",
    "autoscaling_settings_from", "autoscaling_settings", "gpus", "message",
]  # fmt: skip
_ACTION_COLUMNS = ["id", "name", "model_id", "desired_state", "status", "environments"]
"""After an action: what was asked next to where the deployment is now, since the
controller acts on it after the command returns (right after `deactivate`, status is still
ACTIVE and desired state INACTIVE)."""
_SETTLED = {"ACTIVE", "FAILED", "BUILD_FAILED", "INACTIVE", "SCALED_TO_ZERO"}


def _labels(value: str | None) -> dict[str, Any] | None:
    if value is None:
        return None
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise ValidationError(
            f"--labels: not valid JSON ({exc.msg}): {value!r}", field="labels"
        ) from exc
    if not isinstance(parsed, dict):
        raise ValidationError(
            f'--labels: must be a JSON object like \'{{"team": "ml"}}\', got {value!r}'
        )
    return parsed


@click.command()
@click.argument(
    "project_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default="."
)
@click.option(
    "--model-name", help="Model name (default: config.yaml model_name, else the folder name)."
)
@click.option("--deployment-name", help="Name instead of deployment-N.")
@click.option("--labels", help='JSON labels, e.g. \'{"team": "ml"}\'.')
@click.option("--promote", is_flag=True, help="Point production at the new deployment.")
@click.option("--environment", help="Point this environment at the new deployment.")
@click.option("--engine", type=click.Choice(engine_names()), help="Engine for this deployment.")
@click.option("--replicas", type=int, help="Replicas to run (min replicas).")
@click.option(
    "--wait/--no-wait", default=False, help="Wait until the deployment is ACTIVE or fails."
)
@click.option("--timeout", type=float, default=600.0, show_default=True)
@click.option(
    "--watch",
    "watch_dir",
    is_flag=True,
    help="Create (or replace) the model's development deployment, wait for it, then apply "
    "each change of the folder to it (live reload).",
)
@output_option
def push(
    project_dir: Path,
    model_name: str | None,
    deployment_name: str | None,
    labels: str | None,
    promote: bool,
    environment: str | None,
    engine: str | None,
    replicas: int | None,
    wait: bool,
    timeout: float,
    watch_dir: bool,
    output: str,
) -> None:
    """Validate, upload and deploy a Truss project."""
    from kingpost.config import load_config

    loaded = load_config(project_dir)  # refuse a bad config before uploading anything
    for warning in loaded.warnings:
        print_warning(warning)
    with client() as c:
        with upload_progress() as progress:
            result = c.push(
                project_dir,
                progress,
                model_name=model_name,
                deployment_name=deployment_name,
                labels=_labels(labels),
                promote=promote,
                environment=environment,
                engine=engine,
                min_replicas=replicas,
                development=watch_dir or None,
            )
        dep = result["deployment"]
        _engine_warnings(project_dir, loaded.warnings, dep["engine"])
        wait = wait or watch_dir
        if wait:
            dep = _wait(c, dep["id"], timeout)
    failed = dep["status"] in ("FAILED", "BUILD_FAILED")
    if output == "json":
        click.echo(json.dumps({**result, "deployment": dep}, indent=2, default=str))
    else:
        model = result["model"]
        console.print(
            f"model [bold]{model['name']}[/] ({model['id']}), deployment [bold]{dep['name']}[/] "
            f"({dep['id']}): {dep['status']}"
        )
        if not failed:
            # One line whatever the width: it is a command to copy, and a wrapped one breaks.
            console.print(
                f"predict: curl -X POST {result['predict_url']} "
                "-H \"Authorization: Api-Key $KINGPOST_API_KEY\" -d '{...}'",
                markup=False,
                highlight=False,
            )
    if failed and watch_dir:
        # Watching on: the next change (the fix) is applied with a new replica.
        err_console.print(
            f"[red]deployment {dep['name']} {dep['status']}:[/] {escape(dep['message'])}\n"
            f"the whole log: kingpost logs -d {dep['id']}",
            highlight=False,
        )
    elif failed:
        raise KingpostError(
            f"deployment {dep['name']} {dep['status']}: {dep['message']}\n"
            f"the whole log: kingpost logs -d {dep['id']}"
        )
    if wait and dep["status"] not in _SETTLED:
        raise KingpostError(
            f"deployment {dep['name']} is not ACTIVE after {timeout:g}s (still {dep['status']}); "
            f"follow it with `kingpost deployments list` or `kingpost logs -d {dep['id']}`"
        )
    _rollout_note(result["model"]["name"], dep, environment or ("production" if promote else None))
    if watch_dir:
        from kingpost.cli.watch import follow

        with client() as c:
            follow(c, project_dir, result["model"]["name"])


def _rollout_note(model: str, dep: dict[str, Any], environment: str | None) -> None:
    """A promotion into an environment that serves is a rollout: say how to follow it."""
    if environment is not None and environment not in dep.get("environments", ()):
        err_console.print(
            f"{environment} moves to {dep['name']} once it is ready; follow it with "
            f"`kingpost rollouts status {model} --environment {environment}`",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )


def _engine_warnings(project_dir: Path, shown: tuple[str, ...], engine: str) -> None:
    """What the engine the server chose cannot honour (the server's default engine is
    known only once it has answered)."""
    from kingpost.config import load_config

    for warning in load_config(project_dir, engine=engine).warnings:
        if warning not in shown:
            print_warning(warning)


class _BytesColumn(DownloadColumn):
    """Bytes done of bytes known, shown only while there are bytes to count (weights):
    other phases showed a meaningless `0/? bytes`."""

    def render(self, task: Task) -> Text:
        return super().render(task) if task.total is not None else Text("")


class _SpeedColumn(TransferSpeedColumn):
    def render(self, task: Task) -> Text:
        return super().render(task) if task.total is not None else Text("")


_PHASES = {
    "BUILDING": "building the environment",
    "DEPLOYING": "starting replicas, waiting for the first to pass its readiness probe",
    "UNHEALTHY": "no replica is ready; restarting",
}


def _wait(c: Any, dep_id: str, timeout: float) -> dict[str, Any]:
    """Poll until the deployment settles, showing its phase (bytes while weights mirror)."""
    deadline = time.monotonic() + timeout
    columns = (SpinnerColumn(), TextColumn("{task.description}"), _BytesColumn(), _SpeedColumn())
    with Progress(*columns, console=err_console, transient=True) as progress:
        task = progress.add_task("deploying", total=None)
        while True:
            dep: dict[str, Any] = c.deployment(dep_id)
            if dep["status"] == "WAITING_FOR_WEIGHTS":
                w = c.weights_status(dep_id)
                progress.update(
                    task,
                    description=f"mirroring weights ({w['files_done']}/{w['files_total']} files)",
                    total=w["bytes_total"] or None,
                    completed=w["bytes_done"],
                )
            else:
                phase = _PHASES.get(dep["status"], dep["status"])
                if dep["status"] == "DEPLOYING" and dep.get("replicas_wanted"):
                    phase = (
                        f"starting replicas ({dep.get('replicas_ready') or 0}/"
                        f"{dep['replicas_wanted']} ready), waiting for readiness probes"
                    )
                detail = f": {_reason(dep)}" if dep["message"] else ""
                progress.update(task, description=escape(f"{phase}{detail}"), total=None)
            if dep["status"] in _SETTLED or time.monotonic() > deadline:
                return dep
            time.sleep(0.5)


@click.group()
def models() -> None:
    """Models."""


@models.command("list")
@output_option
def models_list(output: str) -> None:
    """List models."""
    with client() as c:
        rows = c.models()
    print_rows(
        rows, ["id", "name", "deployment_count", "production_deployment_id", "created_at"], output
    )


@models.command("delete")
@click.argument("model")
@click.option("--yes", "-y", is_flag=True, help="Do not ask.")
def models_delete(model: str, yes: bool) -> None:
    """Delete a model with all its deployments and environments (stops their replicas)."""
    with client() as c:
        info = c.model(model)
        what = (
            f"model {info['name']} ({info['id']}) and its {info['deployment_count']} deployment(s)"
        )
        if not yes and not click.confirm(f"Delete {what}?", default=False):
            raise click.exceptions.Abort()
        c.delete_model(info["id"])
    console.print(f"deleted {what}", markup=False)


@click.group()
def deployments() -> None:
    """Deployments: list, describe, replicas, update, activate, deactivate, delete, promote."""


@deployments.command("list")
@click.option("--model", help="Only this model (id or name).")
@output_option
def deployments_list(model: str | None, output: str) -> None:
    """List deployments."""
    with client() as c:
        rows = c.deployments(model)
        if output == "json":  # what the API answers, whole, for scripts
            print_rows(rows, [], output)
            return
        names = {m["id"]: m["name"] for m in c.models()}
    shown = [
        {
            **_with_replicas(row),
            "model": names.get(row["model_id"], row["model_id"]),
            "message": _reason(row),
        }
        for row in rows
    ]
    # The message last: it can be long, and piped output keeps each row on one line.
    print_rows(shown, [*_DEPLOYMENT_COLUMNS, "message"], output)


def _reason(row: dict[str, Any]) -> str:
    """A deployment's message as one line for a table. A failure's message quotes the
    build's or the replica's last output (kilobytes, often JSON log records): the table
    shows its first line and the last line of that output (where the exception usually
    is), and points at `kingpost logs` for the rest."""
    lines = [line.strip() for line in str(row.get("message") or "").splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        return ""
    parts = [lines[0]] if len(lines) == 1 else [lines[0], _log_text(lines[-1])]
    text = " ".join(" ".join(parts).split())
    if len(lines) <= 2 and cell_len(text) <= _REASON_CELLS:
        return text
    if cell_len(text) > _REASON_CELLS:
        text = text[: _REASON_CELLS - 1] + "…"
    return f"{text} (more: kingpost logs -d {row['id']})"


def _log_text(line: str) -> str:
    """The message of a JSON log record (the model server's format), else the line."""
    if line.startswith("{"):
        try:
            record = json.loads(line)
        except ValueError:
            return line
        if isinstance(record, dict) and isinstance(record.get("message"), str):
            return str(record["message"])
    return line


def _with_replicas(row: dict[str, Any]) -> dict[str, Any]:
    """``replicas`` as wanted/starting/ready (blank before the autoscaler saw it)."""
    if row.get("replicas_wanted") is None:
        return {**row, "replicas": ""}
    counts = (row["replicas_wanted"], row["replicas_starting"], row["replicas_ready"])
    return {**row, "replicas": "/".join(str(n) for n in counts)}


@deployments.command("describe")
@click.argument("model")
@click.argument("deployment")
@output_option
def deployments_describe(model: str, deployment: str, output: str) -> None:
    """One deployment: status, replicas wanted/starting/ready and why, its settings."""
    with client() as c:
        row = _with_replicas(c.deployment(deployment, model))
    print_rows([row], _DESCRIBE_COLUMNS, output)


def _action(name: str, help_text: str) -> None:
    @deployments.command(name, help=help_text)
    @click.argument("model")
    @click.argument("deployment")
    @output_option
    def cmd(model: str, deployment: str, output: str) -> None:
        with client() as c:
            row = c.deployment_action(model, deployment, name)
        print_rows([row], _ACTION_COLUMNS, output)


_action("activate", "Activate a deactivated deployment.")
_action("delete", "Delete a deployment (not one an environment points at).")


@deployments.command("replicas")
@click.argument("model")
@click.argument("deployment")
@output_option
def deployments_replicas(model: str, deployment: str, output: str) -> None:
    """A deployment's replicas now: status, restarts, address, since when, and why."""
    with client() as c:
        rows = c.replicas(model, deployment)
    print_rows(rows, ["id", "status", "restarts", "address", "started_at", "message"], output)


@deployments.command("update")
@click.argument("model")
@click.argument("deployment")
@click.option("--name", help="A new name (unique in the model; not `development`).")
@click.option("--labels", help='JSON labels that replace the old ones, e.g. \'{"team": "ml"}\'.')
@output_option
def deployments_update(
    model: str, deployment: str, name: str | None, labels: str | None, output: str
) -> None:
    """Rename a deployment or replace its labels; what runs is not restarted."""
    if name is None and labels is None:
        raise ValidationError("deployments update: give --name, --labels or both")
    with client() as c:
        row = c.update_deployment(model, deployment, name, _labels(labels))
    print_rows([row], _ACTION_COLUMNS, output)


@deployments.command("deactivate")
@click.argument("model")
@click.argument("deployment")
@click.option("--yes", "-y", is_flag=True, help="Do not ask, even if an environment uses it.")
@output_option
def deployments_deactivate(model: str, deployment: str, yes: bool, output: str) -> None:
    """Stop a deployment's replicas; its endpoints answer 404."""
    with client() as c:
        dep = c.deployment(deployment, model)
        serving = list(dep.get("environments") or ())
        if serving and not yes:
            envs = ", ".join(serving)
            question = (
                f"deployment {dep['name']} ({dep['id']}) serves environment(s) {envs}: "
                f"deactivated, {envs} will answer 404 until another deployment is promoted. "
                "Deactivate?"
            )
            if not click.confirm(question, default=False, err=True):
                raise click.exceptions.Abort()
        row = c.deployment_action(model, dep["id"], "deactivate")
    print_rows([row], _ACTION_COLUMNS, output)


@deployments.command("promote")
@click.argument("model")
@click.argument("deployment")
@click.option("--environment", default="production", show_default=True)
@output_option
def deployments_promote(model: str, deployment: str, environment: str, output: str) -> None:
    """Point an environment at a deployment: at once when nothing serves there, else once
    the deployment is ready (a rollout; rolling in steps if the environment's promotion
    settings say so)."""
    with client() as c:
        row = c.promote(model, deployment, environment)
    print_rows([row], _ACTION_COLUMNS, output)
    _rollout_note(model, row, environment)


def _error_text(body: str) -> str:
    """An error answer as a reader wants it: the message of a JSON ``{"error": ...}``
    (the gateway's and the model server's shape), else the body as it came."""
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return body
    return error if isinstance(error, str) and error else body


def _read_data(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ValidationError(
            f"--data: cannot read {path}: {exc.strerror}", field="data", value=path
        ) from exc
    except UnicodeDecodeError as exc:
        raise ValidationError(
            f"--data: {path} is not UTF-8 JSON ({exc.reason} at byte {exc.start})",
            field="data",
            value=path,
        ) from exc


@click.command()
@click.option("--model", "-m", help="Model id or name (default: the only model).")
@click.option("--data", "-d", "data", required=True, help="JSON body, or @file, or - for stdin.")
@click.option("--environment", help="Environment (default production).")
@click.option("--deployment", help="Deployment id or name, bypassing environments.")
def predict(model: str | None, data: str, environment: str | None, deployment: str | None) -> None:
    """Call a model through the gateway and print the response (streams as it arrives)."""
    raw = sys.stdin.read() if data == "-" else _read_data(data[1:]) if data[:1] == "@" else data
    try:
        payload = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValidationError(f"--data: not valid JSON ({exc.msg})", field="data") from exc
    with client() as c:
        if model is None:
            names = [m["name"] for m in c.models()]
            if len(names) != 1:
                raise ValidationError(f"--model: required when there are {len(names)} models")
            model = names[0]
        info = c.model(model)
        ref = info["id"]
        if deployment is not None:  # a name (deployment-2) is the model's; the gateway wants ids
            deployment = c.deployment(deployment, ref)["id"]
        path = c.predict_path(ref, environment=environment, deployment=deployment)
        streaming = False
        try:
            with c.predict_stream(path, payload) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    raise KingpostError(f"HTTP {resp.status_code}: {_error_text(resp.text)}")
                streaming = True
                # Decoded: a server that compresses although asked not to is still text.
                for chunk in resp.iter_bytes():
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()
        except KingpostError as exc:
            if not streaming:
                raise
            sys.stdout.flush()
            click.echo()
            target = deployment or _environment_deployment(c, info, environment or "production")
            raise KingpostError(
                f"{exc.message}; the model's log: `kingpost logs --deployment {target}`"
            ) from exc
    click.echo()


def _environment_deployment(c: KingpostClient, model: dict[str, Any], environment: str) -> str:
    """The deployment ``environment`` points at, or a placeholder when that is unknown."""
    if environment == "production" and model.get("production_deployment_id"):
        return str(model["production_deployment_id"])
    try:
        envs = c.environments(model["id"])
    except KingpostError:
        return "ID"
    return next((e["deployment_id"] for e in envs if e["name"] == environment), None) or "ID"
