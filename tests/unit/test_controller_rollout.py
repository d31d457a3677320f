"""rollout_step: the rollout state machine, pure, with an injected clock."""

from __future__ import annotations

from dataclasses import replace

import pytest

from kingpost.controller.rollout import (
    Observed,
    Phase,
    PromotionSettings,
    RolloutState,
    merge_promotion_settings,
    rollout_step,
)
from kingpost.errors import ValidationError
from kingpost.store.models import RolloutStatus

IN_PROGRESS, PAUSED = RolloutStatus.IN_PROGRESS, RolloutStatus.PAUSED
SUCCEEDED, FAILED, CANCELED = RolloutStatus.SUCCEEDED, RolloutStatus.FAILED, RolloutStatus.CANCELED
SURGE = PromotionSettings(rolling=True, max_surge_percent=25)
UNAVAILABLE = PromotionSettings(rolling=True, max_unavailable_percent=50)
SWAP = PromotionSettings()


def fresh(n: int = 4, p: int = 4) -> RolloutState:
    """As the store creates one: nothing done yet."""
    return RolloutState(IN_PROGRESS, Phase.STEP_DONE, 0, 1, n, p, 0, p, 0.0, 0.0)


def settle(st: RolloutState) -> Observed:
    """Replicas do what the state says at once."""
    return Observed(st.candidate_replicas, st.previous_replicas, st.previous_replicas)


def run(settings: PromotionSettings, st: RolloutState, passes: int = 60) -> list[tuple]:  # type: ignore[type-arg]
    """Pass after pass (1 s apart) with replicas that follow the state; the distinct
    (status, candidate replicas, previous replicas, candidate traffic %) seen."""
    seen: list[tuple] = []  # type: ignore[type-arg]
    for now in range(passes):
        st = rollout_step(st, settle(st), settings, float(now))
        row = (st.status, st.candidate_replicas, st.previous_replicas, st.candidate_traffic_percent)
        if not seen or seen[-1] != row:
            seen.append(row)
    return seen


def test_surge_25_percent_moves_one_replica_and_a_quarter_of_traffic_per_step() -> None:
    assert run(SURGE, fresh()) == [
        (IN_PROGRESS, 1, 4, 0.0),  # start one candidate replica; previous all there
        (IN_PROGRESS, 1, 3, 25.0),  # ready: a quarter of the traffic, one previous goes
        (IN_PROGRESS, 2, 3, 25.0),
        (IN_PROGRESS, 2, 2, 50.0),
        (IN_PROGRESS, 3, 2, 50.0),
        (IN_PROGRESS, 3, 1, 75.0),
        (IN_PROGRESS, 4, 1, 75.0),
        (IN_PROGRESS, 4, 0, 100.0),
        (SUCCEEDED, 4, 0, 100.0),
    ]


def test_max_unavailable_stops_previous_replicas_before_starting_candidates() -> None:
    assert run(UNAVAILABLE, fresh()) == [
        (IN_PROGRESS, 0, 2, 0.0),
        (IN_PROGRESS, 2, 2, 0.0),
        # Ready: half the traffic, and the next step stops the other previous replicas.
        (IN_PROGRESS, 2, 0, 50.0),
        (IN_PROGRESS, 4, 0, 50.0),
        (SUCCEEDED, 4, 0, 100.0),
    ]


def test_a_promotion_that_does_not_roll_moves_traffic_once_every_candidate_is_ready() -> None:
    st = rollout_step(fresh(2, 3), Observed(0, 3, 3), SWAP, 0.0)
    assert (st.phase, st.candidate_replicas, st.previous_replicas) == (Phase.SCALE_UP, 2, 3)
    st = rollout_step(st, Observed(1, 3, 3), SWAP, 1.0)
    assert st.candidate_traffic_percent == 0.0  # one of two is not enough
    st = rollout_step(st, Observed(2, 3, 3), SWAP, 2.0)
    # The previous deployment keeps its replicas: only its traffic moves.
    assert (st.status, st.candidate_traffic_percent, st.previous_replicas) == (SUCCEEDED, 100, 3)


def test_stabilization_waits_after_the_candidates_are_ready() -> None:
    settings = replace(SURGE, stabilization_time_seconds=10)
    st = rollout_step(fresh(), settle(fresh()), settings, 0.0)
    st = rollout_step(st, Observed(1, 4, 4), settings, 1.0)
    assert st.phase == Phase.STABILIZE
    assert rollout_step(st, Observed(1, 4, 4), settings, 10.9) == st
    # One went away while stabilizing: wait for it again.
    assert rollout_step(st, Observed(0, 4, 4), settings, 5.0).phase == Phase.SCALE_UP
    moved = rollout_step(st, Observed(1, 4, 4), settings, 11.0)
    assert (moved.phase, moved.candidate_traffic_percent) == (Phase.SCALE_DOWN, 25.0)


