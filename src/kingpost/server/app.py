"""Routes and the predict pipeline of the model server.

``preprocess`` and ``postprocess`` run outside the concurrency limit; a
semaphore of ``predict_concurrency`` surrounds ``predict`` (and, for streams,
the whole production of the stream). Sync methods run in a thread pool sized
to ``predict_concurrency`` (other sync methods in a second pool) until they
prove tiny (see :mod:`kingpost.server.placement`); async methods run on the
loop. Error bodies and statuses follow Truss.
"""

from __future__ import annotations

import asyncio
import contextvars
import hmac
import inspect
import json
import logging
import os
import queue
import secrets as _random
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from itertools import count
from time import perf_counter, time_ns
from typing import Any

from kingpost.server import codec, compat
from kingpost.server.contract import RELOAD_PATH, RELOAD_TOKEN_ENV, RELOAD_TOKEN_HEADER
from kingpost.server.eager import on_task
from kingpost.server.http import Connection, HttpRequest
from kingpost.server.logs import REQUEST_ID, log_event
from kingpost.server.metrics import Metrics
from kingpost.server.model import (
    MODEL_FAILURES,
    ArgMode,
    Method,
    ModelDefinitionError,
    ModelHost,
    Status,
)
from kingpost.server.placement import Placement, calling, fast_call_seconds, inline_enabled
from kingpost.server.streams import stream_result
from kingpost.server.websocket import PATH as WEBSOCKET_PATH
from kingpost.server.websocket import Session, serve_websocket

__all__ = ["MODEL_ERROR_MESSAGE", "ModelServer"]

log = logging.getLogger("kingpost.server")

MODEL_ERROR_MESSAGE = codec.MODEL_ERROR_MESSAGE
DOWNSTREAM_ERROR = codec.DOWNSTREAM_ERROR
CLIENT_ERROR = codec.CLIENT_ERROR
NOT_READY = codec.error_body("Model with name model is not ready.")
JSON = b"application/json"
OCTET = b"application/octet-stream"
OPENAI_ROUTES = {
    "/v1/chat/completions": "chat_completions",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
    "/v1/messages": "messages",
    "/v1/responses": "responses",
}


class _Call:
    """Per-request state shared by the pipeline steps; builds the starlette Request lazily."""

    __slots__ = ("_request", "conn", "headers", "req", "spans")

    def __init__(self, req: HttpRequest, conn: Connection, headers: list[tuple[bytes, bytes]]):
        self.req = req
        self.conn = conn
        self.headers = headers
        self._request: Any = None
        self.spans: list[bytes] | None = None
        """With ``runtime.enable_tracing_data`` and a ``traceparent``: each step's times."""

    def send_spans(self) -> None:
        """Name the steps' times in the answer (``x-kingpost-spans``, for the gateway, which
        takes the header off and exports them as spans: ``gateway/tracing.py``)."""
        if self.spans:
            self.headers.append((b"x-kingpost-spans", b";".join(self.spans)))
            self.spans = None

    def request(self) -> Any:
        if self._request is None:
            self._request = compat.make_request(self.req, self.conn)
        return self._request


class _ClientLeft(Exception):
    """The client went away before a model method was called: the call is skipped."""


class _Threads:
    """Fixed worker threads for sync predicts: a queue in, ``call_soon_threadsafe`` out.

    Lighter than ``run_in_executor`` (no concurrent.futures.Future to chain), which
    shows in the tail latency of fast models.
    """

    def __init__(self, n: int) -> None:
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        for i in range(n):
            threading.Thread(target=self._work, name=f"predict-{i}", daemon=True).start()
        self._n = n

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            loop, fut, fn, args = job
            try:
                result = fn(*args)
            except BaseException as exc:  # delivered to the awaiting request
                loop.call_soon_threadsafe(_settle, fut, None, exc)
            else:
                loop.call_soon_threadsafe(_settle, fut, result, None)

    def run(self, loop: asyncio.AbstractEventLoop, fn: Any, *args: Any) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = loop.create_future()
        self._jobs.put((loop, fut, fn, args))
        return fut

    def close(self) -> None:
        for _ in range(self._n):
            self._jobs.put(None)


