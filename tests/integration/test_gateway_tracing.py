"""Gateway spans over OTLP/HTTP to a real receiver the test runs (the protobuf decoded with
``opentelemetry.proto``): names, parent/child links, the request id, and ``traceparent``
as the replica gets it; no OpenTelemetry import when tracing is off."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_server_harness import ready_server

from helpers.gateway import AUTH, RunningGateway
from helpers.httpd import QuietHandler, serving
from helpers.platform import wait_for
from kingpost.gateway.table import DeploymentRoute, DeploymentState, Upstream
from kingpost.gateway.tracing import (
    GatewayTracer,
    TracingUnavailable,
    require_sdk,
    traces_endpoint,
)

trace_pb2 = pytest.importorskip("opentelemetry.proto.collector.trace.v1.trace_service_pb2")

PREDICT = "/models/echo/production/predict"
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


@dataclass
class Receiver:
    spans: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _decode(body: bytes) -> list[dict[str, Any]]:
    req = trace_pb2.ExportTraceServiceRequest()
    req.ParseFromString(body)
    out = []
    for rs in req.resource_spans:
        service = {a.key: a.value.string_value for a in rs.resource.attributes}
        for ss in rs.scope_spans:
            for s in ss.spans:
                attrs = {}
                for a in s.attributes:
                    v = a.value
                    attrs[a.key] = v.int_value if v.HasField("int_value") else v.string_value
                out.append(
                    {
                        "name": s.name,
                        "trace": s.trace_id.hex(),
                        "span": s.span_id.hex(),
                        "parent": s.parent_span_id.hex(),
                        "kind": s.kind,
                        "attrs": attrs,
                        "service": service.get("service.name"),
                        "start": s.start_time_unix_nano,
                        "end": s.end_time_unix_nano,
                        "status": s.status.code,
                    }
                )
    return out


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, str]]:
    got = Receiver()

    class Handler(QuietHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            assert self.path == "/v1/traces"
            assert self.headers["Content-Type"] == "application/x-protobuf"
            with got.lock:
                got.spans += _decode(body)
            self._send(200, b"")

    with serving(Handler) as server:
        yield got, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture
def replica() -> Iterator[int]:
    class Handler(QuietHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            seen = {"traceparent": self.headers.get_all("traceparent")}
            self._send(200, json.dumps(seen).encode())

    with serving(Handler) as server:
        yield int(server.server_address[1])


def _spans(rec: Receiver, rid: str, n: int) -> list[dict[str, Any]]:
    def find() -> list[dict[str, Any]] | None:
        with rec.lock:
            mine = [s for s in rec.spans if s["attrs"].get("kingpost.request_id") == rid]
        return mine if len(mine) >= n else None

    return wait_for(find, 10, f"{n} spans of {rid}")


def test_spans_link_client_gateway_and_replica(
    receiver: tuple[Receiver, str], replica: int
) -> None:
    rec, url = receiver
    gw = RunningGateway(tracer=GatewayTracer(url + "/v1/traces"))
    try:
        route = DeploymentRoute(
            "d1", "m1", "/x", DeploymentState.SERVING, (Upstream("d1-r0", "127.0.0.1", replica),)
        )
        gw.table(route)
        # A client that traces: its span is the parent, its trace goes on.
        r = httpx.post(
            f"{gw.url}{PREDICT}",
            headers=AUTH
            | {
                "X-Baseten-Request-Id": "trace-1",
                "traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01",
            },
            content=b"{}",
        )
        assert r.status_code == 200
        sent = r.json()["traceparent"]
        assert len(sent) == 1  # the client's was replaced, not passed on beside it
        spans = {s["name"]: s for s in _spans(rec, "trace-1", 2)}
        server, client = spans["gateway.request"], spans["gateway.upstream"]
        assert server["trace"] == client["trace"] == CLIENT_TRACE
        assert server["parent"] == CLIENT_SPAN
        assert client["parent"] == server["span"]
        assert sent[0] == f"00-{CLIENT_TRACE}-{client['span']}-01"
        assert (server["kind"], client["kind"]) == (2, 3)  # SERVER, CLIENT
        assert server["attrs"]["http.response.status_code"] == 200
        assert server["attrs"]["kingpost.deployment_id"] == "d1"
        assert server["attrs"]["kingpost.replica"] == "d1-r0"
        assert server["service"] == "kingpost-gateway"
        assert server["start"] <= client["start"] <= client["end"] <= server["end"]

        # No traceparent from the client: a new trace, the gateway's span its root.
        r = httpx.post(
            f"{gw.url}{PREDICT}", headers=AUTH | {"X-Baseten-Request-Id": "trace-2"}, content=b"1"
        )
        spans = {s["name"]: s for s in _spans(rec, "trace-2", 2)}
        assert spans["gateway.request"]["parent"] == ""
        assert spans["gateway.request"]["trace"] not in ("", CLIENT_TRACE)
        assert r.json()["traceparent"][0].split("-")[1] == spans["gateway.request"]["trace"]

        # The gateway's own error: one span, its status, no upstream.
        r = httpx.post(
            f"{gw.url}/models/nope/production/predict",
            headers=AUTH | {"X-Baseten-Request-Id": "trace-3"},
        )
        assert r.status_code == 404
        (only,) = _spans(rec, "trace-3", 1)
        assert only["name"] == "gateway.request"
        assert only["attrs"]["http.response.status_code"] == 404
    finally:
        gw.close()


def test_a_traced_model_servers_steps_join_the_gateways_trace(
    receiver: tuple[Receiver, str], tmp_path: Path
) -> None:
    """A real model server (``runtime.enable_tracing_data: true``) behind a real gateway:
    its preprocess, predict and postprocess come back as spans in the request's trace,
    children of the gateway's upstream span, and the header that carried them is not
    passed on to the client."""
    rec, url = receiver
    gw = RunningGateway(tracer=GatewayTracer(url + "/v1/traces"))
    try:
        with ready_server("traced", tmp_path) as (server, _):
            route = DeploymentRoute(
                "d1",
                "m1",
                "/v1/models/model:predict",
                DeploymentState.SERVING,
                (Upstream("d1-r0", "127.0.0.1", server.port),),
            )
            gw.table(route)
            with httpx.Client(base_url=gw.url, headers=AUTH, timeout=30) as c:
                ok = c.post(PREDICT, json={"value": 1}, headers={"X-Baseten-Request-Id": "m-1"})
                failed = c.post(
                    PREDICT, json={"value": -5}, headers={"X-Baseten-Request-Id": "m-2"}
                )
            assert ok.json() == {"value": 20}
            assert "x-kingpost-spans" not in ok.headers
            assert failed.status_code == 500 and "x-kingpost-spans" not in failed.headers
        spans = {s["name"]: s for s in _spans(rec, "m-1", 5)}
        upstream = spans["gateway.upstream"]
        steps = [spans[f"model.{n}"] for n in ("preprocess", "predict", "postprocess")]
        assert {s["trace"] for s in (spans["gateway.request"], upstream, *steps)} == {
            upstream["trace"]
        }
        assert all(s["parent"] == upstream["span"] for s in steps)
        assert all(s["service"] == "kingpost-model-server" for s in steps)
        assert all(s["attrs"]["kingpost.request_id"] == "m-1" for s in steps)
        assert upstream["start"] <= steps[0]["start"] <= steps[0]["end"] <= steps[1]["start"]
        assert steps[1]["end"] <= steps[2]["start"] <= steps[2]["end"] <= upstream["end"]
        # The step that raised ends the model's spans, with an error status.
        bad = {s["name"]: s for s in _spans(rec, "m-2", 4)}
        assert "model.postprocess" not in bad
        assert (bad["model.preprocess"]["status"], bad["model.predict"]["status"]) == (0, 2)
    finally:
        gw.close()


def test_a_replicas_steps_out_of_range_are_dropped_not_the_batch(
    receiver: tuple[Receiver, str],
) -> None:
    """A replica's ``x-kingpost-spans`` time past 2**64 - 1 failed OTLP's encoding of the
    whole export batch, so every model's spans in it were lost; a time outside the
    request's window is as wrong. Both steps are left out, and the rest goes."""

    class Replica(QuietHandler):
        def do_POST(self) -> None:
            kind = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            t0 = time.time_ns()
            steps = {
                b"good": f"predict={t0}-{time.time_ns()}",
                b"huge": "predict=1-99999999999999999999",
                b"old": f"predict={t0 - 3600 * 10**9}-{t0 - 3599 * 10**9}",
            }[kind]
            self.send_response(200)
            self.send_header("x-kingpost-spans", steps)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

    rec, url = receiver
    gw = RunningGateway(tracer=GatewayTracer(url + "/v1/traces"))
    try:
        with serving(Replica) as server:
            up = Upstream("d1-r0", "127.0.0.1", server.server_address[1])
            gw.table(DeploymentRoute("d1", "m1", "/x", DeploymentState.SERVING, (up,)))
            with httpx.Client(base_url=gw.url, headers=AUTH, timeout=10) as c:
                for rid, kind in (("s-1", b"good"), ("s-2", b"huge"), ("s-3", b"old")):
                    r = c.post(PREDICT, content=kind, headers={"X-Baseten-Request-Id": rid})
                    assert r.status_code == 200
        good = {s["name"]: s for s in _spans(rec, "s-1", 3)}
        assert good["model.predict"]["parent"] == good["gateway.upstream"]["span"]
        for rid in ("s-2", "s-3"):
            names = sorted(s["name"] for s in _spans(rec, rid, 2))
            assert names == ["gateway.request", "gateway.upstream"], (rid, names)
    finally:
        gw.close()


