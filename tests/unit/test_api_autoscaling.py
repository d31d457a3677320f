"""Autoscaling settings through the control-plane API (in-process, no engines running)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from tests.unit.test_api import upload

from kingpost.api import ControlPlane, create_app
from kingpost.controller.loop import Controller
from kingpost.serve import bootstrap
from kingpost.settings import Settings


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[TestClient, str, str]]:
    settings = Settings(home=tmp_path / "home")
    store = bootstrap(settings, lambda _: None, show_key=False)
    key = (settings.home / "credentials").read_text().strip()
    plane = ControlPlane(settings, store, Controller(settings, store))
    with TestClient(create_app(plane)) as client:
        client.headers["Authorization"] = f"Api-Key {key}"
        sha = upload(client, tmp_path)
        r = client.post("/v1/push", json={"project_hash": sha})
        assert r.status_code == 200, r.text
        yield client, r.json()["model"]["id"], r.json()["deployment"]["id"]


def test_deployment_settings_change_in_place(api: tuple[TestClient, str, str]) -> None:
    client, model, dep = api
    before = client.get(f"/v1/models/{model}/deployments/{dep}").json()
    assert before["autoscaling_settings"]["min_replica"] == 1
    assert before["autoscaling_settings"]["scale_down_delay"] == 900
    r = client.patch(
        f"/v1/models/{model}/deployments/{dep}/autoscaling_settings",
        json={"min_replica": 0, "max_replica": 4, "scale_down_delay": 30},
    )
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "ACCEPTED"
    after = client.get(f"/v1/models/{model}/deployments/{dep}").json()
    assert after["id"] == dep  # the same deployment: nothing was redeployed
    assert after["min_replicas"] == 0 and after["max_replicas"] == 4
    assert after["autoscaling_settings"]["scale_down_delay"] == 30
    assert after["autoscaling_settings_from"] is None
    again = client.patch(
        f"/v1/models/{model}/deployments/{dep}/autoscaling_settings", json={"max_replica": 4}
    )
    assert again.json()["status"] == "UNCHANGED"


def test_environment_settings_govern_the_deployment_it_points_at(
    api: tuple[TestClient, str, str],
) -> None:
    client, model, dep = api
    r = client.patch(
        f"/v1/models/{model}/environments/production",
        json={"autoscaling_settings": {"max_replica": 3, "concurrency_target": 4}},
    )
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "ACCEPTED"
    env = client.get(f"/v1/models/{model}/environments/production").json()
    assert env["autoscaling_settings"]["max_replica"] == 3
    assert env["autoscaling_settings"]["min_replica"] == 1  # started from the deployment's
    d = client.get(f"/v1/models/{model}/deployments/{dep}").json()
    assert d["autoscaling_settings_from"] == "production"
    assert d["autoscaling_settings"]["concurrency_target"] == 4
    # A deployment's own change says that the environment's settings govern.
    r = client.patch(
        f"/v1/models/{model}/deployments/{dep}/autoscaling_settings", json={"max_replica": 9}
    )
    assert "production" in r.json()["message"]


def test_an_environments_min_replica_above_the_deployments_own_max_applies(
    api: tuple[TestClient, str, str],
) -> None:
    """The PATCH answered ACCEPTED and the environment showed min 2, but the deployment
    (its own max 1) was governed by min 1: the environment's min was dropped."""
    client, model, dep = api
    r = client.patch(
        f"/v1/models/{model}/environments/production",
        json={"autoscaling_settings": {"min_replica": 2, "max_replica": 3}},
    )
    assert r.status_code == 200 and r.json()["status"] == "ACCEPTED", r.text
    d = client.get(f"/v1/models/{model}/deployments/{dep}").json()
    assert d["autoscaling_settings_from"] == "production"
    assert d["autoscaling_settings"]["min_replica"] == 2
    assert d["autoscaling_settings"]["max_replica"] == 3


@pytest.mark.parametrize(
    ("body", "field", "rule"),
    [
        ({"autoscaling_window": 5}, "autoscaling_window", "10-3600"),
        ({"scale_down_delay": 4000}, "scale_down_delay", "0-3600"),
        ({"target_utilization_percentage": 0}, "target_utilization_percentage", "1-100"),
        ({"min_replica": 3, "max_replica": 2}, "min_replica", "max_replica"),
        ({"max_replica": 0}, "max_replica", "at least 1"),
        ({"min_replica": -1}, "min_replica", "at least 0"),
    ],
)
def test_bad_settings_name_field_rule_and_value(
    api: tuple[TestClient, str, str], body: dict[str, int], field: str, rule: str
) -> None:
    client, model, dep = api
    for path, payload in (
        (f"/v1/models/{model}/deployments/{dep}/autoscaling_settings", body),
        (f"/v1/models/{model}/environments/production", {"autoscaling_settings": body}),
    ):
        r = client.patch(path, json=payload)
        assert r.status_code == 400, r.text
        err = r.json()
        assert err["field"] == field and rule in err["error"]
        assert str(body[field]) in err["error"]
    unchanged = client.get(f"/v1/models/{model}/deployments/{dep}").json()
    assert unchanged["autoscaling_settings"]["max_replica"] == 1


def test_unknown_fields_and_strings_are_refused(api: tuple[TestClient, str, str]) -> None:
    client, model, dep = api
    path = f"/v1/models/{model}/deployments/{dep}/autoscaling_settings"
    r = client.patch(path, json={"scale_down_dely": 5})
    assert r.status_code == 400 and "scale_down_dely" in r.text
    r = client.patch(path, json={"autoscaling_window": "60"})
    assert r.status_code == 400 and "autoscaling_window" in r.text


def test_wake_of_an_unknown_deployment_is_404(api: tuple[TestClient, str, str]) -> None:
    client, model, _ = api
    assert client.post(f"/v1/models/{model}/deployments/nope/wake").status_code == 404
