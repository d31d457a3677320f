"""The web console in-process (FastAPI TestClient over the real API app and SQLite):
sessions, CSRF, sign-in and sign-out, and that actions go through the API's own rules."""

from __future__ import annotations

import html as html_text
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from kingpost.api import ControlPlane, create_app
from kingpost.console.sessions import ConsoleSessions, csrf_matches
from kingpost.console.web import _safe_next
from kingpost.controller.loop import Controller
from kingpost.serve import bootstrap
from kingpost.settings import Settings
from kingpost.store import NewDeployment, Store
from kingpost.store.models import ConsoleSession


@dataclass
class Console:
    client: TestClient
    key: str
    store: Store
    settings: Settings


@pytest.fixture
def console(tmp_path: Path) -> Iterator[Console]:
    settings = Settings(home=tmp_path / "home")
    store = bootstrap(settings, lambda _: None, show_key=False)
    key = (settings.home / "credentials").read_text().strip()
    plane = ControlPlane(settings, store, Controller(settings, store))
    with TestClient(create_app(plane)) as client:
        yield Console(client, key, store, settings)


def _csrf(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, html
    return found.group(1)


def sign_in(c: Console, key: str | None = None) -> str:
    """Sign in through the form; the page's CSRF token."""
    page = c.client.get("/console/sign-in")
    r = c.client.post(
        "/console/sign-in",
        data={"csrf": _csrf(page.text), "api_key": key or c.key, "next": "/console/"},
        follow_redirects=False,
    )
    assert r.status_code == 303, r.text
    return _csrf(c.client.get("/console/secrets").text)


def test_root_and_pages_lead_to_sign_in_without_a_session(console: Console) -> None:
    r = console.client.get("/", follow_redirects=True)
    assert r.url.path == "/console/sign-in"
    r = console.client.get("/console/secrets", follow_redirects=False)
    assert r.status_code == 303
    assert r.headers["location"] == "/console/sign-in?next=/console/secrets"
    # A page's script polling with no session learns where to sign in, as JSON.
    r = console.client.get("/console/data/models", headers={"X-Requested-With": "fetch"})
    assert r.status_code == 401 and r.json()["sign_in"].startswith("/console/sign-in")


def test_sign_in_gives_an_http_only_strict_cookie_and_never_the_key(console: Console) -> None:
    page = console.client.get("/console/sign-in")
    r = console.client.post(
        "/console/sign-in",
        data={"csrf": _csrf(page.text), "api_key": console.key, "next": "/console/secrets"},
        follow_redirects=False,
    )
    assert r.status_code == 303 and r.headers["location"] == "/console/secrets"
    cookie = next(c for c in r.headers.get_list("set-cookie") if c.startswith("kingpost_console="))
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/console" in cookie
    assert "Secure" not in cookie  # plain http here; over TLS it is set
    assert console.key not in cookie and console.key not in r.text
    session_id = cookie.split(";")[0].split("=", 1)[1]
    page = console.client.get("/console/")
    assert console.key not in page.text and "Sign out" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["cache-control"] == "no-store"
    with console.store.db.session() as s:  # the database holds a hash, and the key sealed
        row = s.scalars(select(ConsoleSession)).one()
        assert row.id_hash != session_id and session_id not in row.id_hash
        assert console.key.encode() not in row.key_ciphertext


def test_a_wrong_key_and_an_invoke_key_are_refused_with_the_apis_message(
    console: Console,
) -> None:
    page = console.client.get("/console/sign-in")
    r = console.client.post(
        "/console/sign-in", data={"csrf": _csrf(page.text), "api_key": "kp_wrong"}
    )
    assert r.status_code == 401 and "Sign-in refused: unknown API key" in r.text
    console.store.create_deployment(
        NewDeployment(model_name="m", project_hash="a" * 64, config={}, engine="process")
    )
    _, invoke = console.store.create_api_key("caller", "invoke", ["m"])  # type: ignore[arg-type]
    r = console.client.post("/console/sign-in", data={"csrf": _csrf(r.text), "api_key": invoke})
    assert r.status_code == 403 and "is invoke-only" in r.text
    assert console.client.get("/console/", follow_redirects=False).status_code == 303


def test_sign_in_without_its_csrf_token_is_refused(console: Console) -> None:
    console.client.get("/console/sign-in")
    r = console.client.post("/console/sign-in", data={"csrf": "forged", "api_key": console.key})
    assert r.status_code == 403 and "CSRF" in r.text
    assert console.client.get("/console/", follow_redirects=False).status_code == 303


def test_state_changes_need_the_sessions_csrf_token(console: Console) -> None:
    token = sign_in(console)
    for data in ({"name": "tok", "value": "v"}, {"name": "tok", "value": "v", "csrf": "x"}):
        r = console.client.post("/console/secrets", data=data)
        assert r.status_code == 403 and "CSRF" in r.text
    assert console.store.list_secrets() == []
    r = console.client.post(
        "/console/secrets", data={"name": "tok", "value": "v-9931", "csrf": token}
    )
    assert r.status_code == 200 and "secret tok set" in r.text and "v-9931" not in r.text
    assert [s.name for s in console.store.list_secrets()] == ["tok"]
    # The playground's fetch carries the token in a header; without it nothing is sent.
    r = console.client.post("/console/models/m/deployments/d/predict", json={})
    assert r.status_code == 403


def test_a_bad_secret_name_shows_the_apis_message_beside_the_field(console: Console) -> None:
    token = sign_in(console)
    r = console.client.post(
        "/console/secrets", data={"name": "bad name!", "value": "hidden-77", "csrf": token}
    )
    assert r.status_code == 400
    error = re.search(r'id="secret-name-error">([^<]+)<', r.text)
    assert error and "bad name!" in error.group(1)
    assert 'value="bad name!"' in r.text and "hidden-77" not in r.text


def test_autoscaling_form_shows_the_apis_validation_beside_the_field(console: Console) -> None:
    console.store.create_deployment(
        NewDeployment(model_name="m", project_hash="a" * 64, config={}, engine="process")
    )
    token = sign_in(console)
    url = "/console/models/m/environments/production/autoscaling"
    r = console.client.post(url, data={"csrf": token, "min_replica": "two", "max_replica": "3"})
    assert r.status_code == 400
    assert re.search(r'id="as-min_replica-error">[^<]*valid integer[^<]*two', r.text), r.text
    assert 'value="two"' in r.text and 'value="3"' in r.text  # nothing typed is lost
    r = console.client.post(url, data={"csrf": token, "min_replica": "0", "max_replica": "3"})
    assert r.status_code == 200, r.text
    env = console.store.get_environment("m", "production")
    assert env.autoscaling_settings and env.autoscaling_settings["max_replica"] == 3


def test_an_action_the_api_refuses_shows_its_message(console: Console) -> None:
    dep = console.store.create_deployment(
        NewDeployment(model_name="m", project_hash="a" * 64, config={}, engine="process")
    )
    token = sign_in(console)
    r = console.client.post(f"/console/models/m/deployments/{dep.id}/delete", data={"csrf": token})
    assert r.status_code == 409 and "production" in r.text  # the API's own refusal
    assert console.store.get_deployment(dep.id).desired_state == "active"
    r = console.client.post(
        f"/console/models/m/deployments/{dep.id}/promote",
        data={"csrf": token, "environment": "Bad Env"},
    )
    assert r.status_code == 400 and "Bad Env" in r.text


def test_sign_out_ends_the_session_at_once_and_a_restart_keeps_it(
    console: Console, tmp_path: Path
) -> None:
    token = sign_in(console)
    cookie = console.client.cookies.get("kingpost_console")
    # Another app over the same database (a restarted control plane) knows the session.
    settings, store = console.settings, console.store
    plane = ControlPlane(settings, store, Controller(settings, store))
    with TestClient(create_app(plane)) as other:
        other.cookies.set("kingpost_console", cookie or "", path="/console")
        assert other.get("/console/secrets", follow_redirects=False).status_code == 200
    r = console.client.post("/console/sign-out", data={"csrf": token}, follow_redirects=False)
    assert r.status_code == 303
    console.client.cookies.set("kingpost_console", cookie or "", path="/console")
    assert console.client.get("/console/", follow_redirects=False).status_code == 303


def test_a_revoked_key_ends_its_sessions(console: Console) -> None:
    _, second = console.store.create_api_key("second")
    sign_in(console, second)
    assert console.client.get("/console/", follow_redirects=False).status_code == 200
    console.store.revoke_api_key(second[:12])
    r = console.client.get("/console/", follow_redirects=False)
    assert r.status_code == 303 and "/console/sign-in" in r.headers["location"]
    with console.store.db.session() as s:
        assert s.scalars(select(ConsoleSession)).all() == []


def test_sessions_expire_and_end(console: Console) -> None:
    now = [datetime(2026, 1, 1, tzinfo=UTC)]
    sessions = ConsoleSessions(console.store.db, console.store.box, 60, now=lambda: now[0])
    sid, info = sessions.create("kp_thekey", "kp_thekey")
    got = sessions.get(sid)
    assert got is not None and got.api_key == "kp_thekey" and got.csrf_token == info.csrf_token
    assert sessions.get(sid + "x") is None and sessions.get(None) is None
    now[0] += timedelta(seconds=59)
    assert sessions.get(sid) is not None
    now[0] += timedelta(seconds=1)
    assert sessions.get(sid) is None  # expired at its ttl, and its row removed
    sid2, _ = sessions.create("kp_other", "kp_other")
    sessions.end(sid2)
    assert sessions.get(sid2) is None


def test_csrf_and_next_checks() -> None:
    assert csrf_matches("abc", "abc")
    assert not csrf_matches("abc", "abd") and not csrf_matches("abc", None)
    assert not csrf_matches("", "")
    assert _safe_next("/console/models/m") == "/console/models/m"
    for bad in ("https://evil.example/", "//evil.example/console/", "/console//x", "/v1/x", None):
        assert _safe_next(bad) == "/console/"


def test_figures_sum_a_models_and_a_deployments_counters() -> None:
    from kingpost.console.figures import totals, totals_by_model
    from kingpost.metrics.summary import parse

    text = "\n".join(
        [
            "# TYPE kingpost_requests_total counter",
            'kingpost_requests_total{model="m",deployment="a",environment="",code_class="2xx"} 5',
            'kingpost_requests_total{model="m",deployment="a",environment="",code_class="5xx"} 2',
            'kingpost_requests_total{model="m",deployment="b",environment="",code_class="2xx"} 3',
            'kingpost_requests_total{model="n",deployment="a",environment="",code_class="2xx"} 9',
            "# TYPE kingpost_replicas gauge",
            'kingpost_replicas{model="m",deployment="a",environment="",state="ready"} 2',
            'kingpost_replicas{model="m",deployment="a",environment="",state="starting"} 1',
            "# TYPE kingpost_request_duration_seconds histogram",
            'kingpost_request_duration_seconds_bucket{model="m",deployment="a",le="0.1"} 4',
            'kingpost_request_duration_seconds_bucket{model="m",deployment="a",le="+Inf"} 7',
            'kingpost_request_duration_seconds_count{model="m",deployment="a"} 7',
            'kingpost_request_duration_seconds_sum{model="m",deployment="a"} 1.0',
            "",
        ]
    )
    samples = parse(text)
    a = totals(samples, "m", "a").to_json()
    assert (a["requests"], a["errors"], a["ready"]) == (7, 2, 2)
    assert a["buckets"] == [[0.1, 4], [None, 7]]  # +Inf as null: JSON has no infinity
    assert totals(samples, "m").requests == 10
    assert {k: v.requests for k, v in totals_by_model(samples).items()} == {"m": 10, "n": 9}


def test_a_deployment_page_shows_its_config_from_the_api_escaped(console: Console) -> None:
    config = {"model_name": "m", "model_metadata": {"note": "<script>alert(1)</script>"}}
    dep = console.store.create_deployment(
        NewDeployment(model_name="m", project_hash="a" * 64, config=config, engine="process")
    )
    r = console.client.get(
        f"/v1/models/m/deployments/{dep.id}/config",
        headers={"Authorization": f"Api-Key {console.key}"},
    )
    assert r.status_code == 200 and r.json() == config
    sign_in(console)
    html = console.client.get(f"/console/models/m/deployments/{dep.id}").text
    assert '<span class="k">model_metadata</span>:' in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "<script>alert" not in html
    assert "No replica runs now." in html  # nothing runs it: the replicas route is empty


def test_api_keys_are_shown_once_and_the_last_admin_key_is_kept(console: Console) -> None:
    token = sign_in(console)
    r = console.client.post(
        "/console/api-keys", data={"csrf": token, "name": "ci", "type": "WORKSPACE_MANAGE_ALL"}
    )
    assert r.status_code == 201
    created = re.search(r"(kp_[A-Za-z0-9_-]{20,})", r.text)
    assert created and console.store.find_api_key(created.group(1)) is not None
    assert created.group(1) not in console.client.get("/console/api-keys").text
    r = console.client.post(
        "/console/api-keys", data={"csrf": token, "name": "x", "type": "WORKSPACE_INVOKE"}
    )
    assert r.status_code == 400 and 'id="key-models-error"' in r.text  # the API's rule
    own = console.key[:12]
    console.store.revoke_api_key(created.group(1)[:12])
    r = console.client.post(f"/console/api-keys/{own}/revoke", data={"csrf": token})
    assert r.status_code == 409 and "last admin key" in r.text


def test_promotion_settings_form_keeps_what_was_typed_and_names_the_rule(
    console: Console,
) -> None:
    console.store.create_deployment(
        NewDeployment(model_name="m", project_hash="a" * 64, config={}, engine="process")
    )
    token = sign_in(console)
    url = "/console/models/m/environments/production/promotion"
    r = console.client.post(url, data={"csrf": token, "rolling_deploy": "on"})
    assert r.status_code == 400
    assert re.search(r'id="pr-max_surge_percent-error">[^<]*exactly one', r.text), r.text
    assert re.search(r'id="pr-rolling_deploy" name="rolling_deploy" checked', r.text)
    r = console.client.post(url, data={"csrf": token, "ready_timeout_seconds": "soon"})
    assert r.status_code == 400 and 'value="soon"' in r.text
    assert re.search(r'id="pr-ready_timeout_seconds-error">[^<]*soon', r.text), r.text
    r = console.client.post(
        url, data={"csrf": token, "rolling_deploy": "on", "max_surge_percent": "50"}
    )
    assert r.status_code == 200, r.text
    stored = console.store.get_environment("m", "production").promotion_settings
    assert stored["rolling_deploy"] is True
    assert stored["rolling_deploy_config"]["max_surge_percent"] == 50


def test_rename_and_labels_go_through_the_api_and_keep_what_was_typed(console: Console) -> None:
    dep = console.store.create_deployment(
        NewDeployment(
            model_name="m", project_hash="a" * 64, config={}, engine="process", name="old"
        )
    )
    other = console.store.create_deployment(
        NewDeployment(model_name="m", project_hash="a" * 64, config={}, engine="process")
    )
    token = sign_in(console)
    html = console.client.get("/console/models/m").text
    assert f'id="labels-{dep.id}" name="labels" value="{{}}"' in html
    url = f"/console/models/m/deployments/{dep.id}/edit"
    r = console.client.post(url, data={"csrf": token, "name": other.name, "labels": "{}"})
    assert r.status_code == 409
    assert f"deployment name {other.name!r} is taken" in html_text.unescape(r.text)
    r = console.client.post(url, data={"csrf": token, "name": "new", "labels": "team=ml"})
    assert r.status_code == 400 and "valid dictionary" in r.text
    assert 'value="team=ml"' in r.text  # what was typed stays in the form
    r = console.client.post(url, data={"csrf": token, "name": "new", "labels": '{"t": "a\\"b"}'})
    assert r.status_code == 200, r.text
    view = console.store.get_deployment(dep.id)
    assert (view.name, view.labels) == ("new", {"t": 'a"b'})
    assert view.updated_at == dep.updated_at  # nothing that runs changed
    assert 'value="{&#34;t&#34;: &#34;a\\&#34;b&#34;}"' in r.text  # quotes escaped


def test_the_read_through_answers_only_api_gets(console: Console) -> None:
    sign_in(console)
    assert console.client.get("/console/data/models").json() == {"models": []}
    r = console.client.get("/console/data/models/%2E%2E/%2E%2E/metrics")
    assert r.status_code == 400 and "'..'" in r.json()["error"]
    assert console.client.get("/console/data/nothing-here").status_code == 404
    r = console.client.post("/console/data/secrets", json={"name": "x", "value": "y"})
    assert r.status_code == 405 and console.store.list_secrets() == []


def test_a_rollout_in_progress_shows_with_its_controls(console: Console) -> None:
    from kingpost.store import DeploymentStatus

    new = NewDeployment(model_name="m", project_hash="a" * 64, config={}, engine="process")
    first = console.store.create_deployment(new)
    console.store.set_status(first.id, DeploymentStatus.ACTIVE)
    second = console.store.create_deployment(new)
    console.store.promote("m", second.id, "production")  # production serves: a rollout
    token = sign_in(console)
    page = console.client.get("/console/models/m/environments/production").text
    assert "Promotion in_progress" in page or "Promotion pending" in page, page
    for label in ("Pause", "Resume", "Cancel", "Force complete"):
        assert f">{label}</button>" in page
    base = "/console/models/m/environments/production/rollout"
    r = console.client.post(f"{base}/resume", data={"csrf": token})
    assert r.status_code == 409  # the API's refusal: nothing paused to resume
    r = console.client.post(f"{base}/cancel", data={"csrf": token})
    assert r.status_code == 200 and "cancel: requested" in r.text
    rollout = console.store.latest_rollout("m", "production")
    assert rollout is not None and rollout.requested == "cancel"
    assert console.client.post(f"{base}/explode", data={"csrf": token}).status_code == 404


def test_deleting_a_model_names_what_goes_first(console: Console) -> None:
    new = NewDeployment(model_name="m", project_hash="a" * 64, config={}, engine="process")
    console.store.create_deployment(new)
    token = sign_in(console)
    page = console.client.get("/console/models/m/delete").text
    assert "Delete model m?" in page and "1 deployment(s) (deployment-1)" in page
    assert console.client.post("/console/models/m/delete", data={}).status_code == 403
    r = console.client.post("/console/models/m/delete", data={"csrf": token})
    assert r.status_code == 200 and "model m deleted" in r.text
    assert console.store.list_models() == []


def test_a_form_posted_after_the_session_ended_signs_in_back_to_its_page(
    console: Console,
) -> None:
    """`next` was the form's action, a POST route: after sign-in the browser GOT it, 405."""
    console.store.create_deployment(
        NewDeployment(model_name="m", project_hash="a" * 64, config={}, engine="process")
    )
    page = "/console/models/m"
    r = console.client.post(
        "/console/models/m/deployments/deployment-1/activate",
        data={"csrf": "x"},
        headers={"Referer": f"http://testserver{page}"},
        follow_redirects=False,
    )
    assert r.status_code == 303 and r.headers["location"] == f"/console/sign-in?next={page}"
    # From another site, or without a Referer: the console's start page.
    for referer in ({"Referer": "http://elsewhere.example/console/models/m"}, {}):
        r = console.client.post(
            "/console/sign-out", data={}, headers=referer, follow_redirects=False
        )
        assert r.headers["location"] == "/console/sign-in?next=/console/"


def test_odd_input_gets_a_message_not_a_500(console: Console) -> None:
    page = console.client.get("/console/sign-in")
    r = console.client.post(
        "/console/sign-in", data={"csrf": _csrf(page.text), "api_key": "kp_\u00e9t\u00e9"}
    )
    assert r.status_code == 400 and "ASCII" in r.text
    console.store.create_deployment(
        NewDeployment(model_name="m", project_hash="a" * 64, config={}, engine="process")
    )
    token = sign_in(console)
    url = "/console/models/m/environments/production/autoscaling"
    r = console.client.post(url, data={"csrf": token, "min_replica": "\u00b2"})
    assert r.status_code == 400 and "min_replica" in r.text, r.text
    # A query parameter named like the reader's own argument is passed on, not a crash.
    r = console.client.get("/console/data/models", params={"path": "x"})
    assert r.status_code == 200 and r.json() == {"models": [{**r.json()["models"][0]}]}


def test_the_playground_answers_502_when_the_gateway_cannot_be_reached(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home", gateway_port=1)  # nothing listens there
    store = bootstrap(settings, lambda _: None, show_key=False)
    key = (settings.home / "credentials").read_text().strip()
    plane = ControlPlane(settings, store, Controller(settings, store))
    with TestClient(create_app(plane)) as client:
        console = Console(client, key, store, settings)
        token = sign_in(console)
        r = console.client.post(
            "/console/models/m/deployments/d/predict", json={}, headers={"X-CSRF-Token": token}
        )
    assert r.status_code == 502 and "cannot reach the gateway" in r.json()["error"], r.text


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("0.0.0.0", "http://127.0.0.1:8080"),
        ("", "http://127.0.0.1:8080"),
        ("::", "http://[::1]:8080"),
        ("::1", "http://[::1]:8080"),
        ("10.0.0.5", "http://10.0.0.5:8080"),
    ],
)
def test_the_gateway_is_reached_on_a_connectable_address(
    tmp_path: Path, host: str, url: str
) -> None:
    """The console's playground and the async workers connect where the gateway listens:
    a wildcard is not an address to connect to (`http://:::8080` was not even a URL)."""
    assert Settings(home=tmp_path, gateway_host=host, gateway_port=8080).gateway_local_url == url
