"""The Truss model-class contract: find, construct, load and describe a model.

Behaviour follows Truss's model wrapper: ``__init__`` gets only the keyword
arguments it accepts; each user method takes no argument, the inputs, the
request, or the inputs then the request (annotated as a starlette ``Request``);
a predict whose first parameter is a pydantic model gets validated inputs. A model may
instead define ``async def websocket(self, websocket)`` and nothing of predict,
preprocess or postprocess; and, as there, a predict that takes only the request may not
follow a preprocess, nor a postprocess take only the request, nor ``is_healthy`` take an
argument (Truss's ``ModelDescriptor.from_model`` rules).
"""

from __future__ import annotations

import collections.abc
import enum
import importlib
import importlib.util
import inspect
import logging
import os
import sys
import threading
import time
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kingpost.server.config import ServerConfig
from kingpost.server.environment import EnvironmentWatch, poll_interval
from kingpost.server.hubcache import link_hub_snapshots
from kingpost.server.secrets import LazyDataResolver, Secrets, uses_volume_cache

__all__ = [
    "LOOP_STOPPERS",
    "MODEL_FAILURES",
    "ArgMode",
    "Method",
    "ModelDefinitionError",
    "ModelHost",
    "Status",
    "describe",
]

log = logging.getLogger("kingpost.server")

OPENAI_METHODS = ("chat_completions", "completions", "embeddings", "messages", "responses")
STRICT_ENDPOINTS = frozenset({"chat_completions", "completions", "embeddings"})
"""Endpoint methods whose bad signature refuses the model; the others are skipped."""

LOOP_STOPPERS: tuple[type[BaseException], ...] = (SystemExit, KeyboardInterrupt)
"""Not ``Exception``s: leaving an asyncio Task, they stop the event loop itself."""
MODEL_FAILURES: tuple[type[BaseException], ...] = (Exception, *LOOP_STOPPERS)
"""What a call into model code may raise that fails that one request (a 500) and leaves the
server running. ``sys.exit()`` in ``predict`` is a failed request here, as it is under Truss's
uvicorn, not a way to stop the replica with every other request in flight. Cancellation is
not in it: the connection code tells a cancelled request from model code raising one."""


class ModelDefinitionError(TypeError):
    """The model class breaks the Truss contract (answered with 412, as Truss does)."""

    explains_itself = True
    """Its message says what is wrong with the model: the log shows it without the
    server's frames that found it (see :func:`kingpost.server.logs.format_user_exception`)."""


class Status(enum.StrEnum):
    LOADING = "loading"  # importing, constructing or running load()
    READY = "ready"  # load() finished
    FAILED = "failed"  # import, __init__ or load() raised; the process exits


class ArgMode(enum.Enum):
    NONE = "none"  # method()
    INPUTS = "inputs"  # method(inputs)
    REQUEST = "request"  # method(request)
    BOTH = "both"  # method(inputs, request)


@dataclass(frozen=True)
class Method:
    """A user method and how to call it."""

    name: str
    fn: Callable[..., Any]
    is_async: bool
    is_generator: bool
    args: ArgMode

    def call_args(self, inputs: Any, request: Any) -> tuple[Any, ...]:
        if self.args is ArgMode.INPUTS:
            return (inputs,)
        if self.args is ArgMode.BOTH:
            return (inputs, request)
        if self.args is ArgMode.REQUEST:
            return (request,)
        return ()


def _is_request_type(annotation: Any) -> bool:
    if not isinstance(annotation, type):
        return False
    for klass in annotation.__mro__:
        if klass.__name__ == "Request" and klass.__module__.startswith("starlette."):
            return True
    return False


def _signature(fn: Callable[..., Any]) -> inspect.Signature:
    """The signature with string annotations (``from __future__ import annotations``) resolved."""
    try:
        return inspect.signature(fn, eval_str=True)
    except Exception:
        return inspect.signature(fn)