@pytest.mark.parametrize(
    ("observed", "now", "status", "message"),
    [
        (Observed(0, 4, 4), 100.0, IN_PROGRESS, ""),
        (Observed(0, 4, 4), 100.5, FAILED, "0 of 1 replica(s) ready after 100 s"),
        (Observed(0, 4, 4, candidate_failure="boom"), 1.0, FAILED, "candidate failed: boom"),
        # Still building: the deadline has not begun.
        (Observed(0, 4, 4, candidate_preparing=True), 500.0, IN_PROGRESS, ""),
    ],
)
def test_a_candidate_that_does_not_get_ready_fails_the_rollout(
    observed: Observed, now: float, status: RolloutStatus, message: str
) -> None:
    settings = replace(SURGE, ready_timeout_seconds=100)
    st = rollout_step(fresh(), settle(fresh()), settings, 0.0)
    out = rollout_step(st, observed, settings, now)
    assert out.status == status
    assert message in out.message
    if status == FAILED:  # all traffic and replicas back on the previous deployment
        assert (out.candidate_traffic_percent, out.candidate_replicas) == (0.0, 0)
        assert out.previous_replicas == 4


def test_pause_takes_effect_between_steps_and_resume_continues() -> None:
    st = rollout_step(fresh(), settle(fresh()), SURGE, 0.0)  # step 1: SCALE_UP
    st = replace(st, requested="pause")
    st = rollout_step(st, settle(st), SURGE, 1.0)  # ready: traffic moves, still in the step
    assert (st.status, st.phase, st.candidate_traffic_percent) == (
        IN_PROGRESS,
        Phase.SCALE_DOWN,
        25,
    )
    st = rollout_step(st, settle(st), SURGE, 2.0)  # previous scaled down: step done, paused
    assert (st.status, st.step, st.requested) == (PAUSED, 1, None)
    assert rollout_step(st, settle(st), SURGE, 500.0) == st
    resumed = rollout_step(replace(st, status=IN_PROGRESS), settle(st), SURGE, 501.0)
    assert (resumed.step, resumed.phase, resumed.candidate_replicas) == (2, Phase.SCALE_UP, 2)


def test_cancel_brings_the_previous_replicas_back_before_all_traffic() -> None:
    st = fresh()
    for now in range(3):
        st = rollout_step(st, settle(st), SURGE, float(now))
    assert (st.candidate_replicas, st.previous_replicas) == (2, 3)
    st = rollout_step(replace(st, requested="cancel"), Observed(2, 3, 3), SURGE, 10.0)
    assert (st.status, st.phase, st.previous_replicas) == (IN_PROGRESS, Phase.RESTORE, 4)
    assert st.candidate_traffic_percent == 25.0  # unchanged until the previous is back
    st = rollout_step(st, Observed(2, 3, 4), SURGE, 11.0)
    assert st.phase == Phase.RESTORE
    st = rollout_step(st, Observed(2, 4, 4), SURGE, 12.0)
    assert (st.status, st.candidate_traffic_percent, st.candidate_replicas) == (CANCELED, 0, 0)


def test_force_complete_moves_all_traffic_once_one_candidate_is_ready() -> None:
    st = rollout_step(fresh(), settle(fresh()), SURGE, 0.0)
    st = rollout_step(replace(st, requested="force_complete"), Observed(0, 4, 4), SURGE, 1.0)
    assert (st.phase, st.candidate_replicas) == (Phase.FORCE, 4)
    st = rollout_step(st, Observed(1, 4, 4), SURGE, 2.0)
    assert (st.status, st.candidate_traffic_percent, st.previous_replicas) == (SUCCEEDED, 100, 0)