def test_the_endpoint_comes_from_the_standard_variables() -> None:
    assert traces_endpoint({}) is None
    assert traces_endpoint({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/"}) == (
        "http://c:4318/v1/traces"
    )
    assert traces_endpoint({"KINGPOST_TRACING_ENDPOINT": "http://k:4318"}) == (
        "http://k:4318/v1/traces"
    )
    full = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:1/x", "KINGPOST_TRACING_ENDPOINT": "y"}
    assert traces_endpoint(full) == "http://t:1/x"
    off = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"}
    assert traces_endpoint(off) is None


def test_off_imports_nothing_and_on_without_the_sdk_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The gateway process imports none of it; the control plane (whose FastAPI imports the
    # OpenTelemetry API when it is installed) none of the SDK or the exporter.
    code = (
        "import sys, kingpost.gateway.__main__\n"
        "print([m for m in sys.modules if m.startswith('opentelemetry')])\n"
        "import kingpost.serve\n"
        "print([m for m in sys.modules if m.startswith(('opentelemetry.sdk', "
        "'opentelemetry.exporter'))])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["[]", "[]"]
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)
    with pytest.raises(TracingUnavailable, match=r"kingpost\[tracing\]"):
        GatewayTracer("http://127.0.0.1:9/v1/traces")
    require_sdk("http://c:4318/v1/traces")  # installed here: no error
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http", None)
    with pytest.raises(TracingUnavailable, match=r"spans go to http://c:4318/v1/traces"):
        require_sdk("http://c:4318/v1/traces")