def _arg_mode(name: str, fn: Callable[..., Any]) -> ArgMode:
    params = list(_signature(fn).parameters.values())
    if not params:
        return ArgMode.NONE
    if len(params) == 1:
        return ArgMode.REQUEST if _is_request_type(params[0].annotation) else ArgMode.INPUTS
    if len(params) == 2:
        if _is_request_type(params[0].annotation):
            raise ModelDefinitionError(
                f"`{name}` takes two arguments with the request first; the request must be "
                f"the second argument. Got: {inspect.signature(fn)}"
            )
        if not _is_request_type(params[1].annotation):
            raise ModelDefinitionError(
                f"`{name}` takes two arguments: the second must be annotated as "
                f"starlette.requests.Request. Got: {inspect.signature(fn)}"
            )
        return ArgMode.BOTH
    raise ModelDefinitionError(
        f"`{name}` takes at most two arguments (inputs, request). Got: {inspect.signature(fn)}"
    )


def describe(instance: Any, name: str) -> Method | None:
    """The :class:`Method` for ``instance.name``, or ``None`` when not defined."""
    fn = getattr(instance, name, None)
    if fn is None or not callable(fn):
        return None
    return Method(
        name=name,
        fn=fn,
        is_async=inspect.iscoroutinefunction(fn),
        is_generator=inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn),
        args=_arg_mode(name, fn),
    )


def _pydantic_input_type(method: Method | None) -> Any:
    if method is None or method.args not in (ArgMode.INPUTS, ArgMode.BOTH):
        return None
    param = next(iter(_signature(method.fn).parameters.values()))
    return param.annotation if _is_pydantic(param.annotation) else None


def _is_pydantic(annotation: Any) -> bool:
    """A pydantic model class: what inputs are validated into and schemas are made from."""
    return isinstance(annotation, type) and hasattr(annotation, "model_validate_json")


def _output_schema(annotation: Any) -> tuple[Any, bool | None]:
    """(pydantic output type or None, whether it streams) from a return annotation: a
    model; a (async) generator or iterator; ``Awaitable[Model]``; ``Union[Model, gen]``."""
    if _is_pydantic(annotation):
        return annotation, False
    origin = typing.get_origin(annotation)
    stream_types = (
        collections.abc.Generator,
        collections.abc.AsyncGenerator,
        collections.abc.Iterator,
        collections.abc.AsyncIterator,
    )
    if isinstance(origin, type) and issubclass(origin, stream_types):
        return None, True
    args = typing.get_args(annotation)
    if isinstance(origin, type) and issubclass(origin, collections.abc.Awaitable):
        return (args[0], False) if args and _is_pydantic(args[0]) else (None, None)
    if origin in (typing.Union, types.UnionType) and len(args) == 2:  # a model, or a stream
        arms = [_output_schema(a) for a in args]
        models = [model for model, streams in arms if model is not None and streams is False]
        if len(models) == 1 and any(model is None and streams for model, streams in arms):
            return models[0], True
    return None, None


def _accepts(signature: inspect.Signature, name: str) -> bool:
    return name in signature.parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()
    )


def _websocket_method(instance: Any, host: ModelHost) -> Method | None:
    """The model's ``websocket`` method, checked as Truss checks it; ``None`` when absent."""
    method = describe(instance, "websocket")
    if method is None:
        return None
    where = f"{host.config.model_file}: `websocket`"
    if host.predict or host.preprocess or host.postprocess:
        raise ModelDefinitionError(
            f"{where} cannot be combined with `predict`, `preprocess` or `postprocess` (the "
            f"WebSocket carries all input and output); remove them or remove `websocket`"
        )
    if method.args is not ArgMode.INPUTS:
        raise ModelDefinitionError(
            f"{where} must take one argument, the WebSocket: "
            f"`async def websocket(self, websocket: fastapi.WebSocket)`. "
            f"Got: {inspect.signature(method.fn)}"
        )
    if not method.is_async:
        raise ModelDefinitionError(f"{where} must be an `async def`, as Truss requires")
    try:
        importlib.import_module("starlette.websockets")
    except ImportError as exc:
        raise ModelDefinitionError(
            f"{where} is given a starlette WebSocket, and starlette is not installed in the "
            f"model's environment; add `fastapi` to `requirements` in config.yaml"
        ) from exc
    return method


