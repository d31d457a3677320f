"""What one run of an async request came to, from the answer the gateway relayed: a pure
classification (``classify``), table-tested; the worker records it."""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Outcome", "Verdict", "classify", "deployment_gone", "streaming"]

READ_TIMEOUT = "ReadTimeout"
"""How a hop error begins when the run was sent and no answer came in time."""
_GATEWAY_WAIT_CODES = frozenset({"unavailable", "overloaded", "starting"})
"""The gateway's own refusals that say "not now", not "the model failed"."""
STREAMING_MESSAGE = (
    "the model streamed its output ({}): async inference does not support streaming "
    "output, as on Baseten; call .../predict for a stream, or have predict return "
    "the whole answer"
)


class Verdict(enum.StrEnum):
    SUCCEEDED = "succeeded"  # record the result
    MODEL_ERROR = "model_error"  # an attempt failed; retried per inference_retry_config
    FINAL = "final"  # failed in a way another attempt would not change
    NOT_RUN = "not_run"  # the gateway could not run it now: back to the queue, no attempt


@dataclass(frozen=True)
class Outcome:
    verdict: Verdict
    result: str | None = None
    """The answer as JSON text (SUCCEEDED)."""
    errors: list[dict[str, Any]] = field(default_factory=list)
    """Baseten's ``errors`` entries: ``{"code", "message"}``."""


def _err(code: str, message: str) -> list[dict[str, Any]]:
    return [{"code": code, "message": message[:2000]}]


def streaming(headers: dict[str, str]) -> str | None:
    """Why an answer is a stream (its content type), or None."""
    ctype = headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "text/event-stream":
        return "text/event-stream"
    if "content-length" not in headers and ctype not in ("application/json", ""):
        return f"chunked {ctype}"
    return None


def _gateway_code(body: bytes) -> str | None:
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    code = parsed.get("code") if isinstance(parsed, dict) else None
    return code if isinstance(code, str) else None


def deployment_gone(deployment_id: str) -> list[dict[str, Any]]:
    """The errors of a request whose deployment was deleted before it ran: Baseten's
    ``MODEL_DOES_NOT_EXIST``, as for a run the gateway answered 404."""
    return _err(
        "MODEL_DOES_NOT_EXIST",
        f"deployment {deployment_id} was deleted before this request ran; "
        "send it again to a deployment that exists",
    )


def classify(status: int | None, headers: dict[str, str], body: bytes, error: str = "") -> Outcome:
    """``status`` None: no answer came (``error``, the hop's, says why). Not run, unless
    the run was sent and went past the hop's own timeout: the model may have run it, so it
    counts as an attempt (else a model that outlasts the timeout would run forever)."""
    if status is None:
        if error.startswith(READ_TIMEOUT):
            return Outcome(Verdict.MODEL_ERROR, errors=_err("MODEL_PREDICT_TIMEOUT", error))
        return Outcome(Verdict.NOT_RUN, errors=_err("MODEL_UNAVAILABLE", error))
    text = body.decode("utf-8", "replace")
    if 200 <= status < 300:
        why = streaming(headers)
        if why is not None:
            return Outcome(
                Verdict.FINAL,
                errors=_err("ASYNC_REQUEST_NOT_SUPPORTED", STREAMING_MESSAGE.format(why)),
            )
        try:
            json.loads(body)
            result = text
        except ValueError:
            result = json.dumps(text)  # a plain-text answer is kept as a JSON string
        return Outcome(Verdict.SUCCEEDED, result=result)
    code = _gateway_code(body)
    if status in (429, 503) and code in _GATEWAY_WAIT_CODES:
        return Outcome(Verdict.NOT_RUN, errors=_err("MODEL_NOT_READY", text))
    if status == 404 and code == "not_found":
        return Outcome(Verdict.FINAL, errors=_err("MODEL_DOES_NOT_EXIST", text))
    if status == 504:
        return Outcome(Verdict.MODEL_ERROR, errors=_err("MODEL_PREDICT_TIMEOUT", text))
    if status >= 500 or status == 429:
        return Outcome(Verdict.MODEL_ERROR, errors=_err("MODEL_PREDICT_ERROR", text))
    return Outcome(Verdict.FINAL, errors=_err("MODEL_INVALID_INPUT", f"HTTP {status}: {text}"))
