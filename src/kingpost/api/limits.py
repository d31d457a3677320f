"""Bounds on what a client can make the control plane hold or store.

:class:`BodyLimit` caps every request body but a project upload (which has its own
2 GiB limit and is spooled to disk) at :data:`MAX_BODY_BYTES`: a declared
Content-Length past it is answered 413 at once, and a chunked body is read only up to
it. :func:`check_labels` caps a deployment's labels, which the store keeps and every
list call returns.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from kingpost.errors import PayloadTooLargeError

__all__ = ["MAX_BODY_BYTES", "BodyLimit"]

MAX_BODY_BYTES = 1024**2
"""Largest JSON body a management call may send (a project upload excepted)."""

_UPLOAD = re.compile(r"^/v1/projects/[^/]+$")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def _too_large(size: int, declared: bool) -> PayloadTooLargeError:
    what = "declares a body of" if declared else "sent a body of more than"
    return PayloadTooLargeError(
        f"request body: the request {what} {size} bytes, more than the limit of "
        f"{MAX_BODY_BYTES} bytes (1 MiB) for an API call; send less (big files belong "
        "in the project, uploaded with `kingpost push`)",
        field="body",
        limit_bytes=MAX_BODY_BYTES,
        value=size,
    )


class BodyLimit:
    """ASGI middleware: read a capped body in full before the app sees it."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["method"] == "PUT" and _UPLOAD.match(scope["path"])):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"").decode("latin-1")
        if declared.isdigit() and int(declared) > self.limit:
            await _refuse(send, _too_large(int(declared), declared=True))
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:  # stop reading: the rest is never taken in
                await _refuse(send, _too_large(self.limit, declared=False))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # http.disconnect when the client leaves

        await self.app(scope, replay, send)


async def _refuse(send: Send, error: PayloadTooLargeError) -> None:
    payload = json.dumps(error.to_dict()).encode()
    await send(
        {
            "type": "http.response.start",
            "status": error.http_status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                # the unread rest of the body would be taken for the next request
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
