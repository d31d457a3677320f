"""A promotion reaches replicas that are already running: their model's
``setup_environment`` is called again, as Truss does, through the whole platform."""

from __future__ import annotations

from typing import Any

from helpers.platform import REPO, Platform, wait_for

PROJECT = REPO / "tests" / "fixtures" / "models" / "environments"


def test_promotion_calls_setup_environment_on_running_replicas(platform: Platform) -> None:
    with platform.client() as c:
        first = c.push(PROJECT)
        model_id, first_id = first["model"]["id"], first["deployment"]["id"]
        platform.wait_status(first_id, "ACTIVE", timeout=120)
        second_id = c.push(PROJECT, environment="staging")["deployment"]["id"]
        platform.wait_status(second_id, "ACTIVE", timeout=120)

    def seen(dep_id: str) -> dict[str, Any]:
        with platform.gateway() as gw:
            r = gw.post(f"/models/{model_id}/deployment/{dep_id}/predict", json={})
        assert r.status_code == 200, r.text
        return dict(r.json())

    production, staging = {"name": "production"}, {"name": "staging"}
    assert seen(first_id) == {"at_init": production, "told": [production]}
    assert seen(second_id) == {"at_init": staging, "told": [staging]}

    with platform.client() as c:
        c.promote(model_id, second_id, "production")
    # Now in staging and production: a model has one environment, and production wins.
    wait_for(
        lambda: seen(second_id)["told"] == [staging, production] or None,
        30,
        "the running replica to be told of its promotion",
    )
    # Same replica, not a restart: __init__ saw only the first environment.
    assert seen(second_id)["at_init"] == staging
    # The deployment that left production is in no environment now; as in Truss a model
    # is not told of leaving one, and it keeps serving.
    assert seen(first_id)["told"] == [production]
