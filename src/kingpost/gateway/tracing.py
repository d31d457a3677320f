"""OpenTelemetry spans of requests through the gateway, exported with OTLP/HTTP.

Off unless an endpoint is configured (:func:`traces_endpoint`); off, the gateway holds no
tracer, checks one ``is None`` per send and per answer, and never imports OpenTelemetry.
On, each answered request is two spans:

- ``gateway.request`` (SERVER): from the request's head to its answer; its parent is the
  client's ``traceparent`` when it sent one (W3C trace context), else it starts a trace;
- ``gateway.upstream`` (CLIENT), its child: from the head's write to the replica to the
  answer. The replica gets ``traceparent: 00-{trace}-{upstream span}-01`` in place of the
  client's, so whatever traces on the replica continues the same trace;
- ``model.preprocess``, ``model.predict``, ``model.postprocess`` (INTERNAL, service
  ``kingpost-model-server``), children of ``gateway.upstream``: a model-class replica whose
  config sets ``runtime.enable_tracing_data`` times the steps of a request that came with a
  ``traceparent`` and names them in its answer's ``x-kingpost-spans`` header
  (``name=start_ns-end_ns`` joined by ``;``, a ``!`` after a step that raised), which the
  gateway takes off the answer (never passed on) and exports with its own. The relay is
  the answer itself: an isolated replica has no route to a collector, and the gateway,
  which already holds the exporter and the trace's ids, reads every answer anyway. Only
  the step names and times come from the replica; the ids are the gateway's.

Both carry ``kingpost.request_id`` (the ``X-Baseten-Request-Id``), the model, deployment
and replica, the method, path and status. The ids are drawn when the request is sent
(no system call: a seeded PRNG) and the spans are built when it is answered, from the
times the gateway already keeps, then handed to the SDK's batch processor, which exports
from its own thread.
"""

from __future__ import annotations

import os
import random
import re
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from kingpost.errors import KingpostError

if TYPE_CHECKING:
    from kingpost.gateway.proxy import Request
    from kingpost.gateway.routing import Target

__all__ = [
    "MODEL_STEPS",
    "SKEW_NS",
    "GatewayTracer",
    "TracingUnavailable",
    "parse_model_spans",
    "require_sdk",
    "traces_endpoint",
]

MODEL_STEPS = frozenset({"preprocess", "predict", "postprocess"})
"""The model server's steps the gateway makes spans of (``x-kingpost-spans``)."""
_MODEL_SPAN = re.compile(r"([a-z]+)=([0-9]{1,20})-([0-9]{1,20})(!?)")
_MAX_NS = 2**64 - 1
"""OTLP's times are fixed64: one past this fails the encoding of the whole batch."""
SKEW_NS = 60 * 10**9
"""How far a model step may lie outside the gateway's own send-to-answer window: a replica
on another host (a Ray node) reads its own clock."""

