"""`/metrics` of a real `kingpost server`: after a scripted sequence of requests through the
real gateway to a real replica, the scraped series equal what was sent, per label set."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers.platform import EXAMPLES, REPO, Platform, free_port, wait_for

MODEL = """
from prometheus_client import Counter

CALLS = Counter("echo_calls", "Calls the model got.")


class Model:
    def __init__(self, **kwargs):
        pass

    def load(self):
        pass

    def predict(self, model_input):
        CALLS.inc()
        if model_input.get("fail"):
            raise RuntimeError("asked to fail")
        if model_input.get("stream"):
            return (w + " " for w in str(model_input.get("text", "")).split())
        return {"echo": model_input.get("text", "")}
"""

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
FIXTURES = REPO / "tests" / "fixtures" / "models"


@pytest.fixture(scope="module")
def metrics_platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    home = tmp_path_factory.mktemp("kingpost-home")
    listen = f"127.0.0.1:{free_port()}"
    p = Platform(home, extra_env={"KINGPOST_METRICS_LISTEN": listen}).start()
    p.metrics_listen = listen  # type: ignore[attr-defined]
    try:
        yield p
    finally:
        p.stop()


def _samples(text: str) -> Samples:
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def _get(samples: Samples, name: str, **labels: str) -> float:
    """The one sample of ``name`` whose labels include ``labels`` (0 if none)."""
    want = set(labels.items())
    found = [v for (n, lab), v in samples.items() if n == name and want <= lab]
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else 0.0


def _push(platform: Platform, tmp_path: Path) -> None:
    project = tmp_path / "counted"
    (project / "model").mkdir(parents=True)
    (project / "config.yaml").write_text(
        "model_name: counted\nrequirements:\n  - prometheus_client\n"
        "runtime:\n  predict_concurrency: 4\n"
    )
    (project / "model" / "model.py").write_text(textwrap.dedent(MODEL))
    out = platform.cli("push", str(project), "--wait", "--output", "json")
    assert out.returncode == 0, out.stdout + out.stderr + platform.output()


def test_scraped_series_equal_the_requests_sent(metrics_platform: Platform, tmp_path: Path) -> None:
    p = metrics_platform
    _push(p, tmp_path)
    base = "/models/counted/environments/production"
    sent_in = 0
    with p.gateway() as gw:
        for i in range(3):
            body = json.dumps({"text": f"hello {i}"}).encode()
            sent_in += len(body)
            assert gw.post(f"{base}/predict", content=body).status_code == 200
        body = json.dumps({"text": "a b c", "stream": True}).encode()
        sent_in += len(body)
        with gw.stream("POST", f"{base}/predict", content=body) as resp:
            assert resp.status_code == 200
            assert b"".join(resp.iter_bytes()) == b"a b c "
        for _ in range(2):
            body = b'{"fail": true}'
            sent_in += len(body)
            assert gw.post(f"{base}/predict", content=body).status_code == 500
        assert gw.get(f"{base}/sync/no/such/path").status_code == 404
        assert gw.post("/models/nope/production/predict", json={}).status_code == 404

    key = {"Authorization": f"Api-Key {p.api_key}"}
    assert httpx.get(f"{p.api_url}/metrics").status_code == 401
    lab = {"model": "counted", "deployment": "deployment-1", "environment": "production"}

    seen: list[str] = []

    def settled() -> Samples | None:
        resp = httpx.get(f"{p.api_url}/metrics", headers=key, timeout=10)
        assert resp.status_code == 200, resp.text
        assert resp.headers["content-type"].startswith("text/plain; version=0.0.4")
        s = _samples(resp.text)
        total = _get(s, "kingpost_request_duration_seconds_count", **lab)
        seen.append(resp.text)
        return s if total == 7 else None

    try:
        s = wait_for(settled, 20, "7 answers in the scrape")
    except AssertionError:
        print(seen[-1] if seen else "")
        raise
    req = "kingpost_requests_total"
    assert _get(s, req, **lab, route="predict", code_class="2xx") == 4
    assert _get(s, req, **lab, route="predict", code_class="5xx") == 2
    assert _get(s, req, **lab, route="sync", code_class="4xx") == 1
    assert sum(v for (n, lab_), v in s.items() if n == req) == 7
    assert _get(s, "kingpost_upstream_duration_seconds_count", **lab) == 7
    assert _get(s, "kingpost_request_duration_seconds_bucket", **lab, le="+Inf") == 7
    assert _get(s, "kingpost_request_bytes_total", **lab) == sent_in
    assert _get(s, "kingpost_response_bytes_total", **lab) > 0
    assert _get(s, "kingpost_retries_total", **lab) == 0
    assert _get(s, "kingpost_requests_in_flight", **lab) == 0
    assert _get(s, "kingpost_replicas", **lab, state="ready") == 1
    assert _get(s, "kingpost_replica_starts_total", **lab) == 1
    assert _get(s, "kingpost_cold_starts_total", **lab) == 1
    assert _get(s, "kingpost_cold_start_duration_seconds_count", **lab) == 1
    assert _get(s, "kingpost_deployment_status", **lab, status="ACTIVE") == 1
    assert _get(s, "kingpost_reconcile_duration_seconds_count") > 0
    # The replica's own: the model's registry and the model server's counts, relabelled.
    assert _get(s, "kingpost_replica_scrape_ok", **lab) == 1
    assert _get(s, "echo_calls_total", **lab) == 6
    assert _get(s, "kingpost_model_requests_total", **lab, route="predict", status="200") == 4
    assert all(dict(lab_).get("replica") for (n, lab_), _ in s.items() if n == "echo_calls_total")

    # The same without a key on the address KINGPOST_METRICS_LISTEN names.
    listen = p.metrics_listen  # type: ignore[attr-defined]
    plain = httpx.get(f"http://{listen}/metrics", timeout=10)
    assert plain.status_code == 200
    assert _get(_samples(plain.text), req, **lab, route="sync", code_class="4xx") == 1
    assert httpx.get(f"http://{listen}/other", timeout=10).status_code == 404


def test_a_custom_servers_metrics_path_is_scraped_with_its_labels(
    metrics_platform: Platform, tmp_path: Path
) -> None:
    """``docker_server.kingpost_metrics_endpoint`` (Kingpost's extension): the custom server's
    own figures, from that path, in the control plane's scrape with the replica's labels."""
    p = metrics_platform
    project = tmp_path / "metrics_custom_server"
    shutil.copytree(FIXTURES / "metrics_custom_server", project)
    out = p.cli("push", str(project), "--wait", "--output", "json")
    assert out.returncode == 0, out.stdout + out.stderr + p.output()
    assert "kingpost_metrics_endpoint" not in out.stderr  # a known key: no warning
    with p.gateway() as gw:
        for _ in range(3):
            r = gw.post("/models/metrics-server/production/predict", json={})
            assert r.status_code == 200, r.text
    key = {"Authorization": f"Api-Key {p.api_key}"}
    s = _samples(httpx.get(f"{p.api_url}/metrics", headers=key, timeout=10).text)
    lab = {"model": "metrics-server", "deployment": "deployment-1", "environment": "production"}
    assert _get(s, "kingpost_replica_scrape_ok", **lab) == 1
    # Its own `model` label is kept as `exported_model`, beside the platform's.
    assert _get(s, "custom_predicts_total", **lab, exported_model="inner") == 3
    assert all(dict(l_).get("replica") for (n, l_), _ in s.items() if n == "custom_predicts_total")


def test_the_cli_prints_one_json_snapshot(metrics_platform: Platform, tmp_path: Path) -> None:
    """`kingpost metrics MODEL --environment ENV -o json`: the deployment's row, with the
    rate of requests sent while it measured."""
    p = metrics_platform
    with p.client() as c:
        if not any(m["name"] == "counted" for m in c.models()):
            _push(p, tmp_path)
    stop = threading.Event()

    def load() -> None:
        with p.gateway() as gw:
            while not stop.is_set():
                gw.post("/models/counted/environments/production/predict", json={"text": "x"})

    sender = threading.Thread(target=load)
    sender.start()
    try:
        out = p.cli(
            "metrics", "counted", "--environment", "production", "-o", "json", "--interval", "1"
        )
    finally:
        stop.set()
        sender.join()
    assert out.returncode == 0, out.stdout + out.stderr
    rows = json.loads(out.stdout)
    assert [(r["model"], r["deployment"], r["environment"]) for r in rows] == [
        ("counted", "deployment-1", "production")
    ]
    row = rows[0]
    assert row["requests_per_s"] > 0
    assert row["p50_s"] is not None and row["p99_s"] >= row["p50_s"]
    assert row["error_rate"] == 0
    assert (row["replicas_ready"], row["replicas"], row["queued"]) == (1, 1, 0)
    other = p.cli(
        "metrics", "counted", "--environment", "staging", "-o", "json", "--interval", "0.1"
    )
    assert other.returncode == 0 and json.loads(other.stdout) == []


DOCS = Path(__file__).resolve().parents[2] / "docs"
DURING_ROLLOUTS = frozenset({"kingpost_rollout_info", "kingpost_rollout_candidate_traffic_ratio"})
"""Series only a running rollout has (tests/unit/test_metrics_platform.py checks them)."""


def _tool(name: str) -> str:
    """The path of Debian's ``prometheus`` package's ``name``; skipped without it, except
    on CI, where the package is installed and a missing one is a failure."""
    found = shutil.which(name)
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true, but {name} is not installed (apt-get install prometheus)")
        pytest.skip(f"{name} is not installed here (apt-get install prometheus)")
    return found


def _ensure_model(p: Platform, tmp_path: Path) -> None:
    with p.client() as c:
        if not any(m["name"] == "counted" for m in c.models()):
            _push(p, tmp_path)
    with p.gateway() as gw:  # one answer, so every request series has a sample
        assert gw.post("/models/counted/production/predict", json={}).status_code == 200


def _dashboard_exprs() -> list[str]:
    dash = json.loads((DOCS / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dash["panels"] for t in panel["targets"]]
    exprs += [v["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    assert len(exprs) > 20
    return exprs


def test_the_dashboards_queries_name_series_of_a_real_scrape(
    metrics_platform: Platform, tmp_path: Path
) -> None:
    p = metrics_platform
    _ensure_model(p, tmp_path)
    key = {"Authorization": f"Api-Key {p.api_key}"}
    scraped = {n for n, _ in _samples(httpx.get(f"{p.api_url}/metrics", headers=key).text)}
    named = {n for e in _dashboard_exprs() for n in re.findall(r"\bkingpost_[a-z0-9_]+", e)}
    assert len(named) >= 15
    assert named - scraped == DURING_ROLLOUTS


def test_the_dashboards_queries_parse() -> None:
    """Each query as a recording rule, which ``promtool check rules`` parses as PromQL
    (Grafana's variables replaced by what they stand for)."""
    promtool = _tool("promtool")
    exprs = [
        e.replace("$__rate_interval", "1m").replace("$model", ".*").replace("$environment", ".*")
        for e in _dashboard_exprs()
        if not e.startswith("label_values(")  # Grafana's, not PromQL
    ]
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [{"record": f"q{i}", "expr": e} for i, e in enumerate(exprs)],
            }
        ]
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rules.yml"
        path.write_text(json.dumps(rules))  # JSON is YAML
        out = subprocess.run(
            [promtool, "check", "rules", str(path)], capture_output=True, text=True
        )
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in out.stdout + out.stderr