def _timed(place: Placement, run: Any, fn: Any, *args: Any) -> Any:
    """Call ``fn`` in the context ``run`` belongs to, and tell ``place`` how long it took."""
    started = perf_counter()
    try:
        with calling(place):
            return run(fn, *args)
    finally:
        place.ran_in_thread(perf_counter() - started)


def _settle(fut: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


class ModelServer:
    """Answers HTTP requests for one :class:`ModelHost`."""

    def __init__(self, host: ModelHost) -> None:
        self.host = host
        self.metrics = Metrics()
        concurrency = host.config.predict_concurrency
        self.semaphore = asyncio.Semaphore(concurrency)
        self.predict_pool = ThreadPoolExecutor(concurrency, thread_name_prefix="predict")
        self.aux_pool = ThreadPoolExecutor(32, thread_name_prefix="model")
        self.predict_threads = _Threads(concurrency)
        self.access_log = os.environ.get("KINGPOST_SERVER_ACCESS_LOG", "") not in ("", "0")
        self._ids = count(1)
        self._id_prefix = _random.token_hex(4) + "-"
        self._inline = inline_enabled()
        self._tracing = host.config.enable_tracing_data
        self._fast_s = fast_call_seconds()
        self._placements: dict[str, tuple[Method, Placement]] = {}
        """Each sync method's placement, with the :class:`Method` it was learnt from: a
        live reload binds new Methods, whose code has proven nothing yet."""
        self.reloader: Any = None
        """Set by the runner: reloads the model in place (blocking) and returns what to
        answer; see :meth:`_reload`."""
        # Taken out of the environment: the model's code and its subprocesses never see it.
        self._reload_token = os.environ.pop(RELOAD_TOKEN_ENV, "")
        self.sessions: set[Session] = set()
        """Open WebSockets: closed with 1012 when the server stops, and waited for."""
        self.handling = 0
        """Requests being answered, wherever they are (queued for a slot, in preprocess or
        postprocess, an OpenAI endpoint, a stream still being written): waited for when the
        server stops."""

    def close_websockets(self) -> None:
        for session in list(self.sessions):
            session.going_away()

    def close(self) -> None:
        self.predict_pool.shutdown(wait=False, cancel_futures=True)
        self.aux_pool.shutdown(wait=False, cancel_futures=True)
        self.predict_threads.close()

    async def handle(self, req: HttpRequest, conn: Connection) -> None:
        self.handling += 1
        try:
            started = perf_counter()
            rid = req.headers.get("x-baseten-request-id") or f"{self._id_prefix}{next(self._ids):x}"
            REQUEST_ID.set(rid)
            headers = [(b"x-baseten-request-id", rid.encode("latin-1"))]
            path, method = req.path, req.method
            if method == "POST" and (
                (path.startswith("/v1/models/") and ":predict" in path) or path == "/invocations"
            ):
                # ``/invocations`` and ``/ping`` are SageMaker's names for predict and loaded,
                # which Truss's server answers too.
                route = "predict"
                status = await self._predict(_Call(req, conn, headers))
            elif method == "POST" and path in OPENAI_ROUTES:
                route = OPENAI_ROUTES[path]
                status = await self._endpoint(route, _Call(req, conn, headers))
            elif path == WEBSOCKET_PATH and method == "GET":
                route = "websocket"
                status = await serve_websocket(req, conn, rid, headers, self.host, self.sessions)
            elif path == "/" and method in ("GET", "HEAD"):
                route, status = "live", 200
                conn.respond(200, headers, b"true")
            elif path.endswith("/schema") and path.startswith("/v1/models/") and method == "GET":
                route = "schema"
                status = self._schema(conn, headers)
            elif (path.startswith("/v1/models/") or path == "/ping") and method in ("GET", "HEAD"):
                route = "ready"
                # ``.../loaded`` and ``/ping`` say whether load() finished, without asking
                # is_healthy.
                ask_model = path != "/ping" and not path.endswith("/loaded")
                status = await self._ready(conn, headers, ask_model)
            elif path == RELOAD_PATH and method == "POST":
                route = "reload"
                status = await self._reload(req, conn, headers)
            elif path == "/metrics" and method == "GET":
                route, status = "metrics", 200
                body = self.metrics.render().encode() + _user_metrics()
                conn.respond(200, headers, body, b"text/plain; version=0.0.4")
            else:
                route, status = "other", 404
                conn.respond(404, headers, codec.error_body(f"no route for {method} {path}"))
            self.metrics.observe(route, status, perf_counter() - started)
            if self.access_log or status >= 500:
                log_event(
                    log, logging.INFO, "request", method=method, path=path, status=status,
                    duration_ms=round((perf_counter() - started) * 1000, 3),
                )  # fmt: skip
        finally:
            self.handling -= 1

    async def _reload(
        self, req: HttpRequest, conn: Connection, headers: list[tuple[bytes, bytes]]
    ) -> int:
        """Reload the model in place for the control plane. Only a replica started with a
        reload token answers, and only to a request carrying it: anything else gets the 404
        any unknown path gets, so a user request cannot reload a model."""
        given = req.headers.get(RELOAD_TOKEN_HEADER, "")
        token = self._reload_token
        if not token or self.reloader is None or not hmac.compare_digest(given, token):
            conn.respond(404, headers, codec.error_body(f"no route for POST {RELOAD_PATH}"))
            return 404
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(self.aux_pool, self.reloader)
        conn.respond(200, headers, json.dumps(result).encode(), JSON)
        return 200

    # readiness
    async def _ready(
        self, conn: Connection, headers: list[tuple[bytes, bytes]], ask_model: bool = True
    ) -> int:
        """Ready once loaded and, if the model has ``is_healthy`` and ``ask_model``, when it
        does not answer False. ``None`` (no answer) counts as healthy, as in Truss."""
        host = self.host
        healthy = host.status is Status.READY
        if healthy and ask_model and host.is_healthy is not None:
            try:
                answer = await self._invoke(host.is_healthy, None, None, self.aux_pool)
                healthy = answer is None or bool(answer)
            except MODEL_FAILURES:
                log.exception("is_healthy raised; reporting not ready")
                healthy = False
            if not healthy:
                log.warning("Health check failed.")
        if healthy:
            conn.respond(200, headers, b"{}")
            return 200
        conn.respond(503, headers + DOWNSTREAM_ERROR, NOT_READY)
        return 503

    def _schema(self, conn: Connection, headers: list[tuple[bytes, bytes]]) -> int:
        if self.host.status is not Status.READY:
            conn.respond(503, headers + DOWNSTREAM_ERROR, NOT_READY)
            return 503
        schema = self.host.schema()
        if schema is None:
            conn.respond(404, headers + CLIENT_ERROR, codec.error_body("No schema found"))
            return 404
        conn.respond(200, headers, codec.encode_json(schema))
        return 200

    # calling user code
    async def _invoke(self, m: Method, inputs: Any, call: _Call | None, pool: Any) -> Any:
        if call is not None and call.conn.closed.done():
            # As Truss: nobody is waiting for the answer (a request queued for a slot, or
            # whose preprocess or predict outlived its client), so no model time goes to it.
            raise _ClientLeft(f"Client disconnected, skipping `{m.name}`.")
        request = None
        if call is not None and m.args in (ArgMode.REQUEST, ArgMode.BOTH):
            request = call.request()
        args = m.call_args(inputs, request)
        if m.is_generator:
            return m.fn(*args)
        if m.is_async:
            await on_task()
            return await m.fn(*args)
        known = self._placements.get(m.name)
        if known is not None and known[0] is m:
            place = known[1]
        else:  # the first call, or the first since a reload bound new code
            place = Placement(m.name, self._inline, self._fast_s)
            self._placements[m.name] = (m, place)
        if place.inline:
            # As in a worker thread, no loop is running for the call (a model that drives
            # its own loop with ``run_until_complete`` works the same on both), and the
            # call gets a copy of the request's context.
            running = asyncio.events._get_running_loop()
            asyncio.events._set_running_loop(None)
            started = perf_counter()
            try:
                with calling(place):
                    return contextvars.copy_context().run(m.fn, *args)
            finally:
                place.ran_inline(perf_counter() - started)
                asyncio.events._set_running_loop(running)
        loop = asyncio.get_running_loop()
        run = contextvars.copy_context().run
        if pool is self.predict_pool:
            return await self.predict_threads.run(loop, _timed, place, run, m.fn, *args)
        return await loop.run_in_executor(pool, _timed, place, run, m.fn, *args)

    @staticmethod
    def _inputs(call: _Call, skip: bool, input_type: Any) -> tuple[Any, bool]:
        binary = codec.is_binary(call.req.headers.get("content-type", ""))
        if skip:
            return None, binary
        return codec.parse_inputs(call.req.body, binary, input_type), binary

    async def _predict(self, call: _Call) -> int:
        host = self.host
        if host.status is not Status.READY or host.predict is None:
            return self._no_predict(call)
        try:
            inputs, binary = self._inputs(call, host.skip_input_parsing, host.input_type)
        except codec.InputError as exc:
            call.conn.respond(400, call.headers + CLIENT_ERROR, codec.error_body(str(exc)))
            return 400
        if self._tracing and "traceparent" in call.req.headers:
            call.spans = []
        try:
            if host.preprocess is not None:
                inputs = await self._step(
                    "preprocess", host.preprocess, inputs, call, self.aux_pool
                )
            await self.semaphore.acquire()
            self.metrics.in_flight += 1
            handed_over = False
            try:
                result = await self._step("predict", host.predict, inputs, call, self.predict_pool)
                if _is_stream(result) or compat.is_response(result):
                    if host.postprocess is not None:
                        raise ModelDefinitionError(
                            "If the predict function returns a generator (streaming) or a "
                            "response object, you cannot use postprocessing."
                        )
                    handed_over = True
                    call.send_spans()  # a stream's predict span ends with its generator's return
                    return await self._send_special(result, call, self._release)
            finally:
                if not handed_over:
                    self._release()
            if host.postprocess is not None:
                result = await self._step(
                    "postprocess", host.postprocess, result, call, self.aux_pool
                )
                if _is_stream(result) or compat.is_response(result):
                    call.send_spans()
                    return await self._send_special(result, call, None)  # as Truss serves it
        except MODEL_FAILURES as exc:
            call.send_spans()
            return self._user_error(exc, call)
        call.send_spans()
        return self._send(result, binary, call)

    async def _step(self, name: str, m: Method, inputs: Any, call: _Call, pool: Any) -> Any:
        """:meth:`_invoke`, timed into ``call.spans`` when the request is traced."""
        if call.spans is None:
            return await self._invoke(m, inputs, call, pool)
        start, failed = time_ns(), b"!"
        try:
            result = await self._invoke(m, inputs, call, pool)
            failed = b""
            return result
        finally:
            call.spans.append(b"%s=%d-%d%s" % (name.encode(), start, time_ns(), failed))

    def _no_predict(self, call: _Call) -> int:
        """No predict to call: 503 while the model loads; once it is ready, a 404 saying
        that this model has none (one with only OpenAI methods, or a WebSocket model, told
        where to go instead: Truss fails an assertion there and answers 500)."""
        host = self.host
        if host.status is not Status.READY:
            call.conn.respond(503, call.headers + DOWNSTREAM_ERROR, NOT_READY)
            return 503
        message = "`predict` is not implemented by this model."
        if host.websocket is not None:
            message = (
                "`predict` is not implemented by this model: it serves a WebSocket at "
                f"{WEBSOCKET_PATH} (through the gateway: .../websocket instead of .../predict)"
            )
        call.conn.respond(404, call.headers + CLIENT_ERROR, codec.error_body(message))
        return 404

    def _release(self) -> None:
        self.metrics.in_flight -= 1
        self.semaphore.release()

    async def _endpoint(self, name: str, call: _Call) -> int:
        m = self.host.openai.get(name)
        if self.host.status is not Status.READY:
            call.conn.respond(503, call.headers + DOWNSTREAM_ERROR, NOT_READY)
            return 503
        if m is None:
            body = codec.error_body(f"`{name}` is not implemented by this model.")
            call.conn.respond(404, call.headers + CLIENT_ERROR, body)
            return 404
        try:
            inputs, binary = self._inputs(call, m.args is ArgMode.REQUEST, None)
        except codec.InputError as exc:
            call.conn.respond(400, call.headers + CLIENT_ERROR, codec.error_body(str(exc)))
            return 400
        try:
            result = await self._invoke(m, inputs, call, self.aux_pool)
            if _is_stream(result) or compat.is_response(result):
                return await self._send_special(result, call, None)
        except MODEL_FAILURES as exc:
            return self._user_error(exc, call)
        return self._send(result, binary, call)

    async def _send_special(self, result: Any, call: _Call, release: Any) -> int:
        """Stream a generator or pass a starlette response through; then ``release``.

        A stream that holds a predict slot (``release``) steps its sync generator in the
        predict pool, which has a thread per slot; any other stream (an OpenAI endpoint's,
        postprocess's) is outside the limit and steps in the other pool, so that it neither
        waits for the slot holders' threads nor makes them wait. A response that does not
        stream gives the slot back before it is sent, as in Truss: its body is made, and
        its background task (run after the body is out) is not predict's work."""
        await on_task()
        if compat.is_response(result):
            if release is not None and not compat.is_streaming_response(result):
                release()
                release = None
            try:
                return await compat.send_response(result, call.req, call.conn, call.headers)
            finally:
                if release is not None:
                    release()
        return await stream_result(
            result,
            call.req,
            call.conn,
            call.headers,
            self.aux_pool if release is None else self.predict_pool,
            release,
            self.host.config.streaming_read_timeout,
            self.metrics.stream_cut,
        )

    def _send(self, result: Any, binary: bool, call: _Call) -> int:
        try:
            if binary:
                body, ctype = codec.encode_msgpack(result), OCTET
            else:
                body, ctype = codec.encode_json(result), JSON
        except MODEL_FAILURES as exc:
            return self._user_error(exc, call)
        call.conn.respond(200, call.headers, body, ctype)
        return 200

    def _user_error(self, exc: BaseException, call: _Call) -> int:
        if isinstance(exc, _ClientLeft):
            log.warning(str(exc))
            return 499  # Truss's status for it; the connection is gone, so nothing is sent
        if call.conn.started:
            # Part of the response is out (a streamed response failed midway): another
            # response cannot follow it; breaking the connection off tells the client.
            log.error(MODEL_ERROR_MESSAGE, exc_info=exc)
            call.conn.close_after_response()
            return 500
        http = compat.http_exception(exc)
        if http is not None:
            status, detail = http
            log.error("Model raised HTTPException", exc_info=exc)
            body = codec.encode_json({"error": detail})
        elif isinstance(exc, ModelDefinitionError):
            status = 412
            log.error("model definition error", exc_info=exc)
            body = codec.error_body(f"ModelDefinitionError: {exc}")
        else:
            status = 500
            log.error(MODEL_ERROR_MESSAGE, exc_info=exc)
            body = codec.error_body(MODEL_ERROR_MESSAGE)
        call.conn.respond(status, call.headers + DOWNSTREAM_ERROR, body)
        return status


def _user_metrics() -> bytes:
    """What the model registered with ``prometheus_client`` (its default registry), which
    Truss's server serves at ``/metrics`` too; nothing when the model never imported it."""
    module = sys.modules.get("prometheus_client")
    if module is None:
        return b""
    try:
        return bytes(module.generate_latest(module.REGISTRY))
    except Exception:  # a broken custom collector must not take the server's metrics down
        log.exception("collecting the model's prometheus_client metrics failed")
        return b""


def _is_stream(obj: Any) -> bool:
    return inspect.isgenerator(obj) or inspect.isasyncgen(obj)