def test_a_finished_rollout_never_changes() -> None:
    done = replace(fresh(), status=CANCELED, phase=Phase.DONE)
    assert rollout_step(replace(done, requested="cancel"), settle(done), SURGE, 9.0).status == (
        CANCELED
    )


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"rolling_deploy": True}, "promotion_settings.rolling_deploy_config"),
        (
            {
                "rolling_deploy": True,
                "rolling_deploy_config": {"max_surge_percent": 10, "max_unavailable_percent": 10},
            },
            "promotion_settings.rolling_deploy_config",
        ),
        (
            {"rolling_deploy_config": {"max_surge_percent": -1}},
            "promotion_settings.rolling_deploy_config.max_surge_percent",
        ),
        (
            {"rolling_deploy_config": {"replica_overhead_percent": 501}},
            "promotion_settings.rolling_deploy_config.replica_overhead_percent",
        ),
        (
            {
                "rolling_deploy": True,
                "rolling_deploy_config": {"max_surge_percent": 0, "max_unavailable_percent": 0},
            },
            "promotion_settings.rolling_deploy_config",
        ),
        ({"redeploy_on_promotion": True}, "promotion_settings.redeploy_on_promotion"),
        (
            {"promotion_cleanup_strategy": "SCALE_TO_ZERO"},
            "promotion_settings.promotion_cleanup_strategy",
        ),
        (
            {"rolling_deploy_config": {"stabilization_time_seconds": -1}},
            "promotion_settings.rolling_deploy_config.stabilization_time_seconds",
        ),
        ({"rolling_deploy": "yes"}, "promotion_settings.rolling_deploy"),
        ({"surge": 1}, "promotion_settings.surge"),
    ],
)
def test_bad_settings_name_field_rule_and_value(data: dict, field: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValidationError) as caught:
        PromotionSettings.from_api(data)
    assert caught.value.details["field"] == field
    assert "got" in caught.value.message


def test_settings_round_trip() -> None:
    s = PromotionSettings.from_api(
        {"rolling_deploy": True, "rolling_deploy_config": {"max_surge_percent": 25}}
    )
    assert s == SURGE
    assert PromotionSettings.from_api(s.to_api()) == s
    # Baseten's shape: 0 is "not this mode", both keys always there.
    assert s.to_api()["rolling_deploy_config"]["max_unavailable_percent"] == 0
    unavailable = {"max_surge_percent": 0, "max_unavailable_percent": 20}
    s = PromotionSettings.from_api({"rolling_deploy": True, "rolling_deploy_config": unavailable})
    assert (s.max_surge_percent, s.max_unavailable_percent) == (None, 20)
    assert PromotionSettings.from_api(s.to_api()) == s
    big = {"max_surge_percent": 10, "replica_overhead_percent": 500}  # Baseten's top
    assert (
        PromotionSettings.from_api({"rolling_deploy_config": big}).replica_overhead_percent == 500
    )
    # Baseten's fields for what Kingpost does not do, given as what it does.
    fixed = {"redeploy_on_promotion": False, "promotion_cleanup_strategy": None}
    assert PromotionSettings.from_api(fixed) == PromotionSettings()


STORED = {
    "rolling_deploy": True,
    "rolling_deploy_config": {"max_surge_percent": 25, "stabilization_time_seconds": 30},
    "ready_timeout_seconds": 60,
}


@pytest.mark.parametrize(
    ("change", "merged"),
    [
        ({}, STORED),
        ({"ready_timeout_seconds": 120}, {**STORED, "ready_timeout_seconds": 120}),
        # null is "keep", at the top and one level down
        ({"rolling_deploy": None, "rolling_deploy_config": None}, STORED),
        (
            {"rolling_deploy_config": {"stabilization_time_seconds": 5, "max_surge_percent": None}},
            {
                **STORED,
                "rolling_deploy_config": {"max_surge_percent": 25, "stabilization_time_seconds": 5},
            },
        ),
        ({"rolling_deploy": False}, {**STORED, "rolling_deploy": False}),
        # not a field: kept, so that from_api refuses it by name
        ({"surge": 1}, {**STORED, "surge": 1}),
    ],
)
def test_a_change_keeps_what_it_leaves_out_or_nulls(change: dict, merged: dict) -> None:  # type: ignore[type-arg]
    assert merge_promotion_settings(STORED, change) == merged
    assert STORED["rolling_deploy_config"] == {  # the stored mapping is not touched
        "max_surge_percent": 25,
        "stabilization_time_seconds": 30,
    }


CANARY = PromotionSettings(ramp_up_while_promoting=True, ramp_up_duration_seconds=100)


def test_a_canary_moves_traffic_in_ten_even_stages_once_the_candidate_is_ready() -> None:
    st = rollout_step(fresh(2, 2), Observed(0, 2, 2), CANARY, 0.0)
    assert st.candidate_traffic_percent == 0.0  # not ready: no traffic, no clock yet
    st = rollout_step(st, Observed(2, 2, 2), CANARY, 5.0)
    assert (st.phase, st.step, st.steps, st.candidate_traffic_percent) == (Phase.RAMP, 1, 10, 10)
    shares = [st.candidate_traffic_percent]
    for now in range(6, 200):
        st = rollout_step(st, Observed(2, 2, 2), CANARY, float(now))
        if st.candidate_traffic_percent != shares[-1]:
            shares.append(st.candidate_traffic_percent)
            assert now == 5 + 10 * (len(shares) - 1)  # a stage every tenth of the window
    assert shares == [10.0 * k for k in range(1, 11)]
    # Not rolling: the previous deployment keeps its replicas.
    assert (st.status, st.previous_replicas) == (SUCCEEDED, 2)


