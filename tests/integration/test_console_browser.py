"""The web console in a real headless Chromium (Playwright, Debian's /usr/bin/chromium)
against one real `kingpost server` on the process engine.

One server and one browser for the module; the tests run in order and build on each
other (sign in, set the secret the model needs, push, promote, ...), as a user would.
Each main page is checked with axe-core (serious and critical violations fail) and
photographed into the test's tmp dir, and into ``$KINGPOST_CONSOLE_SCREENSHOTS`` when
set (``docs/screenshots/`` is refreshed that way).
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import sync_playwright

from helpers.platform import REPO, Platform, wait_answer

CHROMIUM = Path("/usr/bin/chromium")
FIXTURE = REPO / "tests" / "fixtures" / "models" / "logs_secret"
STREAM = REPO / "tests" / "fixtures" / "models" / "console_stream"
AXE = REPO / "tests" / "vendor" / "axe-core" / "axe.min.js"
SECRET = "console-PLANTED-secret-4412"
if not CHROMIUM.exists():
    if os.environ.get("CI") == "true":
        raise RuntimeError(f"CI=true but {CHROMIUM} is missing: apt-get install chromium")
    pytest.skip("needs Debian's chromium at /usr/bin/chromium", allow_module_level=True)


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    p = Platform(tmp_path_factory.mktemp("console-home")).start()
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture(scope="module")
def page(platform: Platform) -> Iterator[Any]:
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM),
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        # bypass_csp: only so the test can inject axe-core; the console's own CSP stays.
        context = browser.new_context(
            base_url=platform.api_url, viewport={"width": 1280, "height": 860}, bypass_csp=True
        )
        context.set_default_timeout(20_000)
        pg = context.new_page()
        try:
            yield pg
        finally:
            context.close()
            browser.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    dirs = [tmp_path_factory.mktemp("console-screenshots")]
    if os.environ.get("KINGPOST_CONSOLE_SCREENSHOTS"):
        dirs.append(Path(os.environ["KINGPOST_CONSOLE_SCREENSHOTS"]))
    return dirs


@pytest.fixture(scope="module")
def state() -> dict[str, Any]:
    return {}


def check_page(page: Any, shots: list[Path], name: str) -> None:
    """axe-core in the page: no serious or critical violation; then a screenshot."""
    page.add_script_tag(path=str(AXE))
    result = page.evaluate("async () => await axe.run(document)")
    bad = [
        f"{v['id']} ({v['impact']}): {v['help']} at {[n['target'] for n in v['nodes']][:3]}"
        for v in result["violations"]
        if v["impact"] in ("serious", "critical")
    ]
    assert not bad, f"{name}: {bad}"
    for d in shots:
        d.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(d / f"{name}.png"), full_page=True)


def sign_in(page: Any, key: str) -> None:
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()


def test_a_wrong_key_is_refused_then_the_right_one_signs_in(
    page: Any, platform: Platform, shots: list[Path]
) -> None:
    page.goto("/")
    assert page.url.endswith("/console/sign-in?next=/console/")
    check_page(page, shots, "sign-in")
    sign_in(page, "kp_not-a-key")
    alert = page.get_by_role("alert")
    assert "unknown API key" in alert.inner_text()
    assert page.get_by_label("API key").input_value() == ""  # the key is not sent back
    # By keyboard: the key field has the focus again, Enter submits.
    page.keyboard.type(platform.api_key)
    page.keyboard.press("Enter")
    page.get_by_role("heading", name="Models").wait_for()
    assert platform.api_key not in page.content()
    assert page.evaluate("() => document.cookie") == ""  # HttpOnly: no script sees it
    storage = page.evaluate("() => JSON.stringify([localStorage, sessionStorage])")
    assert platform.api_key not in storage and storage == "[{},{}]"


def test_a_secret_set_here_is_nowhere_in_the_page(page: Any, shots: list[Path]) -> None:
    page.get_by_role("link", name="Secrets").click()
    page.get_by_label("Name").fill("token")
    page.get_by_label("Value").fill(SECRET)
    page.get_by_role("button", name="Set secret").click()
    page.get_by_text("secret token set").wait_for()
    assert page.get_by_role("cell", name="token", exact=True).count() == 1
    assert SECRET not in page.content()
    check_page(page, shots, "secrets")
    page.reload()
    assert SECRET not in page.content()


def test_a_change_without_the_csrf_token_is_refused(page: Any, platform: Platform) -> None:
    # The browser's own cookie, a form post without the token: refused, nothing set.
    r = page.request.post("/console/secrets", form={"name": "forged", "value": "x"})
    assert r.status == 403 and "CSRF" in r.text()
    with platform.client() as c:
        assert [s["name"] for s in c.secrets()] == ["token"]


def test_a_pushed_model_shows_with_its_environment(
    page: Any, platform: Platform, shots: list[Path], state: dict[str, Any]
) -> None:
    with platform.client() as c:
        first = c.push(FIXTURE)
        second = c.push(FIXTURE, deployment_name="blue", labels={"team": "ml"})
        stream = c.push(STREAM)
    state.update(
        model=first["model"]["id"],
        first=first["deployment"],
        second=second["deployment"],
        stream=stream,
    )
    for pushed in (first, second, stream):
        platform.wait_status(pushed["deployment"]["id"], "ACTIVE", timeout=120)
    page.get_by_role("link", name="Models").click()
    row = page.get_by_role("row", name=re.compile("logs-secret"))
    assert "production" in row.inner_text() and "deployment-1" in row.inner_text()
    # The server sampled its figures when it started: counts run from that sample.
    assert re.search(r"since \d\d:\d\d UTC", page.locator("#figures-since").inner_text())
    check_page(page, shots, "models")


def test_promote_and_watch_the_environment_change(
    page: Any, shots: list[Path], state: dict[str, Any]
) -> None:
    page.get_by_role("link", name="logs-secret").click()
    env_cell = page.locator('[data-env-deployment="production"]')
    assert env_cell.inner_text() == "deployment-1"
    blue = page.locator(f"#dep-{state['second']['id']}")
    blue.get_by_role("button", name="Promote").click()
    page.get_by_text("promote: blue done").wait_for()
    # The environment moves once the rollout completes; the page polls and shows it.
    page.wait_for_function(
        "() => document.querySelector('[data-env-deployment=\"production\"]')"
        ".textContent.trim() === 'blue'",
        timeout=60_000,
    )
    check_page(page, shots, "model")
    page.set_viewport_size({"width": 390, "height": 844})  # a phone: nothing runs off
    try:
        assert page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth")
        check_page(page, shots, "model-phone")
    finally:
        page.set_viewport_size({"width": 1280, "height": 860})


def test_deactivate_and_its_route_answers_404(
    page: Any, platform: Platform, state: dict[str, Any]
) -> None:
    first = state["first"]
    card = page.locator(f"#dep-{first['id']}")
    card.get_by_role("button", name="Deactivate").click()
    page.get_by_text("deactivate: deployment-1 done").wait_for()
    path = f"/models/{state['model']}/deployment/{first['id']}/predict"
    with platform.gateway() as gw:
        wait_answer(gw, path, 404, {"n": 1}, timeout=30)
    page.locator(f'[data-dep-status="{first["id"]}"]').get_by_text("INACTIVE").wait_for()


def test_the_model_page_follows_a_change_made_elsewhere(
    page: Any, platform: Platform, state: dict[str, Any]
) -> None:
    """The page's polls, not a reload, show it: the post/redirect/get of the tests above
    draws the new state anyway, so a poll that failed on every tick went unseen."""
    first = state["first"]
    url = page.url
    with platform.client() as c:
        c.deployment_action(state["model"], first["id"], "activate")
    cell = f'[data-dep-status="{first["id"]}"]'
    page.wait_for_function(
        f"() => document.querySelector('{cell}').textContent.trim() !== 'INACTIVE'",
        timeout=30_000,
    )
    assert page.url == url  # the same page, updated in place


def test_playground_and_following_logs(
    page: Any, platform: Platform, shots: list[Path], state: dict[str, Any]
) -> None:
    page.get_by_role("link", name="blue").click()
    page.get_by_role("heading", name="Playground").wait_for()
    # Its one replica, as the API's replicas route lists it.
    replicas = page.locator("section[aria-labelledby='replicas-h'] tbody tr")
    assert replicas.count() == 1 and "READY" in replicas.first.inner_text()
    page.get_by_label("Request body (JSON)").fill('{"n": 7}')
    page.get_by_role("button", name="Send").click()
    page.wait_for_function("() => document.getElementById('play-time').textContent.endsWith('ms')")
    assert page.locator("#play-status").inner_text().startswith("200")
    answer = json.loads(page.locator("#play-out").inner_text())
    assert answer == {"n": 7, "token_length": len(SECRET)}
    rid = page.locator("#play-rid").inner_text()
    assert re.fullmatch(r"[0-9a-f]{16,}", rid), rid
    # Follow is on: the request's lines (gateway and replica) appear without a reload.
    lines = "document.getElementById('log-lines').textContent"
    page.wait_for_function(f"() => {lines}.includes('custom words about {rid}')", timeout=30_000)
    page.get_by_label("Request id").fill(rid)
    page.get_by_role("button", name="Apply").click()
    page.wait_for_function(
        "() => { const t = document.getElementById('log-lines').textContent.trim();"
        f" return t && t.split('\\n').every(l => l.includes('{rid}')); }}"
    )
    assert SECRET not in page.content()
    # The charts' source: the platform's counters for this deployment, by name.
    figures = page.request.get("/console/figures?model=logs-secret&deployment=blue").json()
    assert figures["requests"] >= 1 and figures["ready"] == 1 and "history" not in figures
    # The last hour the control plane kept: its samples so far, oldest first.
    url = "/console/figures?model=logs-secret&deployment=blue&history=1"
    kept = page.request.get(url).json()["history"]
    assert kept and [p["t"] for p in kept] == sorted(p["t"] for p in kept), kept
    page.wait_for_function("() => document.getElementById('chart-ready-now').textContent === '1'")
    check_page(page, shots, "deployment")


def test_a_streamed_answer_shows_as_it_arrives(page: Any, state: dict[str, Any]) -> None:
    stream = state["stream"]
    page.goto(f"/console/models/{stream['model']['id']}/deployments/{stream['deployment']['id']}")
    page.get_by_label("Request body (JSON)").fill('{"n": 3, "gap_s": 0.6}')
    page.get_by_role("button", name="Send").click()
    # The first chunk is on the page while the answer is still coming (no time yet).
    page.wait_for_function("() => document.getElementById('play-out').textContent === 'chunk-0;'")
    assert page.locator("#play-time").inner_text() == "\N{EN DASH}"
    page.wait_for_function("() => document.getElementById('play-time').textContent.endsWith('ms')")
    assert page.locator("#play-out").inner_text() == "chunk-0;chunk-1;chunk-2;"
    assert page.locator("#play-status").inner_text().startswith("200")


def test_the_accessibility_check_finds_what_it_should(page: Any, shots: list[Path]) -> None:
    """The checker itself: a page with an unlabelled field fails it."""
    page.set_content('<main><input id="x"></main>')
    with pytest.raises(AssertionError, match="label"):
        check_page(page, shots, "not-a-page")


def test_environment_page_shows_the_apis_validation_beside_the_field(
    page: Any, shots: list[Path], state: dict[str, Any]
) -> None:
    page.goto(f"/console/models/{state['model']}/environments/production")
    page.get_by_label("Max replicas").fill("lots")
    page.get_by_role("button", name="Save autoscaling").click()
    error = page.locator("#as-max_replica-error")
    assert "integer" in error.inner_text() and "lots" in error.inner_text()
    assert page.get_by_label("Max replicas").input_value() == "lots"
    check_page(page, shots, "environment")


def test_an_expired_session_goes_to_sign_in_and_back(
    page: Any, platform: Platform, state: dict[str, Any]
) -> None:
    with sqlite3.connect(platform.home / "kingpost.db") as db:
        db.execute("UPDATE console_sessions SET expires_at = '2000-01-01 00:00:00.000000'")
    target = f"/console/models/{state['model']}"
    page.goto(target)
    assert "/console/sign-in" in page.url
    sign_in(page, platform.api_key)
    page.wait_for_url(f"**{target}")
    page.get_by_role("heading", name="Deployments").wait_for()
    # Signing out ends the session at once: the old page's polls get no data.
    page.get_by_role("button", name="Sign out").click()
    page.get_by_role("heading", name="Sign in").wait_for()
    r = httpx.get(f"{platform.api_url}/console/", follow_redirects=False)
    assert r.status_code == 303
