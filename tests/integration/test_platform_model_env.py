"""What a model class imports, through the whole platform: Truss's server packages
without listing them, none of Kingpost's own; and the offline setting."""

from __future__ import annotations

import sys
from pathlib import Path

from helpers.platform import Platform

MODEL = """
import importlib.util, sys


class Model:
    def predict(self, model_input):
        import numpy, requests, opentelemetry.sdk.trace
        return {"numpy": numpy.__version__, "prefix": sys.prefix,
                "sqlalchemy": importlib.util.find_spec("sqlalchemy") is not None}
"""


def _project(tmp_path: Path, name: str, requirements: str = "[]") -> Path:
    app = tmp_path / name
    (app / "model").mkdir(parents=True)
    (app / "config.yaml").write_text(f"model_name: {name}\nrequirements: {requirements}\n")
    (app / "model" / "model.py").write_text(MODEL)
    return app


def _push(platform: Platform, app: Path, *statuses: str) -> dict[str, object]:
    with platform.client() as c:
        dep = c.push(app)["deployment"]
    return platform.wait_status(dep["id"], *(statuses or ("ACTIVE",)), timeout=300)


def _build_lines(platform: Platform, dep_id: str) -> list[str]:
    with platform.client() as c:
        return [line["text"] for line in c.logs(dep_id, 2000)]


def test_a_model_sees_truss_server_packages_and_not_kingposts(
    platform: Platform, tmp_path: Path
) -> None:
    first = _push(platform, _project(tmp_path, "base-a"))
    second = _push(platform, _project(tmp_path, "base-b"))
    with platform.gateway() as gw:
        r = gw.post("/models/base-b/production/predict", json={})
    assert r.status_code == 200, r.text
    assert r.json()["numpy"].startswith("1.") and r.json()["sqlalchemy"] is False
    # The second prepared without building anything: same base, same (empty) layer.
    assert any(
        line.startswith("base environment ") for line in _build_lines(platform, str(first["id"]))
    )
    lines = _build_lines(platform, str(second["id"]))
    assert any(line.startswith("base environment ") and ": reused" in line for line in lines)
    assert any(line.startswith("reusing environment ") for line in lines)
    assert not any("building" in line for line in lines), lines


def test_server_python_runs_with_the_servers_interpreter_or_names_what_is_missing(
    tmp_path: Path,
) -> None:
    platform = Platform(tmp_path / "home", extra_env={"KINGPOST_MODEL_ENV": "server-python"})
    platform.start()
    try:
        _push(platform, _project(tmp_path, "offline-ok", '["httpx>=0.20"]'))
        with platform.gateway() as gw:
            r = gw.post("/models/offline-ok/production/predict", json={})
        assert r.status_code == 200, r.text
        assert r.json()["prefix"] == sys.prefix  # the server's own venv: nothing built
        assert not (platform.home / "envs").exists()
        failed = _push(
            platform,
            _project(tmp_path, "offline-missing", '["kingpost-no-such-package>=2"]'),
            "BUILD_FAILED",
        )
        message = str(failed["message"])
        assert "kingpost-no-such-package (>=2): not installed" in message, message
        assert "KINGPOST_MODEL_ENV=server-python" in message
    finally:
        platform.stop()


def test_a_base_in_the_home_is_seen_by_an_isolated_replica(tmp_path: Path) -> None:
    """Isolated replicas see the home only where it is lent to them (engines/_view.py):
    the default base directory, ``{home}/envs/_base``, must be among those."""
    home = tmp_path / "home"
    platform = Platform(home, extra_env={"KINGPOST_BASE_ENVS_DIR": str(home / "envs" / "_base")})
    platform.start()
    try:
        _push(platform, _project(tmp_path, "base-in-home"))
        with platform.gateway() as gw:
            r = gw.post("/models/base-in-home/production/predict", json={})
        assert r.status_code == 200, r.text
        assert r.json()["numpy"].startswith("1.")
        assert any((home / "envs" / "_base").glob("[0-9a-f]*/kingpost-base.json"))
    finally:
        platform.stop()


TRACED = """
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

spans = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(spans))
tracer = provider.get_tracer("user-model")


class Model:
    @tracer.start_as_current_span("load_model")
    def load(self):
        pass

    def predict(self, model_input):
        if model_input.get("spans"):
            return sorted(s.name for s in spans.get_finished_spans())

        def chunks():
            with tracer.start_as_current_span("predict") as span:
                for i in range(5):
                    span.add_event("yield")
                    yield str(i)

        return chunks()
"""


def test_a_streaming_model_traces_with_the_opentelemetry_sdk_unlisted(
    platform: Platform, tmp_path: Path
) -> None:
    """As Truss's ``test_streaming_truss_with_tracing`` project: ``requirements: []`` and
    its own spans through the OpenTelemetry SDK, which Truss's server set provides."""
    app = _project(tmp_path, "traced")
    (app / "model" / "model.py").write_text(TRACED)
    _push(platform, app)
    with platform.gateway() as gw:
        r = gw.post("/models/traced/production/predict", json={})
        assert r.status_code == 200 and r.text == "01234", r.text
        assert r.headers.get("transfer-encoding") == "chunked"
        r = gw.post("/models/traced/production/predict", json={"spans": True})
    assert r.json() == ["load_model", "predict"]
