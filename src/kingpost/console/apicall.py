"""The console's one way to read or change anything: the control-plane API itself.

Each call is an in-process HTTP request (httpx over ASGI, no socket) to the same
FastAPI app the CLI talks to, with ``Authorization: Api-Key`` of the session's key:
the same routes, validation, permissions and error messages, so the console can do
nothing the API refuses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx
from starlette.types import ASGIApp

__all__ = ["ApiCaller", "ApiResult"]


@dataclass(frozen=True)
class ApiResult:
    status: int
    data: Any
    error: str = ""
    """The API's message for a failed call ("" when it succeeded)."""
    fields: dict[str, str] = field(default_factory=dict)
    """Form field -> the API's message about it, for showing next to the field."""

    @property
    def ok(self) -> bool:
        return self.status < 400


def _field_name(path: str) -> str:
    return path.rsplit(".", 1)[-1] if path else ""


def _result(resp: httpx.Response) -> ApiResult:
    try:
        data: Any = resp.json() if resp.content else None
    except ValueError:
        data = {"error": resp.text}
    if resp.status_code < 400:
        return ApiResult(resp.status_code, data)
    body = data if isinstance(data, dict) else {}
    error = str(body.get("error") or f"HTTP {resp.status_code}")
    fields: dict[str, str] = {}
    if isinstance(body.get("field"), str):
        fields[_field_name(body["field"])] = error
    for e in body.get("errors") or ():
        if isinstance(e, dict) and isinstance(e.get("field"), str):
            msg = str(e.get("message", ""))
            if "value" in e:
                msg += f", got {e['value']!r}"
            fields.setdefault(_field_name(e["field"]), msg)
    return ApiResult(resp.status_code, data, error, fields)


class ApiCaller:
    """Calls the API app in-process with one API key."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self._app = app
        self._key = api_key

    async def _send(
        self, method: str, path: str, json: Any = None, params: dict[str, Any] | None = None
    ) -> httpx.Response:
        transport = httpx.ASGITransport(app=self._app)
        async with httpx.AsyncClient(
            transport=transport,
            base_url="http://kingpost-console",
            headers={"Authorization": f"Api-Key {self._key}"},
            timeout=60,
        ) as client:
            clean = {k: v for k, v in (params or {}).items() if v not in (None, "")}
            return await client.request(method, path, json=json, params=clean)

    async def call(
        self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None
    ) -> ApiResult:
        return _result(await self._send(method, path, json, params))

    async def text(self, path: str) -> tuple[int, str]:
        """A GET of a route that answers text (``/metrics``): its status and body."""
        resp = await self._send("GET", path)
        return resp.status_code, resp.text

    async def get(self, path: str, **params: Any) -> ApiResult:
        return await self.call("GET", path, params=params)
