"""Promotion settings and rollout controls through the API in-process (no engines run:
the store stands in for what the controller would record)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from test_api import upload

from kingpost.api import ControlPlane, create_app
from kingpost.controller.loop import Controller
from kingpost.serve import bootstrap
from kingpost.settings import Settings
from kingpost.store import DeploymentStatus, Store

ENV = "/v1/models/api-test/environments/production"


def upload_and_push(client: TestClient, tmp_path: Path) -> str:
    r = client.post("/v1/push", json={"project_hash": upload(client, tmp_path)})
    assert r.status_code == 200, r.text
    return str(r.json()["deployment"]["id"])


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[TestClient, Store]]:
    settings = Settings(home=tmp_path / "home")
    store = bootstrap(settings, lambda _: None, show_key=False)
    key = (settings.home / "credentials").read_text().strip()
    plane = ControlPlane(settings, store, Controller(settings, store))
    with TestClient(create_app(plane)) as client:
        client.headers["Authorization"] = f"Api-Key {key}"
        yield client, store


def test_promotion_settings_take_baseten_shape_and_name_bad_fields(
    api: tuple[TestClient, Store], tmp_path: Path
) -> None:
    client, _ = api
    sha = upload(client, tmp_path)
    assert client.post("/v1/push", json={"project_hash": sha}).status_code == 200
    assert client.get(ENV).json()["promotion_settings"]["rolling_deploy"] is False
    good = {
        "rolling_deploy": True,
        "rolling_deploy_config": {"max_surge_percent": 25, "stabilization_time_seconds": 2},
    }
    r = client.patch(ENV, json={"promotion_settings": good})
    assert r.status_code == 200, r.text
    config = r.json()["promotion_settings"]["rolling_deploy_config"]
    assert (config["max_surge_percent"], config["stabilization_time_seconds"]) == (25, 2)
    assert (
        client.get("/v1/models/api-test/environments").json()["environments"][0][
            "promotion_settings"
        ]
        == (r.json()["promotion_settings"])
    )
    both = {"max_surge_percent": 25, "max_unavailable_percent": 25}
    neither = {"max_surge_percent": 0, "max_unavailable_percent": 0}  # 0: not this mode
    for config, why in ((neither, "got neither"), (both, "got both")):
        bad = {"rolling_deploy": True, "rolling_deploy_config": config}
        r = client.patch(ENV, json={"promotion_settings": bad})
        assert r.status_code == 400, r.text
        assert r.json()["field"] == "promotion_settings.rolling_deploy_config"
        assert "exactly one of max_surge_percent or max_unavailable_percent" in r.json()["error"]
        assert why in r.json()["error"]
    too_much = {"rolling_deploy_config": {"max_surge_percent": 250}}
    r = client.patch(ENV, json={"promotion_settings": too_much})
    assert r.status_code == 400 and "250" in r.json()["error"]
    r = client.patch(ENV.replace("production", "nope"), json={"promotion_settings": good})
    assert r.status_code == 404 and "'nope'" in r.json()["error"]
    r = client.get("/v1/models/ghost/environments/production")
    assert r.status_code == 404 and "'ghost'" in r.json()["error"]


def test_a_patch_keeps_the_promotion_settings_it_leaves_out_and_takes_basetens_body(
    api: tuple[TestClient, Store], tmp_path: Path
) -> None:
    client, _ = api
    upload_and_push(client, tmp_path)
    rolling = {
        "rolling_deploy": True,
        "rolling_deploy_config": {"max_surge_percent": 25, "stabilization_time_seconds": 30},
    }
    assert client.patch(ENV, json={"promotion_settings": rolling}).status_code == 200
    r = client.patch(ENV, json={"promotion_settings": {"ready_timeout_seconds": 120}})
    assert r.status_code == 200, r.text
    settings = client.get(ENV).json()["promotion_settings"]
    assert settings["rolling_deploy"] is True  # not reset by a PATCH that left it out
    assert settings["ready_timeout_seconds"] == 120
    assert settings["rolling_deploy_config"]["max_surge_percent"] == 25
    assert settings["rolling_deploy_config"]["stabilization_time_seconds"] == 30
    # Baseten's documented body: nulls keep what is stored, 0 picks the other mode.
    body = {
        "autoscaling_settings": {
            "min_replica": 1,
            "max_replica": 2,
            "target_in_flight_tokens": None,
            "target_utilization_percentage": None,
            "max_scale_down_rate": None,
        },
        "promotion_settings": {
            "promotion_cleanup_strategy": None,
            "redeploy_on_promotion": None,
            "rolling_deploy": None,
            "rolling_deploy_config": {"max_surge_percent": 0, "max_unavailable_percent": 10},
        },
    }
    r = client.patch(ENV, json=body)
    assert r.status_code == 200, r.text
    config = r.json()["promotion_settings"]["rolling_deploy_config"]
    assert (config["max_surge_percent"], config["max_unavailable_percent"]) == (0, 10)
    assert r.json()["promotion_settings"]["rolling_deploy"] is True
    # What Kingpost does not do is refused by name, and nothing is stored.
    r = client.patch(ENV, json={"promotion_settings": {"redeploy_on_promotion": True}})
    assert r.status_code == 400 and r.json()["field"] == "promotion_settings.redeploy_on_promotion"
    assert client.get(ENV).json()["promotion_settings"]["rolling_deploy_config"] == config
    r = client.patch(ENV, json={"autoscaling_settings": {"target_in_flight_tokens": 100}})
    assert r.status_code == 400, r.text
    assert r.json()["field"] == "autoscaling_settings.target_in_flight_tokens", r.text


def test_rollout_controls_answer_409_with_the_current_state(
    api: tuple[TestClient, Store], tmp_path: Path
) -> None:
    client, store = api
    sha = upload(client, tmp_path)
    first = client.post("/v1/push", json={"project_hash": sha}).json()["deployment"]["id"]
    store.set_status(first, DeploymentStatus.ACTIVE)  # as the controller would record it
    assert client.get(f"{ENV}/promotion").status_code == 404  # none yet
    r = client.post("/v1/push", json={"project_hash": sha, "environment": "production"})
    second = r.json()["deployment"]["id"]
    # Production serves: the promotion waits for the candidate, as a rollout.
    assert client.get(ENV).json()["deployment_id"] == first
    status = client.get(f"{ENV}/promotion").json()
    assert (status["status"], status["candidate_deployment_id"]) == ("IN_PROGRESS", second)
    assert status["previous_deployment_id"] == first

    r = client.post(f"{ENV}/resume_promotion")
    assert r.status_code == 409 and r.json()["status"] == "IN_PROGRESS", r.text
    assert client.post(f"{ENV}/pause_promotion").json()["requested"] == "pause"
    r = client.post(f"{ENV}/pause_promotion")
    assert r.status_code == 409 and "with pause requested" in r.json()["error"]
    # A promotion into an environment with a rollout running is refused: say what to do.
    r = client.post(f"{ENV}/promote", json={"deployment_id": first})
    assert r.status_code == 409 and "rollouts cancel" in r.json()["error"], r.text
    third = client.post("/v1/push", json={"project_hash": sha, "environment": "production"})
    assert third.status_code == 409
    assert client.post(f"{ENV}/cancel_promotion").json()["requested"] == "cancel"
    assert client.post(f"{ENV}/cancel_promotion").status_code == 409
    r = client.post(f"{ENV.replace('production', 'nope')}/cancel_promotion")
    assert r.status_code == 404 and "'nope'" in r.json()["error"]


def test_promoting_a_failed_or_inactive_deployment_is_refused(
    api: tuple[TestClient, Store], tmp_path: Path
) -> None:
    client, store = api
    sha = upload(client, tmp_path)
    client.post("/v1/push", json={"project_hash": sha})
    second = client.post("/v1/push", json={"project_hash": sha}).json()["deployment"]["id"]
    store.set_status(second, DeploymentStatus.FAILED, "boom")
    r = client.post(f"{ENV}/promote", json={"deployment_id": second})
    assert (
        r.status_code == 409 and "FAILED" in r.json()["error"] and "activate" in r.json()["error"]
    )
    r = client.post(f"{ENV}/promote", json={"deployment_id": "ghost"})
    assert r.status_code == 404 and "'ghost'" in r.json()["error"]