def test_a_canary_pauses_at_its_stage_and_cancels_back_to_the_previous_deployment() -> None:
    st = rollout_step(fresh(1, 1), Observed(1, 1, 1), CANARY, 0.0)
    st = rollout_step(st, Observed(1, 1, 1), CANARY, 25.0)
    assert st.candidate_traffic_percent == 20.0
    st = rollout_step(replace(st, requested="pause"), Observed(1, 1, 1), CANARY, 26.0)
    assert st.status == PAUSED
    assert rollout_step(st, Observed(1, 1, 1), CANARY, 90.0) == st
    st = rollout_step(replace(st, requested="cancel"), Observed(1, 1, 1), CANARY, 91.0)
    assert (st.status, st.candidate_traffic_percent) == (CANCELED, 0.0)


def test_canary_and_rolling_are_exclusive() -> None:
    with pytest.raises(ValidationError) as caught:
        PromotionSettings.from_api(
            {
                "rolling_deploy": True,
                "rolling_deploy_config": {"max_surge_percent": 10},
                "ramp_up_while_promoting": True,
            }
        )
    assert caught.value.details["field"] == "promotion_settings.ramp_up_while_promoting"


def test_replica_overhead_grows_the_previous_deployment_before_the_first_step() -> None:
    settings = replace(SURGE, replica_overhead_percent=25)
    assert run(settings, fresh()) == [
        (IN_PROGRESS, 0, 5, 0.0),  # a fifth previous replica first: autoscaling is frozen
        (IN_PROGRESS, 1, 5, 0.0),
        (IN_PROGRESS, 1, 3, 25.0),  # the steps count with 5 previous replicas
        (IN_PROGRESS, 2, 3, 25.0),
        (IN_PROGRESS, 2, 2, 50.0),
        (IN_PROGRESS, 3, 2, 50.0),
        (IN_PROGRESS, 3, 1, 75.0),
        (IN_PROGRESS, 4, 1, 75.0),
        (IN_PROGRESS, 4, 0, 100.0),
        (SUCCEEDED, 4, 0, 100.0),
    ]


def test_a_rolling_promotion_on_a_full_machine_stops_a_previous_replica_first() -> None:
    """4 GPUs, all held by the previous deployment's 4 replicas: a surge step's candidate
    waits for a device, so a previous replica goes first (max_unavailable behaviour), and
    the rollout says so instead of waiting out its deadline."""
    gpus, st = 4, fresh()
    seen: list[tuple] = []  # type: ignore[type-arg]
    messages = set()
    for now in range(80):
        previous = st.previous_replicas  # the previous side follows at once
        candidate = min(st.candidate_replicas, gpus - previous)
        short = candidate < st.candidate_replicas
        waiting = "waiting for 1\u00d7H100: 0 free of 4" if short else None
        ob = Observed(candidate, previous, previous, candidate_waiting=waiting)
        st = rollout_step(st, ob, SURGE, float(now))
        messages.add(st.message)
        row = (st.status, st.candidate_replicas, st.previous_replicas)
        if not seen or seen[-1] != row:
            seen.append(row)
    assert st.status == SUCCEEDED, (st, seen)
    assert all(c + p <= gpus + 1 for _, c, p in seen)  # never more than one over the machine
    assert any("a previous replica stops first" in m and "0 free of 4" in m for m in messages)


def test_no_previous_replica_goes_while_one_still_drains_or_without_a_wait() -> None:
    st = replace(fresh(), phase=Phase.SCALE_UP, step=1, steps=4, candidate_replicas=1)
    waiting = "waiting for 1\u00d7H100: 0 free of 4"
    stepped = rollout_step(st, Observed(0, 4, 4, candidate_waiting=waiting), SURGE, 0.0)
    assert stepped.previous_replicas == 3 and "max_unavailable_percent" in stepped.message
    draining = Observed(0, 3, 3, candidate_waiting=waiting, previous_draining=1)
    assert rollout_step(stepped, draining, SURGE, 1.0).previous_replicas == 3
    assert rollout_step(st, Observed(0, 4, 4), SURGE, 0.0).previous_replicas == 4  # no wait
    # A promotion that does not roll keeps its previous replicas; its deadline names the wait.
    swap = replace(st, steps=1, candidate_replicas=4)
    late = rollout_step(swap, Observed(0, 4, 4, candidate_waiting=waiting), SWAP, 10_000.0)
    assert late.status == FAILED and waiting in late.message
