"""The console's pages and their actions, each a call of the control-plane API.

A read renders what the API answers; an action posts a form (CSRF-checked), calls the
API route the CLI calls, and on success redirects back (post/redirect/get); on failure
the page is shown again with the API's message beside the field or action, and what
was typed kept.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse

from kingpost.console.apicall import ApiResult
from kingpost.console.figures import totals_by_model
from kingpost.console.history import last_hour
from kingpost.console.web import ROOT, Console, Ctx

__all__ = ["page_routes"]

_ACTIONS = {"activate": "activate", "deactivate": "deactivate", "promote": "promote"}
_ROLLOUT = {
    "pause": "pause_promotion",
    "resume": "resume_promotion",
    "cancel": "cancel_promotion",
    "force-complete": "force_complete_promotion",
}
AUTOSCALING_FIELDS = (
    ("min_replica", "Min replicas"),
    ("max_replica", "Max replicas"),
    ("autoscaling_window", "Autoscaling window (s)"),
    ("scale_down_delay", "Scale-down delay (s)"),
    ("concurrency_target", "Concurrency target"),
    ("target_utilization_percentage", "Target utilization (%)"),
    ("max_scale_down_rate", "Max scale-down rate"),
)

PROMOTION_NUMBERS = (
    ("ready_timeout_seconds", "Ready timeout (s)", False),
    ("ramp_up_duration_seconds", "Canary ramp-up duration (s)", False),
    ("max_surge_percent", "Max surge (%)", True),
    ("max_unavailable_percent", "Max unavailable (%)", True),
    ("stabilization_time_seconds", "Stabilization time (s)", True),
    ("replica_overhead_percent", "Replica overhead (%)", True),
)
"""Form field, label, and whether it sits in ``rolling_deploy_config``."""
PROMOTION_FLAGS = (
    ("rolling_deploy", "Rolling promotion (in steps)"),
    ("ramp_up_while_promoting", "Canary (move traffic over the ramp-up duration)"),
)


def _number(raw: str) -> Any:
    """A number as one; anything else as typed, for the API to name in its message."""
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


def _whole(raw: str) -> Any:
    """A whole number as one; anything else (``1.5``, ``²``) as typed, for the API to name."""
    try:
        return int(raw)
    except ValueError:
        return raw


def _promotion_body(fields: dict[str, str]) -> dict[str, Any]:
    body: dict[str, Any] = {name: name in fields for name, _ in PROMOTION_FLAGS}
    config: dict[str, Any] = {}
    for name, _, nested in PROMOTION_NUMBERS:
        raw = fields.get(name, "").strip()
        if raw:
            (config if nested else body)[name] = _number(raw)
    body["rolling_deploy_config"] = config
    return body


def _promotion_values(settings: dict[str, Any]) -> dict[str, str]:
    config = settings.get("rolling_deploy_config") or {}
    values = {name: "on" if settings.get(name) else "" for name, _ in PROMOTION_FLAGS}
    for name, _, nested in PROMOTION_NUMBERS:
        value = (config if nested else settings).get(name)
        values[name] = "" if value is None else str(value)
    return values


def _edit_body(fields: dict[str, str]) -> dict[str, Any]:
    """A rename and the labels as JSON; text that is not JSON goes as typed, for the API's
    message to name."""
    body: dict[str, Any] = {"name": fields.get("name", "").strip()}
    raw = fields.get("labels", "").strip() or "{}"
    try:
        body["labels"] = json.loads(raw)
    except ValueError:
        body["labels"] = raw
    return body


def _q(part: str) -> str:
    return quote(part, safe="")


def _back(path: str, notice: str) -> RedirectResponse:
    return RedirectResponse(f"{path}?notice={quote(notice)}", status_code=303)


async def _need(console: Console, ctx: Ctx, path: str, **params: Any) -> Any:
    """A read the page cannot do without; its failure is the page's error."""
    result = console.check_api(ctx, await ctx.api.get(path, **params))
    if not result.ok:
        raise _ApiFailed(result)
    return result.data


def _errors(result: ApiResult, fallback: str, **aliases: str) -> dict[str, str]:
    """The API's messages by form field: ``aliases`` maps the API's field names (the
    store's ``secret_name``, say) to the form's; one naming no field goes by ``fallback``."""
    out = {aliases.get(k, k): v for k, v in result.fields.items()}
    return out or {fallback: result.error}


class _ApiFailed(Exception):
    def __init__(self, result: ApiResult) -> None:
        self.result = result