def _health_method(instance: Any, where: Path) -> Method | None:
    """The model's ``is_healthy``: called with no argument, so it must take none but
    ``self`` (Truss refuses any other at load)."""
    fn = getattr(instance, "is_healthy", None)
    if fn is not None and callable(fn) and _signature(fn).parameters:
        raise ModelDefinitionError(
            f"{where}: `is_healthy` must take no argument but `self` (it is called with "
            f"none); write `def is_healthy(self) -> bool`. Got: {inspect.signature(fn)}"
        )
    return describe(instance, "is_healthy")


def _check_data_flow(host: ModelHost) -> None:
    """Truss refuses at load (``ModelDescriptor.from_model``) the combinations in which a
    method's result would be dropped: served anyway, each request would lose it silently."""
    where = host.config.model_file
    predict, preprocess, postprocess = host.predict, host.preprocess, host.postprocess
    if predict is not None and preprocess is not None and predict.args is ArgMode.REQUEST:
        raise ModelDefinitionError(
            f"{where}: `predict` takes only the request, so the result of `preprocess` would "
            f"be discarded; let `predict` take it first: `def predict(self, model_input)` "
            f"or `def predict(self, model_input, request: Request)`. "
            f"Got: {inspect.signature(predict.fn)}"
        )
    if postprocess is not None and postprocess.args is ArgMode.REQUEST:
        raise ModelDefinitionError(
            f"{where}: `postprocess` takes only the request, so the result of `predict` would "
            f"be discarded; let `postprocess` take it first: `def postprocess(self, "
            f"model_output)` or `def postprocess(self, model_output, request: Request)`. "
            f"Got: {inspect.signature(postprocess.fn)}"
        )


LOAD_RETRY_GAP_S = 1.0


def _load_retries() -> int:
    """Retries of a failed ``load()``: ``NUM_LOAD_RETRIES_TRUSS``, 1 by default, as in Truss."""
    try:
        return max(0, int(os.environ.get("NUM_LOAD_RETRIES_TRUSS", "1")))
    except ValueError:
        return 1


def _import_numpy_if_installed() -> None:
    """Import numpy now, off the loop, if the environment has it and the model did not.

    A msgpack body may carry numpy arrays; decoding one imports numpy, and the first such
    request would otherwise hold the event loop for the import (a tenth of a second or
    more). Truss's server imports it at start too; here it is imported just after the
    replica is ready, so a cold start does not wait for it (a numpy body that arrives
    during the import waits for the rest of it)."""
    if "numpy" not in sys.modules and importlib.util.find_spec("numpy") is not None:
        try:
            importlib.import_module("numpy")
        except Exception:  # a broken install: the request that needs it will say so
            log.warning("numpy is installed but does not import", exc_info=True)


def _call_hook(run_coroutine: Callable[[Any], Any], hook: Callable[..., Any], *args: Any) -> None:
    """Call a sync or async model hook from a thread that is not the loop's."""
    if inspect.iscoroutinefunction(hook):
        run_coroutine(hook(*args))
    else:
        hook(*args)


def _drop_project_modules(roots: list[Path]) -> dict[str, types.ModuleType]:
    """Remove from ``sys.modules`` every module loaded from under ``roots``, so the next
    import reads the files again; returns what was removed."""
    prefixes = tuple(str(Path(r).resolve()) + os.sep for r in roots)
    dropped: dict[str, types.ModuleType] = {}
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if file and os.path.abspath(file).startswith(prefixes):
            dropped[name] = sys.modules.pop(name)
    return dropped


