"""Bodies in and out: JSON, msgpack (``application/octet-stream``), pydantic models."""

from __future__ import annotations

import json
from typing import Any

import msgpack

__all__ = [
    "CLIENT_ERROR",
    "DOWNSTREAM_ERROR",
    "MODEL_ERROR_MESSAGE",
    "InputError",
    "encode_json",
    "encode_msgpack",
    "error_body",
    "parse_inputs",
    "pydantic_error_message",
]


MODEL_ERROR_MESSAGE = "Internal Server Error (in model/chainlet)."
DOWNSTREAM_ERROR = [(b"x-baseten-error-source", b"04"), (b"x-baseten-error-code", b"600")]
"""Truss's error headers for a failure in the model (or the server)."""
CLIENT_ERROR = [(b"x-baseten-error-source", b"04"), (b"x-baseten-error-code", b"700")]
"""Truss's error headers for a failure caused by the request."""


class InputError(ValueError):
    """A request body that cannot be parsed or validated (answered with 400)."""


def _to_plain(obj: Any) -> Any:
    """Fallback for values json/msgpack cannot encode natively."""
    dump = getattr(obj, "model_dump", None)
    if dump is not None:
        return dump(mode="json")
    tolist = getattr(obj, "tolist", None)  # numpy arrays and scalars
    if tolist is not None:
        return tolist()
    if isinstance(obj, set | frozenset | tuple):
        return list(obj)
    raise TypeError(f"cannot serialize a {type(obj).__name__} to JSON")


_ENCODER = json.JSONEncoder(default=_to_plain)
"""One encoder for every response: ``json.dumps(..., default=...)`` builds a new one per call."""


def encode_json(obj: Any) -> bytes:
    dump_json = getattr(obj, "model_dump_json", None)
    if dump_json is not None:
        return dump_json().encode()  # type: ignore[no-any-return]
    return _ENCODER.encode(obj).encode()


def encode_msgpack(obj: Any) -> bytes:
    if isinstance(obj, bytes):
        return obj
    if hasattr(obj, "model_dump"):
        obj = obj.model_dump(mode="python")
    packed: bytes = msgpack.packb(obj, default=_to_plain, use_bin_type=True)
    return packed


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


def pydantic_error_message(exc: Any) -> str:
    parts = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return "; ".join(parts) or str(exc)


def parse_inputs(body: bytes, binary: bool, input_type: Any) -> Any:
    """Decode a predict body the way Truss does; raises :class:`InputError`."""
    if binary:
        try:
            data = msgpack.unpackb(body, raw=False)
        except Exception as exc:
            raise InputError(f"Invalid msgpack payload: {exc}") from exc
        if input_type is None:
            return data
        return _validate(input_type, data, from_json=False)
    if input_type is not None:
        return _validate(input_type, body, from_json=True)
    try:
        return json.loads(body)
    except ValueError as exc:
        raise InputError(f"Invalid JSON payload: {exc}") from exc


def _validate(input_type: Any, data: Any, *, from_json: bool) -> Any:
    import pydantic

    try:
        if from_json:
            return input_type.model_validate_json(data)
        return input_type.model_validate(data)
    except pydantic.ValidationError as exc:
        raise InputError(pydantic_error_message(exc)) from exc