def page_routes(router: APIRouter, console: Console) -> None:
    _model_pages(router, console)
    _environment_pages(router, console)
    _deployment_pages(router, console)
    _admin_pages(router, console)


def _failed(console: Console, ctx: Ctx, exc: _ApiFailed) -> Response:
    return console.page(
        ctx, "error.html", exc.result.status, title="Not available", message=exc.result.error
    )


def _model_pages(router: APIRouter, console: Console) -> None:
    @router.get("/")
    async def models(request: Request) -> Response:
        ctx = console.ctx(request)
        try:
            listed = (await _need(console, ctx, "/v1/models"))["models"]
            deployments = (await _need(console, ctx, "/v1/deployments"))["deployments"]
        except _ApiFailed as exc:
            return _failed(console, ctx, exc)
        by_id = {d["id"]: d for d in deployments}
        samples = await console.samples(ctx)
        figures = totals_by_model(samples) if samples is not None else {}
        since = last_hour(console.plane.history, figures)
        rows = []
        for m in listed:
            envs = (await _need(console, ctx, f"/v1/models/{_q(m['id'])}/environments"))[
                "environments"
            ]
            mine = [d for d in deployments if d["model_id"] == m["id"]]
            rows.append(
                {
                    "model": m,
                    "environments": envs,
                    "deployments": mine,
                    "by_id": by_id,
                    "figures": figures.get(m["name"]),
                }
            )
        notice = ctx.request.query_params.get("notice", "")
        return console.page(
            ctx, "models.html", rows=rows, notice=notice, since=since, title="Models"
        )

    async def model_page(
        ctx: Ctx,
        model: str,
        status: int = 200,
        errors: dict[str, str] | None = None,
        typed: dict[str, dict[str, str]] | None = None,
    ) -> Response:
        try:
            m = await _need(console, ctx, f"/v1/models/{_q(model)}")
            deps = (await _need(console, ctx, f"/v1/models/{_q(model)}/deployments"))["deployments"]
            envs = (await _need(console, ctx, f"/v1/models/{_q(model)}/environments"))[
                "environments"
            ]
        except _ApiFailed as exc:
            return _failed(console, ctx, exc)
        return console.page(
            ctx,
            "model.html",
            status,
            model=m,
            deployments=sorted(deps, key=lambda d: d["created_at"], reverse=True),
            environments=envs,
            by_id={d["id"]: d for d in deps},
            errors=errors or {},
            typed=typed or {},
            notice=ctx.request.query_params.get("notice", ""),
            title=m["name"],
        )

    @router.get("/models/{model}")
    async def model_view(model: str, request: Request) -> Response:
        return await model_page(console.ctx(request), model)

    @router.post("/models/{model}/deployments/{dep}/{action}")
    async def deployment_action(model: str, dep: str, action: str, request: Request) -> Response:
        ctx, fields = await console.form(request)
        base = f"/v1/models/{_q(model)}/deployments/{_q(dep)}"
        if action == "delete":
            result = await ctx.api.call("DELETE", base)
        elif action == "edit":
            result = await ctx.api.call("PATCH", base, json=_edit_body(fields))
        elif action in _ACTIONS:
            body = {"environment": fields.get("environment", "")} if action == "promote" else None
            result = await ctx.api.call("POST", f"{base}/{_ACTIONS[action]}", json=body)
        else:
            return console.page(ctx, "error.html", 404, title="Not found", message=action)
        console.check_api(ctx, result)
        if not result.ok:
            typed = {dep: fields} if action == "edit" else None
            return await model_page(ctx, model, result.status, {dep: result.error}, typed)
        return _back(f"{ROOT}/models/{_q(model)}", f"{action}: {result.data['name']} done")

    @router.get("/models/{model}/delete")
    async def confirm_model_delete(model: str, request: Request) -> Response:
        ctx = console.ctx(request)
        try:
            m = await _need(console, ctx, f"/v1/models/{_q(model)}")
            deps = (await _need(console, ctx, f"/v1/models/{_q(model)}/deployments"))["deployments"]
        except _ApiFailed as exc:
            return _failed(console, ctx, exc)
        return console.page(ctx, "confirm_model_delete.html", model=m, deps=deps, title="Delete?")

    @router.post("/models/{model}/delete")
    async def model_delete(model: str, request: Request) -> Response:
        ctx, _ = await console.form(request)
        result = console.check_api(ctx, await ctx.api.call("DELETE", f"/v1/models/{_q(model)}"))
        if not result.ok:
            return console.page(
                ctx, "error.html", result.status, title="Not deleted", message=result.error
            )
        return _back(f"{ROOT}/", f"model {result.data['name']} deleted")

    @router.get("/models/{model}/deployments/{dep}/delete")
    async def confirm_delete(model: str, dep: str, request: Request) -> Response:
        ctx = console.ctx(request)
        try:
            d = await _need(console, ctx, f"/v1/models/{_q(model)}/deployments/{_q(dep)}")
            m = await _need(console, ctx, f"/v1/models/{_q(model)}")
        except _ApiFailed as exc:
            return _failed(console, ctx, exc)
        return console.page(ctx, "confirm_delete.html", model=m, dep=d, title="Delete?")


