"""JSON-line logs on stdout, each carrying the request id of the request that wrote it."""

from __future__ import annotations

import contextvars
import json
import logging
import os
import sys
import sysconfig
import time
import traceback
from types import TracebackType
from typing import Any, TextIO

__all__ = ["REQUEST_ID", "JsonFormatter", "configure_logging", "format_user_exception", "log_event"]

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "kingpost_request_id", default=None
)
"""The id of the request being served (``X-Baseten-Request-Id``), for log lines."""

_FRAMEWORK_DIRS = (
    os.path.dirname(os.path.abspath(__file__)) + os.sep,
    os.path.abspath(sysconfig.get_paths()["stdlib"]) + os.sep,
)
"""The model server's own files and the standard library (asyncio, thread pools)."""

_FROZEN = "<frozen "
"""The standard library's frozen modules (importlib's bootstrap, between the server's
``import_module`` and the model's module), which have no file under the stdlib dir."""


def _is_framework(filename: str) -> bool:
    return filename.startswith(_FRAMEWORK_DIRS) or filename.startswith(_FROZEN)


def _is_user_file(filename: str | None) -> bool:
    if not filename or filename.startswith("<"):  # "<string>", "<stdin>": no file of the model's
        return False
    return not _is_framework(filename)


def format_user_exception(exc: BaseException, tb: TracebackType | None = None) -> str:
    """The traceback of ``exc`` as the log shows it: from the model's code on.

    Like Truss, the log shows a model's error from the model's frames on, without the
    server frames that led into them. With no frame of the model's: a ``SyntaxError`` in
    a file of the model's (the import machinery's frames are the last) is shown as that
    file and line alone; an error the server raised about the model (``explains_itself``:
    a missing class, a bad signature) as its message alone, which is the whole story; any
    other traceback is the server's own bug and is kept whole.
    """
    tb = tb or exc.__traceback__
    first = tb
    while first is not None and _is_framework(first.tb_frame.f_code.co_filename):
        first = first.tb_next
    if first is None:
        if getattr(exc, "explains_itself", False):
            return f"{type(exc).__name__}: {exc}\n"
        if not (isinstance(exc, SyntaxError) and _is_user_file(exc.filename)):
            first = tb
    return "".join(traceback.format_exception(type(exc), exc, first))


_RESERVED = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id, extras."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None) or REQUEST_ID.get()
        if request_id:
            line["request_id"] = request_id
        for key, value in record.__dict__.items():
            if key not in _RESERVED and key not in line and not key.startswith("_"):
                line[key] = value
        if record.exc_info and record.exc_info[1] is not None:
            exc, tb = record.exc_info[1], record.exc_info[2]
            line["traceback"] = format_user_exception(exc, tb).rstrip("\n")
        return json.dumps(line, default=str)


def configure_logging(stream: TextIO | None = None, level: int = logging.INFO) -> None:
    """Send every log record (the server's and the model's) to stdout as JSON lines."""
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)


def log_event(logger: logging.Logger, level: int, message: str, **fields: Any) -> None:
    """Log ``message`` with ``fields`` as top-level JSON keys."""
    if logger.isEnabledFor(level):
        logger.log(level, message, extra=fields)