class ModelHost:
    """Owns the user's model instance and its described methods."""

    def __init__(self, config: ServerConfig, secrets: Secrets) -> None:
        self.config = config
        self.secrets = secrets
        self.resolver = LazyDataResolver(config.data_path, uses_volume_cache(config.raw))
        self.status = Status.LOADING
        self.instance: Any = None
        self.predict: Method | None = None
        self.preprocess: Method | None = None
        self.postprocess: Method | None = None
        self.is_healthy: Method | None = None
        self.websocket: Method | None = None
        """``async def websocket(self, websocket)``: the model serves ``/v1/websocket``."""
        self.openai: dict[str, Method] = {}
        self.input_type: Any = None
        self.skip_input_parsing = False
        self.environment_watch = EnvironmentWatch()
        self.environment: Any = self.environment_watch.initial()
        """The environment the model was last told of (``None``: in none)."""

    def import_class(self) -> type[Any]:
        cfg = self.config
        # After the standard library and site-packages, as Truss appends /packages: a
        # project's own files never replace what is installed (the server runs with -P, so
        # its working directory, the project, is not first on the path either).
        for path in [cfg.app_dir, *cfg.package_paths()]:
            if str(path) not in sys.path:
                sys.path.append(str(path))
        module_name = ".".join(
            [*cfg.model_module_dir.strip("/").split("/"), cfg.model_class_filename[:-3]]
            if cfg.model_class_filename.endswith(".py")
            else [*cfg.model_module_dir.strip("/").split("/"), cfg.model_class_filename]
        )
        if not cfg.model_file.is_file():
            raise ModelDefinitionError(
                f"{cfg.model_file}: model file not found; set `model_module_dir` and "
                f"`model_class_filename` in config.yaml to where the model class is"
            )
        module = importlib.import_module(module_name)
        klass = getattr(module, cfg.model_class_name, None)
        if not isinstance(klass, type):
            raise ModelDefinitionError(
                f"{cfg.model_file}: no class {cfg.model_class_name!r}; define it or set "
                f"`model_class_name` in config.yaml"
            )
        return klass

    def construct(self, klass: type[Any]) -> Any:
        signature = inspect.signature(klass)
        offered: dict[str, Callable[[], Any]] = {
            "config": lambda: self.config.raw,
            "data_dir": self._data_dir,
            "secrets": lambda: self.secrets,
            "lazy_data_resolver": lambda: self.resolver,
            "environment": lambda: self.environment,
        }
        kwargs = {k: make() for k, make in offered.items() if _accepts(signature, k)}
        return klass(**kwargs)

    def _data_dir(self) -> Path:
        """The data directory, created when the project has none (as Truss does)."""
        path = self.config.data_path
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a read-only app directory: the model gets the path anyway
            log.warning("cannot create the data directory %s: %s", path, exc)
        return path

    def bind(self, instance: Any) -> None:
        """Describe the instance's methods; raises ModelDefinitionError on a bad signature."""
        self.instance = instance
        self.predict = describe(instance, "predict")
        self.preprocess = describe(instance, "preprocess")
        self.postprocess = describe(instance, "postprocess")
        self.is_healthy = _health_method(instance, self.config.model_file)
        self.websocket = _websocket_method(instance, self)
        _check_data_flow(self)
        self.openai = {}
        for name in OPENAI_METHODS:
            try:
                method = describe(instance, name)
            except ModelDefinitionError:
                if name in STRICT_ENDPOINTS:
                    raise
                # ``messages``/``responses`` are common helper names: one that cannot be an
                # endpoint stays a plain method, as it was before these routes existed.
                log.warning("`%s` does not take (inputs[, request]); not served at /v1/%s",
                            name, name)  # fmt: skip
                continue
            if method is not None:
                self.openai[name] = method
        if self.predict is None and not self.openai and self.websocket is None:
            raise ModelDefinitionError(
                f"{self.config.model_file}: class {self.config.model_class_name!r} has no "
                f"`predict` or `websocket` method; add `def predict(self, model_input): ...`"
            )
        self.input_type = _pydantic_input_type(self.preprocess or self.predict)
        # (A predict of the request alone with a preprocess is refused above.)
        self.skip_input_parsing = bool(
            self.predict is not None
            and self.predict.args is ArgMode.REQUEST
            and self.preprocess is None
        )

    def schema(self) -> dict[str, Any] | None:
        """The input and output JSON schemas of ``predict`` (inputs from ``preprocess`` when
        there is one, output from ``postprocess``), as Truss serves them; ``None`` when
        neither side is annotated with a pydantic model or a stream."""
        if self.predict is None:
            return None
        last = self.postprocess or self.predict
        output, streams = _output_schema(_signature(last.fn).return_annotation)
        if self.input_type is None and output is None and streams is None:
            return None
        return {
            "input_schema": None
            if self.input_type is None
            else self.input_type.model_json_schema(),
            "output_schema": None if output is None else output.model_json_schema(),
            "supports_streaming": streams,
        }

    def load_blocking(self, run_coroutine: Callable[[Any], Any]) -> None:
        """Import, construct and ``load()`` the model; run off the event loop.

        ``run_coroutine`` runs a coroutine on the server's loop and waits for it
        (for an ``async def load``).
        """
        # As Truss's image: a model_cache without a volume is in the Hub cache at import.
        link_hub_snapshots(self.config.app_dir, self.config.raw, os.environ)
        instance = self.construct(self.import_class())
        self.bind(instance)
        setup = getattr(instance, "setup_environment", None)
        if callable(setup) and self.environment is not None:
            # As Truss: told the deployment's environment before load().
            _call_hook(run_coroutine, setup, self.environment)
        load = getattr(instance, "load", None)
        if load is not None:
            retries = _load_retries()
            for attempt in range(retries + 1):
                try:
                    _call_hook(run_coroutine, load)
                    break
                except Exception:
                    if attempt == retries:
                        raise
                    # As Truss does: a load that fails (a download that timed out…) gets
                    # another go after a second before the replica gives up.
                    log.warning("load() failed; retrying (%d of %d)", attempt + 1, retries,
                                exc_info=True)  # fmt: skip
                    time.sleep(LOAD_RETRY_GAP_S)
        self.resolver.raise_if_not_collected()  # as Truss, after load() and its retries
        self.status = Status.READY
        _import_numpy_if_installed()  # after: it is 0.1-0.3 s of every cold start

    def reload_blocking(self, run_coroutine: Callable[[Any], Any]) -> None:
        """Re-import the project's modules, construct and ``load()`` a new instance, then
        serve it; run off the event loop (a development deployment's live reload).

        Requests keep reaching the old instance until the new one has loaded. When
        anything raises (a syntax error, ``load()``), the old instance, its modules and
        the old config stay, and the exception propagates for the caller to report."""
        from kingpost.server.config import load_server_config

        roots = [self.config.app_dir, *self.config.package_paths()]
        dropped = _drop_project_modules(roots)
        importlib.invalidate_caches()
        old_config, old_instance = self.config, self.instance
        try:
            self.config = load_server_config(self.config.app_dir)
            instance = self.construct(self.import_class())
            setup = getattr(instance, "setup_environment", None)
            if callable(setup) and self.environment is not None:
                _call_hook(run_coroutine, setup, self.environment)
            load = getattr(instance, "load", None)
            if load is not None:
                _call_hook(run_coroutine, load)
            self.bind(instance)
        except BaseException:
            _drop_project_modules(roots)
            sys.modules.update(dropped)
            self.config = old_config
            if old_instance is not None:
                self.bind(old_instance)
            raise

    def watch_environment(self, run_coroutine: Callable[[Any], Any], stop: threading.Event) -> None:
        """Call ``setup_environment`` again whenever the deployment's environment changes
        (a promotion while the replica runs); blocks until ``stop``. Run after load().

        A failing call is logged and the model keeps serving; it is told again only when
        the environment changes again, as in Truss.
        """
        setup = getattr(self.instance, "setup_environment", None)
        if not callable(setup) or self.environment_watch.path is None:
            return
        interval = poll_interval()
        while not stop.wait(interval):
            environment = self.environment_watch.poll()
            if environment is None or environment == self.environment:
                continue
            log.info("environment changed to %s; calling setup_environment", environment)
            try:
                _call_hook(run_coroutine, setup, environment)
            except Exception:
                log.exception("setup_environment(%r) failed", environment)
                continue
            self.environment = environment