_TRACEPARENT = re.compile(rb"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_HEADER_LINE = re.compile(rb"(?im)^traceparent:[^\r\n]*\r\n")


def parse_model_spans(
    header: bytes, within: tuple[int, int] = (0, _MAX_NS)
) -> list[tuple[str, int, int, bool]]:
    """``x-kingpost-spans`` as (step, start ns, end ns, raised): known steps only, each
    at most once, with an end not before its start, both inside ``within`` (epoch ns,
    inclusive; never past what OTLP can encode); anything else is left out. A step out of
    range is dropped rather than clamped: the replica's clock or header is wrong, and one
    time OTLP cannot encode would lose the whole export batch, other models' spans too."""
    lo, hi = max(within[0], 0), min(within[1], _MAX_NS)
    out: list[tuple[str, int, int, bool]] = []
    seen: set[str] = set()
    for part in header.decode("latin-1").split(";")[: len(MODEL_STEPS)]:
        m = _MODEL_SPAN.fullmatch(part.strip())
        if m is None or m[1] not in MODEL_STEPS or m[1] in seen:
            continue
        start, end = int(m[2]), int(m[3])
        if lo <= start <= end <= hi:
            seen.add(m[1])
            out.append((m[1], start, end, bool(m[4])))
    return out


class TracingUnavailable(KingpostError):
    code = "tracing_unavailable"
    exit_code = 2


def traces_endpoint(env: Mapping[str, str]) -> str | None:
    """Where spans go: ``KINGPOST_TRACING_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_ENDPOINT`` (a
    base URL: ``/v1/traces`` is added), or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (used as
    it is); None (tracing off) when none is set or ``OTEL_SDK_DISABLED`` is true."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if full := env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip():
        return full
    base = (
        env.get("KINGPOST_TRACING_ENDPOINT", "").strip()
        or env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    )
    if not base:
        return None
    return base.rstrip("/") + "/v1/traces"


def require_sdk(endpoint: str) -> None:
    """Refuse to start with tracing on and OpenTelemetry's SDK or OTLP/HTTP exporter
    missing (found without importing them)."""
    import importlib.util

    for name in ("opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.http"):
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            raise TracingUnavailable(_missing(endpoint, name))


def _missing(endpoint: str, what: str) -> str:
    return (
        f"tracing is on (spans go to {endpoint}) but {what} is not installed: install "
        "Kingpost's `tracing` extra (pip install 'kingpost[tracing]'), or unset "
        "KINGPOST_TRACING_ENDPOINT and OTEL_EXPORTER_OTLP_ENDPOINT"
    )


class GatewayTracer:
    def __init__(self, endpoint: str, service_name: str = "kingpost-gateway") -> None:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import ReadableSpan
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.sdk.util.instrumentation import InstrumentationScope
            from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags
        except ImportError as exc:
            raise TracingUnavailable(_missing(endpoint, "OpenTelemetry")) from exc
        self._span_cls = ReadableSpan
        self._ctx = SpanContext
        self._kinds = (SpanKind.SERVER, SpanKind.CLIENT, SpanKind.INTERNAL)
        self._status = (Status(StatusCode.UNSET), Status(StatusCode.ERROR))
        self._sampled = TraceFlags(TraceFlags.SAMPLED)
        self._resource = Resource.create({"service.name": service_name})
        self._model_resource = Resource.create({"service.name": "kingpost-model-server"})
        self._scope = InstrumentationScope("kingpost.gateway")
        self.endpoint = endpoint
        self._processor = BatchSpanProcessor(
            OTLPSpanExporter(endpoint=endpoint), schedule_delay_millis=500
        )
        self._rand = random.Random(os.urandom(16))
        # perf_counter() times, as the gateway keeps them, to epoch nanoseconds
        self._offset_ns = time.time_ns() - time.perf_counter_ns()

    # -- on the request path -------------------------------------------------------------
    def inject(self, req: Request, head: bytes) -> bytes:
        """``head`` with this request's ``traceparent`` (the client's one removed), and
        the request's ids drawn (once; a retry on another replica keeps them)."""
        if req.trace is None:
            trace_id, parent = 0, 0
            for name, value in req.headers:
                if name.lower() == b"traceparent":
                    m = _TRACEPARENT.fullmatch(value.strip())
                    if m and int(m[1], 16) and int(m[2], 16):
                        trace_id, parent = int(m[1], 16), int(m[2], 16)
                    break
            rand = self._rand
            req.trace = [
                trace_id or rand.getrandbits(128) or 1,
                parent,
                rand.getrandbits(64) or 1,
                rand.getrandbits(64) or 1,
                0.0,
                None,
            ]
        trace = req.trace
        trace[4] = time.perf_counter()
        line = b"traceparent: 00-%032x-%016x-01\r\n" % (trace[0], trace[3])
        head = _HEADER_LINE.sub(b"", head)
        return head[:-2] + line + b"\r\n"

    def end(
        self,
        rid: str,
        status: int,
        outcome: str,
        start: float,
        target: Target | None,
        req: Request | None,
    ) -> None:
        """The request's spans, handed to the exporter (from its own thread)."""
        now = time.perf_counter()
        trace = req.trace if req is not None else None
        rand = self._rand
        if trace is None:  # answered by the gateway itself: no upstream span
            trace = [rand.getrandbits(128) or 1, 0, rand.getrandbits(64) or 1, 0, 0.0, None]
            for name, value in req.headers if req is not None else ():
                if name.lower() == b"traceparent":
                    m = _TRACEPARENT.fullmatch(value.strip())
                    if m and int(m[1], 16) and int(m[2], 16):
                        trace[0], trace[1] = int(m[1], 16), int(m[2], 16)
                    break
        trace_id, parent, server_id, client_id, sent, model = trace
        attrs: dict[str, Any] = {"kingpost.request_id": rid, "kingpost.outcome": outcome}
        if status:
            attrs["http.response.status_code"] = status
        if target is not None:
            attrs["kingpost.model_id"] = target.model_id
            attrs["kingpost.deployment_id"] = target.deployment.deployment_id
        if req is not None:
            attrs["http.request.method"] = req.method.decode("latin-1")
            attrs["url.path"] = req.url.partition(b"?")[0].decode("latin-1")
            if req.replica is not None:
                attrs["kingpost.replica"] = req.replica
        failed = self._status[1 if status >= 500 or not status else 0]
        ctx = self._ctx
        server = ctx(trace_id, server_id, is_remote=False, trace_flags=self._sampled)
        parent_ctx = (
            ctx(trace_id, parent, is_remote=True, trace_flags=self._sampled) if parent else None
        )
        off = self._offset_ns
        spans = [
            self._span_cls(
                "gateway.request",
                context=server,
                parent=parent_ctx,
                resource=self._resource,
                attributes=attrs,
                kind=self._kinds[0],
                status=failed,
                start_time=off + int(start * 1e9),
                end_time=off + int(now * 1e9),
                instrumentation_scope=self._scope,
            )
        ]
        if client_id and sent:
            spans.append(
                self._span_cls(
                    "gateway.upstream",
                    context=ctx(trace_id, client_id, is_remote=False, trace_flags=self._sampled),
                    parent=server,
                    resource=self._resource,
                    attributes=attrs,
                    kind=self._kinds[1],
                    status=failed,
                    start_time=off + int(sent * 1e9),
                    end_time=off + int(now * 1e9),
                    instrumentation_scope=self._scope,
                )
            )
        if model is not None and client_id and sent:
            upstream = ctx(trace_id, client_id, is_remote=False, trace_flags=self._sampled)
            # The window in the replica's terms (wall clock), read now rather than through
            # the offset taken at start, which drifts from the wall clock as NTP slews it.
            answered = time.time_ns()
            window = (answered - int((now - sent) * 1e9) - SKEW_NS, answered + SKEW_NS)
            spans += self._model_spans(model, trace_id, upstream, attrs, window)
        for span in spans:
            self._processor.on_end(span)

    def _model_spans(
        self,
        header: bytes,
        trace_id: int,
        parent: Any,
        attrs: dict[str, Any],
        window: tuple[int, int],
    ) -> list[Any]:
        """The spans a model server named in ``x-kingpost-spans``; what does not parse, or
        lies outside ``window`` (the request's, give or take ``SKEW_NS``), is left out (a
        replica's header is not trusted beyond its own steps' times)."""
        out = []
        for step, start, end, failed in parse_model_spans(header, window):
            span_id = self._rand.getrandbits(64) or 1
            out.append(
                self._span_cls(
                    f"model.{step}",
                    context=self._ctx(
                        trace_id, span_id, is_remote=False, trace_flags=self._sampled
                    ),
                    parent=parent,
                    resource=self._model_resource,
                    attributes=attrs,
                    kind=self._kinds[2],
                    status=self._status[1 if failed else 0],
                    start_time=start,
                    end_time=end,
                    instrumentation_scope=self._scope,
                )
            )
        return out

    def close(self) -> None:
        self._processor.shutdown()  # type: ignore[no-untyped-call]