def _environment_pages(router: APIRouter, console: Console) -> None:
    async def env_page(
        ctx: Ctx,
        model: str,
        env: str,
        status: int = 200,
        errors: dict[str, str] | None = None,
        typed: dict[str, str] | None = None,
        error: str = "",
    ) -> Response:
        try:
            m = await _need(console, ctx, f"/v1/models/{_q(model)}")
            e = await _need(console, ctx, f"/v1/models/{_q(model)}/environments/{_q(env)}")
            dep = None
            if e["deployment_id"]:
                dep = await _need(console, ctx, f"/v1/deployments/{_q(e['deployment_id'])}")
        except _ApiFailed as exc:
            return _failed(console, ctx, exc)
        current = (e.get("autoscaling_settings") or (dep or {}).get("autoscaling_settings")) or {}
        values = {k: str(current.get(k, "")) for k, _ in AUTOSCALING_FIELDS}
        values.update(_promotion_values(e.get("promotion_settings") or {}))
        values.update(typed or {})
        return console.page(
            ctx,
            "environment.html",
            status,
            model=m,
            env=e,
            dep=dep,
            fields=AUTOSCALING_FIELDS,
            promotion_numbers=PROMOTION_NUMBERS,
            promotion_flags=PROMOTION_FLAGS,
            values=values,
            errors=errors or {},
            error=error,
            notice=ctx.request.query_params.get("notice", ""),
            title=f"{m['name']} / {e['name']}",
        )

    @router.get("/models/{model}/environments/{env}")
    async def env_view(model: str, env: str, request: Request) -> Response:
        return await env_page(console.ctx(request), model, env)

    @router.post("/models/{model}/environments/{env}/autoscaling")
    async def env_autoscaling(model: str, env: str, request: Request) -> Response:
        ctx, fields = await console.form(request)
        changes: dict[str, Any] = {}
        for name, _ in AUTOSCALING_FIELDS:
            raw = fields.get(name, "").strip()
            if raw:  # a number goes as one; anything else goes as typed, for the API to name
                changes[name] = _whole(raw)
        path = f"/v1/models/{_q(model)}/environments/{_q(env)}"
        result = console.check_api(
            ctx, await ctx.api.call("PATCH", path, json={"autoscaling_settings": changes})
        )
        if not result.ok:
            typed = {k: fields.get(k, "") for k, _ in AUTOSCALING_FIELDS}
            return await env_page(
                ctx, model, env, result.status, result.fields, typed, result.error
            )
        return _back(f"{ROOT}/models/{_q(model)}/environments/{_q(env)}", result.data["message"])

    @router.post("/models/{model}/environments/{env}/promotion")
    async def env_promotion(model: str, env: str, request: Request) -> Response:
        ctx, fields = await console.form(request)
        path = f"/v1/models/{_q(model)}/environments/{_q(env)}"
        body = {"promotion_settings": _promotion_body(fields)}
        result = console.check_api(ctx, await ctx.api.call("PATCH", path, json=body))
        if not result.ok:
            typed = {name: fields.get(name, "") for name, _, _ in PROMOTION_NUMBERS}
            typed.update({name: fields.get(name, "") for name, _ in PROMOTION_FLAGS})
            errors = _errors(result, "rolling_deploy", rolling_deploy_config="max_surge_percent")
            return await env_page(ctx, model, env, result.status, errors, typed, result.error)
        return _back(f"{ROOT}/models/{_q(model)}/environments/{_q(env)}", result.data["message"])

    @router.post("/models/{model}/environments/{env}/rollout/{action}")
    async def env_rollout(model: str, env: str, action: str, request: Request) -> Response:
        ctx, _ = await console.form(request)
        if action not in _ROLLOUT:
            return console.page(ctx, "error.html", 404, title="Not found", message=action)
        path = f"/v1/models/{_q(model)}/environments/{_q(env)}/{_ROLLOUT[action]}"
        result = console.check_api(ctx, await ctx.api.call("POST", path))
        if not result.ok:
            return await env_page(ctx, model, env, result.status, error=result.error)
        return _back(f"{ROOT}/models/{_q(model)}/environments/{_q(env)}", f"{action}: requested")


