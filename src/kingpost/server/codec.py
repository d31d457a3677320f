"""Bodies in and out: JSON, msgpack (``application/octet-stream``), pydantic models."""

from __future__ import annotations

import datetime
import decimal
import importlib
import json
import sys
import uuid
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
    "is_binary",
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


# msgpack bodies carry dates, decimals, UUIDs and numpy values in the tagged maps Truss's
# server and client use (its ``truss_msgpack_serialize``; arrays in msgpack-numpy's form),
# so a Truss client gets back an ndarray or a datetime, and can send them.


def _msgpack_default(obj: Any) -> Any:
    if isinstance(obj, datetime.datetime):
        text = obj.isoformat()
        if text.endswith("+00:00"):
            text = text.removesuffix("+00:00") + "Z"
        return {b"__dt_datetime_iso__": True, b"data": text}
    if isinstance(obj, datetime.date):
        return {b"__dt_date_iso__": True, b"data": obj.isoformat()}
    if isinstance(obj, datetime.time):
        if obj.utcoffset() is not None:
            raise TypeError("cannot serialize a timezone-aware time to msgpack")
        return {b"__dt_time_iso__": True, b"data": obj.isoformat()}
    if isinstance(obj, datetime.timedelta):
        return {b"__dt_timedelta__": True, b"data": (obj.days, obj.seconds, obj.microseconds)}
    if isinstance(obj, decimal.Decimal):
        return {b"__decimal__": True, b"data": str(obj)}
    if isinstance(obj, uuid.UUID):
        return {b"__uuid__": True, b"data": str(obj)}
    np = sys.modules.get("numpy")
    if np is not None:
        if isinstance(obj, np.ndarray):
            if obj.dtype.kind == "O":  # Python objects (strings from pandas…): a list
                return obj.tolist()
            structured = obj.dtype.kind == "V"
            return {
                b"nd": True,
                b"type": obj.dtype.descr if structured else obj.dtype.str,
                b"kind": b"V" if structured else b"",
                b"shape": obj.shape,
                b"data": obj.tobytes(),
            }
        if isinstance(obj, np.bool_ | np.number):
            return {b"nd": False, b"type": obj.dtype.str, b"data": obj.tobytes()}
    if isinstance(obj, complex):
        return {b"complex": True, b"data": repr(obj)}
    return _to_plain(obj)


def _tagged(obj: dict[Any, Any]) -> Any:
    """``object_hook`` for msgpack input: a tagged map back into its value."""
    if b"data" not in obj:
        return obj
    data = obj[b"data"]  # a value that does not decode fails the request with a 400
    if b"__dt_datetime_iso__" in obj:
        return datetime.datetime.fromisoformat(data)
    if b"__dt_date_iso__" in obj:
        return datetime.date.fromisoformat(data)
    if b"__dt_time_iso__" in obj:
        return datetime.time.fromisoformat(data)
    if b"__dt_timedelta__" in obj:
        days, seconds, micros = data
        return datetime.timedelta(days=days, seconds=seconds, microseconds=micros)
    if b"__decimal__" in obj:
        return _bounded_decimal(data)
    if b"__uuid__" in obj:
        return uuid.UUID(data)
    if b"complex" in obj:
        return complex(data.decode() if isinstance(data, bytes) else data)
    if b"nd" in obj:
        return _numpy_value(obj)
    return obj


DECIMAL_LIMIT = 1000
"""Most digits, and largest exponent, a decimal from a client may have: ``1e10000000`` is 35
bytes of msgpack, and turning it into an ``int`` (a pydantic field) would hold the loop for
seconds; a few thousand digits cost nothing."""


def _bounded_decimal(text: Any) -> decimal.Decimal:
    value = decimal.Decimal(text)
    if value.is_finite() and (
        abs(value.adjusted()) > DECIMAL_LIMIT or len(value.as_tuple().digits) > DECIMAL_LIMIT
    ):
        raise ValueError(
            f"a decimal may have at most {DECIMAL_LIMIT} digits and an exponent within "
            f"±{DECIMAL_LIMIT}; got one of {len(str(text))} characters"
        )
    return value


def _numpy_value(obj: dict[Any, Any]) -> Any:
    try:
        np = importlib.import_module("numpy")
    except ImportError:  # the model's environment has no numpy: leave the map as it came
        return obj
    kind = obj.get(b"kind", b"")
    if kind == b"O":
        raise ValueError("numpy arrays of Python objects (pickles) are not accepted")
    descr = obj[b"type"]
    if kind == b"V":  # structured dtype: a list of (name, format[, shape]) entries
        descr = [tuple(p.decode() if isinstance(p, bytes) else p for p in f) for f in descr]
    dtype = np.dtype(descr.decode() if isinstance(descr, bytes) else descr)
    if obj[b"nd"] is True:
        return np.frombuffer(obj[b"data"], dtype=dtype).reshape(obj[b"shape"]).copy()
    return np.frombuffer(obj[b"data"], dtype=dtype)[0]


def encode_msgpack(obj: Any) -> bytes:
    if isinstance(obj, bytes):
        return obj
    if hasattr(obj, "model_dump"):
        obj = obj.model_dump(mode="python")
    packed: bytes = msgpack.packb(obj, default=_msgpack_default, use_bin_type=True)
    return packed


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


def pydantic_error_message(exc: Any) -> str:
    parts = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return "; ".join(parts) or str(exc)


def is_binary(content_type: str) -> bool:
    """Whether a request's body (and so its answer) is msgpack: ``application/octet-stream``."""
    return content_type.partition(";")[0].strip().lower() == "application/octet-stream"


def parse_inputs(body: bytes, binary: bool, input_type: Any) -> Any:
    """Decode a predict body the way Truss does; raises :class:`InputError`."""
    if binary:
        try:
            data = msgpack.unpackb(body, raw=False, object_hook=_tagged)
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
