"""The console's plumbing: sign-in and sign-out, the session and CSRF checks, templates,
the JSON read-through the pages poll, and the playground's path to the gateway.

Pages and their actions are in ``console/pages.py``; both reach the platform only
through :class:`~kingpost.console.apicall.ApiCaller` (the API itself) and the gateway.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, urlsplit

import httpx
from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import JSONResponse, RedirectResponse, StreamingResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup, escape
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp

from kingpost.console.apicall import ApiCaller, ApiResult
from kingpost.console.sessions import ConsoleSessions, SessionInfo, csrf_matches

if TYPE_CHECKING:
    from kingpost.api.app import ControlPlane
    from kingpost.metrics.summary import Samples

__all__ = ["COOKIE", "Console", "Ctx", "console_routes"]

_HERE = Path(__file__).parent
COOKIE = "kingpost_console"
_PRE_COOKIE = "kingpost_console_signin"
"""A sign-in form's own CSRF token (double-submit), since no session exists yet."""
ROOT = "/console"
_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


_PAGE_HEADERS = {
    "Content-Security-Policy": _CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class NeedSignIn(Exception):
    """No live session: the browser goes to sign-in, and back to ``next_path`` after."""

    def __init__(self, next_path: str) -> None:
        self.next_path = next_path


def _page_of(request: Request) -> str:
    """The console page a form was posted from, by its Referer (same origin only)."""
    referer = urlsplit(request.headers.get("referer", ""))
    same = referer.netloc in ("", request.url.netloc)
    if same and referer.path.startswith(f"{ROOT}/") and "/sign-in" not in referer.path:
        return referer.path
    return f"{ROOT}/"


class CsrfRefused(Exception):
    """A state-changing request without this session's CSRF token."""


@dataclass(frozen=True)
class Ctx:
    """One signed-in request: its session and its way to the API."""

    request: Request
    session: SessionInfo
    api: ApiCaller


class Console:
    """What the console's routes share: the API app, sessions and templates."""

    def __init__(self, app: ASGIApp, plane: ControlPlane) -> None:
        self.app = app
        self.plane = plane
        self.sessions = ConsoleSessions(
            plane.store.db, plane.store.box, plane.settings.console_session_ttl
        )
        self.env = Environment(
            loader=FileSystemLoader(_HERE / "templates"),
            autoescape=select_autoescape(default=True),
        )
        self.env.globals["root"] = ROOT
        self.env.filters["yaml"] = yaml_html
        self.env.filters["clock"] = lambda t: time.strftime("%H:%M UTC", time.gmtime(t))

    def render(self, template: str, status: int = 200, **context: Any) -> Response:
        html = self.env.get_template(template).render(**context)
        return Response(html, status_code=status, media_type="text/html", headers=_PAGE_HEADERS)

    def page(self, ctx: Ctx, template: str, status: int = 200, **context: Any) -> Response:
        return self.render(
            template,
            status,
            csrf=ctx.session.csrf_token,
            key_prefix=ctx.session.key_prefix,
            path=ctx.request.url.path,
            **context,
        )

    def ctx(self, request: Request) -> Ctx:
        """The request's session, or :class:`NeedSignIn`."""
        info = self.sessions.get(request.cookies.get(COOKIE))
        if info is None:
            # Back to the page after: a form's action (a POST route) is not one, the page
            # the form was on is (its Referer, when it is the console's), else the start.
            raise NeedSignIn(request.url.path if request.method == "GET" else _page_of(request))
        return Ctx(request, info, ApiCaller(self.app, info.api_key))

    async def form(self, request: Request) -> tuple[Ctx, dict[str, str]]:
        """A state-changing form post: its session, CSRF-checked, and its fields."""
        ctx = self.ctx(request)
        body = (await request.body()).decode("utf-8", "replace")
        fields = {k: v[-1] for k, v in parse_qs(body, keep_blank_values=True).items()}
        if not csrf_matches(ctx.session.csrf_token, fields.pop("csrf", None)):
            raise CsrfRefused
        return ctx, fields

    async def samples(self, ctx: Ctx) -> Samples | None:
        """One scrape of the API's ``/metrics``, parsed; None when it failed."""
        from kingpost.metrics.summary import parse

        status, text = await ctx.api.text("/metrics")
        if status == 401:
            self.check_api(ctx, ApiResult(status, None))
        return parse(text) if status == 200 else None

    def check_api(self, ctx: Ctx, result: ApiResult) -> ApiResult:
        """An API answer of 401 means the key is gone (revoked): the session ends too."""
        if result.status == 401:
            self.sessions.end(ctx.request.cookies.get(COOKIE))
            raise NeedSignIn(ctx.request.url.path)
        return result


_YAML_KEY = re.compile(r"^(\s*(?:- )?)([^\s:#'\"][^:#]*?)(:)(\s|$)")


def yaml_html(document: Any) -> Markup:
    """``document`` as YAML, escaped, its keys in ``<span class="k">`` for the eye."""
    import yaml

    text = yaml.safe_dump(document, sort_keys=False, default_flow_style=False, width=100)
    lines = []
    for line in text.splitlines():
        m = _YAML_KEY.match(line)
        if m:
            rest = line[m.end(3) :]
            lines.append(
                escape(m.group(1))
                + Markup('<span class="k">')
                + escape(m.group(2))
                + Markup("</span>:")
                + escape(rest)
            )
        else:
            lines.append(escape(line))
    return Markup("\n").join(lines)


def _safe_next(value: str | None) -> str:
    """Only a console path: never another site, never a scheme."""
    if value and value.startswith(ROOT + "/") and "//" not in value and "\\" not in value:
        return value
    return ROOT + "/"


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


def console_routes(app: FastAPI, plane: ControlPlane) -> Console:
    """Mount the console on the API app at ``/console`` (``/`` leads there)."""
    console = Console(app, plane)
    _handlers(app, console)
    router = APIRouter(prefix=ROOT, include_in_schema=False)
    _sign_in_routes(router, console)
    _data_routes(router, console)
    from kingpost.console.pages import page_routes

    page_routes(router, console)
    app.include_router(router)
    app.mount(f"{ROOT}/static", StaticFiles(directory=_HERE / "static"), name="console-static")

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse(ROOT + "/", status_code=307)

    return console


def _handlers(app: FastAPI, console: Console) -> None:
    @app.exception_handler(NeedSignIn)
    async def _sign_in(request: Request, exc: NeedSignIn) -> Response:
        url = f"{ROOT}/sign-in?next={quote(_safe_next(exc.next_path))}"
        if request.headers.get("x-requested-with") == "fetch":  # the page's scripts
            return JSONResponse(
                {"error": "your console session has ended; sign in again", "sign_in": url},
                status_code=401,
            )
        return RedirectResponse(url, status_code=303)

    @app.exception_handler(CsrfRefused)
    async def _csrf(request: Request, exc: CsrfRefused) -> Response:
        return console.render(
            "error.html",
            403,
            title="Request refused",
            message="This form's CSRF token is missing or wrong, so nothing was changed. "
            "Reload the page and try again.",
        )


def _sign_in_routes(router: APIRouter, console: Console) -> None:
    import secrets

    def form(request: Request, error: str = "", status: int = 200) -> Response:
        token = request.cookies.get(_PRE_COOKIE) or secrets.token_urlsafe(24)
        resp = console.render(
            "sign_in.html",
            status,
            signin_csrf=token,
            next=_safe_next(request.query_params.get("next")),
            error=error,
        )
        resp.set_cookie(
            _PRE_COOKIE,
            token,
            httponly=True,
            samesite="strict",
            secure=_secure(request),
            path=f"{ROOT}/sign-in",
        )
        return resp

    @router.get("/sign-in")
    def sign_in_page(request: Request) -> Response:
        return form(request)

    @router.post("/sign-in")
    async def sign_in(request: Request) -> Response:
        body = (await request.body()).decode("utf-8", "replace")
        fields = {k: v[-1] for k, v in parse_qs(body, keep_blank_values=True).items()}
        if not csrf_matches(request.cookies.get(_PRE_COOKIE) or "", fields.get("csrf")):
            raise CsrfRefused
        key = fields.get("api_key", "").strip()
        if not key:
            return form(request, "Enter an API key.", 400)
        if not key.isascii() or not key.isprintable():
            # A header cannot carry it; keys are ASCII (a paste brought something else).
            return form(request, "API key: ASCII letters, digits and symbols only.", 400)
        # The API decides: an unknown key is 401, an invoke-only key 403, with its message.
        result = await ApiCaller(console.app, key).get("/v1/api_keys")
        if not result.ok:
            return form(request, f"Sign-in refused: {result.error}", result.status)
        prefix = key[:12]
        session_id, _ = console.sessions.create(key, prefix)
        resp = RedirectResponse(_safe_next(fields.get("next")), status_code=303)
        resp.set_cookie(
            COOKIE,
            session_id,
            max_age=int(console.plane.settings.console_session_ttl),
            httponly=True,
            samesite="strict",
            secure=_secure(request),
            path=ROOT,
        )
        resp.delete_cookie(_PRE_COOKIE, path=f"{ROOT}/sign-in")
        return resp

    @router.post("/sign-out")
    async def sign_out(request: Request) -> Response:
        await console.form(request)  # a cross-site post cannot sign anyone out
        console.sessions.end(request.cookies.get(COOKIE))
        resp = RedirectResponse(f"{ROOT}/sign-in", status_code=303)
        resp.delete_cookie(COOKIE, path=ROOT)
        return resp


def _data_routes(router: APIRouter, console: Console) -> None:
    @router.get("/data/{path:path}")
    async def read_through(path: str, request: Request) -> Response:
        """What the pages poll: a GET of the API's ``/v1/{path}`` with the session's key."""
        ctx = console.ctx(request)
        if any(part in (".", "..") for part in path.split("/")):
            return JSONResponse({"error": f"path {path!r}: no '.' or '..' parts"}, 400)
        params = dict(request.query_params)  # one dict: a parameter may be named `path`
        result = console.check_api(ctx, await ctx.api.call("GET", f"/v1/{path}", params=params))
        return JSONResponse(result.data, status_code=result.status)

    @router.get("/figures")
    async def figures(
        request: Request, model: str, deployment: str | None = None, history: bool = False
    ) -> Response:
        """Running request totals of a model (or one deployment; both by name) from the
        platform's ``/metrics``; the page's script charts the change between polls. With
        ``history``, also the totals the control plane sampled over the last hour."""
        from kingpost.console.figures import totals

        ctx = console.ctx(request)
        samples = await console.samples(ctx)
        if samples is None:
            return JSONResponse({"error": "the platform's metrics are unavailable"}, 503)
        out = {"t": time.time(), **totals(samples, model, deployment).to_json()}
        kept = console.plane.history
        if history and kept is not None:
            out["history"] = [
                {"t": t, **figures.to_json()} for t, figures in kept.series(model, deployment)
            ]
        return JSONResponse(out)

    @router.post("/models/{model}/deployments/{dep}/predict")
    async def playground(model: str, dep: str, request: Request) -> Response:
        """Send the body to the deployment's predict route through the gateway, with the
        session's key, and stream its answer back as it arrives."""
        ctx = console.ctx(request)
        if not csrf_matches(ctx.session.csrf_token, request.headers.get("x-csrf-token")):
            raise CsrfRefused
        body = await request.body()
        gateway = console.plane.settings.gateway_local_url
        client = httpx.AsyncClient(timeout=httpx.Timeout(600, connect=10))
        url = f"{gateway}/models/{quote(model, safe='')}/deployment/{quote(dep, safe='')}/predict"
        started = time.monotonic()
        try:
            upstream = await client.send(
                client.build_request(
                    "POST",
                    url,
                    content=body,
                    headers={
                        "Authorization": f"Api-Key {ctx.session.api_key}",
                        "Content-Type": "application/json",
                        # The bytes are relayed as they come, and shown: not compressed.
                        "Accept-Encoding": "identity",
                    },
                ),
                stream=True,
            )
        except httpx.HTTPError as exc:
            await client.aclose()
            return JSONResponse(
                {"error": f"cannot reach the gateway at {gateway}: {exc}", "code": "bad_gateway"},
                status_code=502,
            )

        async def relay() -> AsyncIterator[bytes]:
            try:
                async for chunk in upstream.aiter_raw():
                    yield chunk
            finally:
                await upstream.aclose()
                await client.aclose()

        headers = {
            "X-Kingpost-Upstream-Status": str(upstream.status_code),
            "X-Kingpost-First-Byte-Ms": str(round((time.monotonic() - started) * 1000)),
        }
        rid = upstream.headers.get("x-baseten-request-id")
        if rid:
            headers["X-Baseten-Request-Id"] = rid
        return StreamingResponse(
            relay(),
            status_code=upstream.status_code,
            headers=headers,
            media_type=upstream.headers.get("content-type", "application/octet-stream"),
        )