def _promtool_check(tmp_path: Path, config: str) -> None:
    """``promtool check config`` on ``config``, with the key file it names beside it."""
    (tmp_path / "prometheus.yml").write_text(config)
    (tmp_path / "kingpost-api-key").write_text("kp_example\n")
    out = subprocess.run(
        [_tool("promtool"), "check", "config", str(tmp_path / "prometheus.yml")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_accepts_the_scrape_config(tmp_path: Path) -> None:
    _promtool_check(tmp_path, (DOCS / "prometheus.yml").read_text())


def test_promtool_accepts_the_gateways_own_job_uncommented(tmp_path: Path) -> None:
    text = (DOCS / "prometheus.yml").read_text()
    job = text[text.index("#  - job_name: kingpost-gateway") :]
    text = text.replace(job, "\n".join(line[1:] for line in job.splitlines()) + "\n")
    _promtool_check(tmp_path, text)
    assert "kingpost-gateway" in text


def test_a_real_prometheus_scrapes_kingpost_with_the_documented_config(
    metrics_platform: Platform, tmp_path: Path
) -> None:
    """The scrape config from docs/ (its target and interval changed for the test) in a real
    Prometheus: the target is up and a query gives the gateway's count."""
    prometheus = _tool("prometheus")
    p = metrics_platform
    _ensure_model(p, tmp_path)
    config = (DOCS / "prometheus.yml").read_text()
    config = config.replace("127.0.0.1:8090", f"127.0.0.1:{p.api_port}")
    config = config.replace("scrape_interval: 15s", "scrape_interval: 1s")
    config = config.replace("scrape_timeout: 10s", "scrape_timeout: 1s")
    (tmp_path / "prometheus.yml").write_text(config)
    (tmp_path / "kingpost-api-key").write_text(p.api_key + "\n")
    port = free_port()
    proc = subprocess.Popen(
        [
            prometheus,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        key = {"Authorization": f"Api-Key {p.api_key}"}
        want = sum(
            v
            for (n, lab), v in _samples(httpx.get(f"{p.api_url}/metrics", headers=key).text).items()
            if n == "kingpost_requests_total" and dict(lab).get("model") == "counted"
        )
        query = 'sum(kingpost_requests_total{model="counted",environment="production"})'

        def answered() -> float | None:
            r = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": query})
            result = r.json()["data"]["result"]
            return float(result[0]["value"][1]) if result else None

        got = wait_for(answered, 30, "Prometheus to have scraped Kingpost")
        assert got == want
        up = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": "up"}).json()
        assert [r["value"][1] for r in up["data"]["result"]] == ["1"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_every_gateway_workers_answers_are_in_one_scrape(tmp_path: Path) -> None:
    """Two gateway workers (SO_REUSEPORT spreads connections over them): the control
    plane's scrape merges both, so one target counts every answer."""
    p = Platform(tmp_path / "home", extra_env={"KINGPOST_GATEWAY_WORKERS": "2"}).start()
    try:
        out = p.cli("push", str(EXAMPLES / "echo-model"), "--wait", "--output", "json")
        assert out.returncode == 0, out.stdout + out.stderr
        for i in range(20):  # a new connection each: the kernel picks a worker for each
            resp = httpx.post(
                f"{p.gateway_url}/models/echo-model/production/predict",
                json={"text": str(i)},
                headers={"Authorization": f"Api-Key {p.api_key}"},
            )
            assert resp.status_code == 200
        key = {"Authorization": f"Api-Key {p.api_key}"}
        s = _samples(httpx.get(f"{p.api_url}/metrics", headers=key, timeout=10).text)
        assert _get(s, "kingpost_gateway_workers") == 2
        lab = {"model": "echo-model", "environment": "production"}
        assert _get(s, "kingpost_requests_total", **lab, route="predict", code_class="2xx") == 20
    finally:
        p.stop()


def test_promtool_finds_nothing_to_lint_in_a_real_scrape(
    metrics_platform: Platform, tmp_path: Path
) -> None:
    """Names, types, units and help lines as Prometheus's own linter wants them."""
    promtool = _tool("promtool")
    p = metrics_platform
    _ensure_model(p, tmp_path)
    key = {"Authorization": f"Api-Key {p.api_key}"}
    text = httpx.get(f"{p.api_url}/metrics", headers=key, timeout=10).text
    out = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert out.returncode == 0 and not out.stdout.strip(), out.stdout + out.stderr