def _deployment_pages(router: APIRouter, console: Console) -> None:
    @router.get("/models/{model}/deployments/{dep}")
    async def deployment_view(model: str, dep: str, request: Request) -> Response:
        ctx = console.ctx(request)
        try:
            m = await _need(console, ctx, f"/v1/models/{_q(model)}")
            d = await _need(console, ctx, f"/v1/models/{_q(model)}/deployments/{_q(dep)}")
            config = await _need(
                console, ctx, f"/v1/models/{_q(model)}/deployments/{_q(dep)}/config"
            )
            replicas = await _need(
                console, ctx, f"/v1/models/{_q(model)}/deployments/{_q(dep)}/replicas"
            )
        except _ApiFailed as exc:
            return _failed(console, ctx, exc)
        return console.page(
            ctx,
            "deployment.html",
            model=m,
            dep=d,
            config=config,
            replicas=replicas["replicas"],
            title=f"{m['name']} / {d['name']}",
        )


def _admin_pages(router: APIRouter, console: Console) -> None:
    async def secrets_page(
        ctx: Ctx, status: int = 200, errors: dict[str, str] | None = None, name: str = ""
    ) -> Response:
        try:
            listed = (await _need(console, ctx, "/v1/secrets"))["secrets"]
        except _ApiFailed as exc:
            return _failed(console, ctx, exc)
        return console.page(
            ctx,
            "secrets.html",
            status,
            secrets=listed,
            errors=errors or {},
            name=name,
            notice=ctx.request.query_params.get("notice", ""),
            title="Secrets",
        )

    @router.get("/secrets")
    async def secrets_view(request: Request) -> Response:
        return await secrets_page(console.ctx(request))

    @router.post("/secrets")
    async def secret_set(request: Request) -> Response:
        ctx, fields = await console.form(request)
        name = fields.get("name", "")
        body = {"name": name, "value": fields.get("value", "")}
        result = console.check_api(ctx, await ctx.api.call("POST", "/v1/secrets", json=body))
        if not result.ok:  # the value is not sent back into the page
            errors = _errors(result, "name", secret_name="name")
            return await secrets_page(ctx, result.status, errors, name)
        return _back(f"{ROOT}/secrets", f"secret {name} set")

    @router.post("/secrets/{name}/delete")
    async def secret_delete(name: str, request: Request) -> Response:
        ctx, _ = await console.form(request)
        result = console.check_api(ctx, await ctx.api.call("DELETE", f"/v1/secrets/{_q(name)}"))
        if not result.ok:
            return await secrets_page(ctx, result.status, {"delete": result.error})
        return _back(f"{ROOT}/secrets", f"secret {name} deleted")

    async def keys_page(
        ctx: Ctx, status: int = 200, errors: dict[str, str] | None = None, created: Any = None
    ) -> Response:
        try:
            listed = await _need(console, ctx, "/v1/api_keys")
        except _ApiFailed as exc:
            return _failed(console, ctx, exc)
        return console.page(
            ctx,
            "api_keys.html",
            status,
            keys=listed["keys"],
            errors=errors or {},
            created=created,
            notice=ctx.request.query_params.get("notice", ""),
            title="API keys",
        )

    @router.get("/api-keys")
    async def keys_view(request: Request) -> Response:
        return await keys_page(console.ctx(request))

    @router.post("/api-keys")
    async def key_create(request: Request) -> Response:
        ctx, fields = await console.form(request)
        body: dict[str, Any] = {"name": fields.get("name", ""), "type": fields.get("type", "")}
        models = [m.strip() for m in fields.get("model_ids", "").split(",") if m.strip()]
        if models:
            body["model_ids"] = models
        result = console.check_api(ctx, await ctx.api.call("POST", "/v1/api_keys", json=body))
        if not result.ok:
            errors = _errors(result, "name", api_key_name="name")
            return await keys_page(ctx, result.status, errors)
        return await keys_page(ctx, 201, created=result.data)  # shown this once, never again

    @router.post("/api-keys/{prefix}/revoke")
    async def key_revoke(prefix: str, request: Request) -> Response:
        ctx, _ = await console.form(request)
        path = f"/v1/api_keys/{_q(prefix)}"
        result = console.check_api(ctx, await ctx.api.call("DELETE", path))
        if not result.ok:
            return await keys_page(ctx, result.status, {"revoke": result.error})
        return _back(f"{ROOT}/api-keys", f"key {prefix} revoked")
