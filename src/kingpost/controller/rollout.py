"""Pure rollout decisions: ``rollout_step(state, observed, settings, now) -> RolloutState``.

A promotion into an environment that serves traffic is a rollout. Its state is durable
(the store's ``rollouts`` table); the loop observes both deployments' replicas, calls
:func:`rollout_step` and records the state it returns, then runs each side at the replica
count the state names and splits the environment's traffic as it says. No I/O, no clock
reads (``now`` is passed in). Tested table-driven in ``tests/unit/test_controller_rollout.py``.

A step of a rolling promotion (Baseten's order, with ``max_surge_percent``): start the
step's candidate replicas (SCALE_UP), wait until they are ready, then
``stabilization_time_seconds`` more (STABILIZE), move traffic to match the replica ratio,
then stop that share of the previous deployment's replicas (SCALE_DOWN; the loop drains
each before stopping it). With ``max_unavailable_percent`` the previous deployment's
replicas go first. A promotion that does not roll is one step: all the candidate's
replicas, then all traffic. ``replica_overhead_percent`` first grows the previous
deployment by that share (OVERHEAD; autoscaling is frozen during the rollout), and the
steps count with the grown number. Pause takes effect between steps; cancel brings the
previous deployment back to its replicas, then all traffic to it (RESTORE);
force-complete moves all traffic as soon as a candidate replica is ready (FORCE). A canary
(``ramp_up_while_promoting``, a promotion that does not roll) moves traffic in 10 even
stages over ``ramp_up_duration_seconds`` once all its replicas are ready (RAMP).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from kingpost.errors import ValidationError
from kingpost.store.models import RolloutStatus

__all__ = [
    "TERMINAL",
    "Observed",
    "Phase",
    "PromotionSettings",
    "RolloutState",
    "merge_promotion_settings",
    "rollout_step",
    "step_size",
]

TERMINAL = (RolloutStatus.SUCCEEDED, RolloutStatus.FAILED, RolloutStatus.CANCELED)
DEFAULT_READY_TIMEOUT_S = 900
CANARY_STAGES = 10


class Phase(enum.StrEnum):
    """Where a rollout is within its step."""

    STEP_DONE = "STEP_DONE"  # the step (0: none yet) is complete; the next one begins
    SCALE_UP = "SCALE_UP"  # waiting for the step's candidate replicas to be ready
    STABILIZE = "STABILIZE"  # they are ready; waiting stabilization_time_seconds
    SCALE_DOWN = "SCALE_DOWN"  # waiting for the previous deployment's replicas to go
    RESTORE = "RESTORE"  # canceled: waiting for the previous deployment's replicas to be back
    FORCE = "FORCE"  # force-completed: waiting for one candidate replica to be ready
    RAMP = "RAMP"  # canary: traffic moves a tenth per stage, on the clock
    OVERHEAD = "OVERHEAD"  # before step 1: the previous deployment's extra replicas start
    DONE = "DONE"  # finished (SUCCEEDED, FAILED or CANCELED)


@dataclass(frozen=True)
class PromotionSettings:
    """An environment's ``promotion_settings`` (Baseten's management API names)."""

    rolling: bool = False
    """``rolling_deploy``: promote in steps rather than all at once."""
    max_surge_percent: int | None = None
    max_unavailable_percent: int | None = None
    stabilization_time_seconds: float = 0.0
    replica_overhead_percent: int = 0
    ready_timeout_seconds: float = DEFAULT_READY_TIMEOUT_S
    """Kingpost's: how long a step may wait for candidate replicas before the rollout fails."""
    ramp_up_while_promoting: bool = False
    """Canary: once the candidate is ready, move traffic in 10 even stages."""
    ramp_up_duration_seconds: float = 600.0
    """The canary's whole window."""

    @classmethod
    def from_api(cls, data: Mapping[str, Any]) -> PromotionSettings:
        """Validate the stored or requested shape; errors name the field, rule and value.

        Baseten's fields that name behaviour Kingpost does not have are accepted only with
        the value that describes what Kingpost does (``redeploy_on_promotion`` false,
        ``promotion_cleanup_strategy`` null), so a body that asks for more is refused
        rather than stored and ignored. A surge or unavailable percent of 0 is Baseten's
        way to say "not this mode"."""
        known = {
            "rolling_deploy",
            "rolling_deploy_config",
            "ready_timeout_seconds",
            "ramp_up_while_promoting",
            "ramp_up_duration_seconds",
            "redeploy_on_promotion",
            "promotion_cleanup_strategy",
        }
        for key in data:
            if key not in known:
                _bad(f"promotion_settings.{key}", f"is not a field; use {sorted(known)}", key)
        if data.get("redeploy_on_promotion") not in (None, False):
            _bad(
                "promotion_settings.redeploy_on_promotion",
                "must be false or null: Kingpost promotes the deployment as it was built "
                "and does not rebuild it on promotion",
                data["redeploy_on_promotion"],
            )
        if data.get("promotion_cleanup_strategy") is not None:
            _bad(
                "promotion_settings.promotion_cleanup_strategy",
                "must be null: Kingpost's cleanup is fixed (a rolling promotion deactivates "
                "the previous deployment, one all at once leaves it running)",
                data["promotion_cleanup_strategy"],
            )
        rolling = data.get("rolling_deploy", False)
        if not isinstance(rolling, bool):
            _bad("promotion_settings.rolling_deploy", "must be true or false", rolling)
        config = data.get("rolling_deploy_config") or {}
        if not isinstance(config, Mapping):
            _bad("promotion_settings.rolling_deploy_config", "must be an object", config)
        fields = {
            "max_surge_percent",
            "max_unavailable_percent",
            "stabilization_time_seconds",
            "replica_overhead_percent",
        }
        for key in config:
            if key not in fields:
                _bad(
                    f"promotion_settings.rolling_deploy_config.{key}",
                    f"is not a field; use {sorted(fields)}",
                    key,
                )
        surge = _percent(config, "max_surge_percent", 100) or None  # 0: the other mode
        unavailable = _percent(config, "max_unavailable_percent", 100) or None
        overhead = _percent(config, "replica_overhead_percent", 500) or 0
        stabilize = _number(config, "stabilization_time_seconds", 0, 3600, 0.0)
        timeout = _number(data, "ready_timeout_seconds", 1, 86400, DEFAULT_READY_TIMEOUT_S)
        canary = data.get("ramp_up_while_promoting", False)
        if not isinstance(canary, bool):
            _bad("promotion_settings.ramp_up_while_promoting", "must be true or false", canary)
        window = _number(data, "ramp_up_duration_seconds", 1, 86400, 600.0)
        if canary and rolling:
            _bad(
                "promotion_settings.ramp_up_while_promoting",
                "cannot be true together with rolling_deploy (a canary moves traffic on the "
                "clock, a rolling promotion with its replicas); turn one off",
                canary,
            )
        if rolling and (surge is None) == (unavailable is None):
            both = "both" if surge is not None else "neither"
            _bad(
                "promotion_settings.rolling_deploy_config",
                "needs exactly one of max_surge_percent or max_unavailable_percent above 0 "
                f"when rolling_deploy is true; got {both}",
                {"max_surge_percent": surge, "max_unavailable_percent": unavailable},
            )
        return cls(rolling, surge, unavailable, stabilize, overhead, timeout, canary, window)

    def to_api(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "max_surge_percent": self.max_surge_percent or 0,
            "max_unavailable_percent": self.max_unavailable_percent or 0,
            "stabilization_time_seconds": self.stabilization_time_seconds,
            "replica_overhead_percent": self.replica_overhead_percent,
        }
        return {
            "rolling_deploy": self.rolling,
            "rolling_deploy_config": config,
            "ready_timeout_seconds": self.ready_timeout_seconds,
            "ramp_up_while_promoting": self.ramp_up_while_promoting,
            "ramp_up_duration_seconds": self.ramp_up_duration_seconds,
            "redeploy_on_promotion": False,
        }


def merge_promotion_settings(
    stored: Mapping[str, Any], change: Mapping[str, Any]
) -> dict[str, Any]:
    """A PATCH's ``promotion_settings`` laid over the stored ones, as Baseten's update does:
    a field left out or null keeps its value, ``rolling_deploy_config`` one level down
    too. The result is checked by :meth:`PromotionSettings.from_api`; what is not a field
    is kept so that it is refused by name there."""
    merged = dict(stored)
    for key, value in change.items():
        if value is None:
            continue
        if key == "rolling_deploy_config" and isinstance(value, Mapping):
            config = merged.get(key)
            config = dict(config) if isinstance(config, Mapping) else {}
            config.update((k, v) for k, v in value.items() if v is not None)
            merged[key] = config
        else:
            merged[key] = value
    return merged


def _bad(field: str, rule: str, value: Any) -> None:
    raise ValidationError(f"{field} {rule} (got {value!r})", field=field, value=value)


def _percent(data: Mapping[str, Any], key: str, high: int) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
        _bad(f"promotion_settings.rolling_deploy_config.{key}", f"must be a whole number "
             f"from 0 to {high}", value)  # fmt: skip
    return int(value)


def _number(data: Mapping[str, Any], key: str, low: float, high: float, default: float) -> float:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        where = "promotion_settings." + ("" if key == "ready_timeout_seconds" else
                                         "rolling_deploy_config.")  # fmt: skip
        _bad(where + key, f"must be a number of seconds from {low:g} to {high:g}", value)
    return float(value)


@dataclass(frozen=True)
class RolloutState:
    """The durable part of a rollout, as the store keeps it."""

    status: RolloutStatus
    phase: Phase
    step: int
    """The step under way, or (STEP_DONE) the last one complete; 0 before the first."""
    steps: int
    target_replicas: int
    """The candidate's replicas at the end (N)."""
    previous_initial_replicas: int
    """The previous deployment's replicas when the rollout began (P)."""
    candidate_replicas: int
    """Replicas the candidate runs now."""
    previous_replicas: int
    """Replicas the previous deployment runs now."""
    candidate_traffic_percent: float
    phase_since: float
    """When the phase began (epoch seconds): deadlines and stabilization count from it."""
    requested: str | None = None
    """A user's control not yet applied: ``pause``, ``cancel`` or ``force_complete``."""
    message: str = ""


@dataclass(frozen=True)
class Observed:
    """What the loop saw of both sides this pass."""

    candidate_ready: int
    previous_ready: int
    previous_live: int
    """The previous deployment's replicas still running, draining ones left out: they get
    no new request, and finish their drain while the next step starts (as Kubernetes does
    not count terminating pods against max surge)."""
    candidate_preparing: bool = False
    """The candidate is still building or mirroring weights: its deadline has not begun."""
    candidate_failure: str | None = None
    """Why the candidate cannot serve (FAILED, BUILD_FAILED), with its last log lines."""
    candidate_waiting: str | None = None
    """Why a candidate replica waits for devices (``waiting for 1`` TIMES ``H100: 0 free of 8``):
    a rolling promotion then stops a previous replica first, as ``max_unavailable_percent``
    would, instead of waiting for devices the previous replicas hold."""
    previous_draining: int = 0
    """The previous deployment's replicas out of the table and not stopped yet, or stopped
    with their devices not released yet: what they hold is not free yet."""


def step_size(settings: PromotionSettings, target: int) -> int:
    """Replicas each step moves: the percentage of the target, rounded up, at least 1."""
    if not settings.rolling:
        return max(1, target)
    pct = settings.max_surge_percent or settings.max_unavailable_percent or 100
    return max(1, math.ceil(target * pct / 100))


def _targets(st: RolloutState, settings: PromotionSettings, k: int) -> tuple[int, int]:
    """(candidate, previous) replica counts once step ``k`` is complete."""
    n, p = st.target_replicas, st.previous_initial_replicas
    if not settings.rolling:
        return n, p
    c = min(n, k * step_size(settings, n))
    return c, max(0, p - math.ceil(p * c / n))


def _share(candidate: int, previous: int) -> float:
    return 100.0 if previous == 0 else round(100.0 * candidate / (candidate + previous), 2)


def rollout_step(
    st: RolloutState, ob: Observed, settings: PromotionSettings, now: float
) -> RolloutState:
    """The rollout's state after every transition ``ob`` allows now; equal to ``st`` when
    there is nothing to do this pass. Each transition waits on something observed (ready
    candidates, previous replicas gone) or on time, so taking several in one pass never
    runs ahead of the replicas."""
    for _ in range(8):
        nxt = _transition(st, ob, settings, now)
        if nxt == st:
            break
        st = nxt
    return st


def _transition(
    st: RolloutState, ob: Observed, settings: PromotionSettings, now: float
) -> RolloutState:
    if st.status in TERMINAL:
        return st
    if st.requested == "cancel":
        st = replace(st, status=RolloutStatus.IN_PROGRESS, phase=Phase.RESTORE, requested=None,
                     previous_replicas=st.previous_initial_replicas, phase_since=now)  # fmt: skip
    elif st.requested == "force_complete":
        st = replace(st, status=RolloutStatus.IN_PROGRESS, phase=Phase.FORCE, requested=None,
                     candidate_replicas=st.target_replicas, phase_since=now)  # fmt: skip
    if st.phase == Phase.RESTORE:
        waited = now - st.phase_since
        if (
            ob.previous_ready >= st.previous_initial_replicas
            or waited > settings.ready_timeout_seconds
        ):
            return _finish(st, RolloutStatus.CANCELED, now, "canceled: all traffic is back on "
                           "the previous deployment")  # fmt: skip
        return st
    if ob.candidate_failure is not None:
        return _finish(st, RolloutStatus.FAILED, now, f"candidate failed: {ob.candidate_failure}")
    if st.status == RolloutStatus.PAUSED:
        return st
    if ob.candidate_preparing and st.phase in (Phase.SCALE_UP, Phase.FORCE):
        return replace(st, phase_since=now)  # the deadline starts once it is built
    if st.phase == Phase.RAMP:
        return _ramp(st, settings, now)
    if st.phase == Phase.FORCE:
        if ob.candidate_ready >= 1:
            return _succeed(st, settings, now)
        return _deadline(st, ob, settings, now, 1)
    if st.phase == Phase.STEP_DONE and st.step == 0 and _overhead(st, settings) > 0:
        extra = st.previous_initial_replicas + _overhead(st, settings)
        return replace(st, phase=Phase.OVERHEAD, previous_replicas=extra, phase_since=now)
    if st.phase == Phase.OVERHEAD:
        # Extra capacity first, as autoscaling is frozen; then the steps count with it.
        waited = now - st.phase_since
        if ob.previous_ready < st.previous_replicas and waited <= settings.ready_timeout_seconds:
            return st
        grown = replace(st, previous_initial_replicas=st.previous_replicas)
        return _after_step(replace(grown, phase=Phase.STEP_DONE), settings, now)
    if st.phase == Phase.STEP_DONE:
        return _after_step(st, settings, now)
    goal_c, goal_p = _targets(st, settings, st.step)
    surge = settings.max_unavailable_percent is None
    if st.phase == Phase.SCALE_DOWN:
        if ob.previous_live > goal_p:
            return st
        if surge:  # the step's candidates were ready and traffic moved: the step is done
            return _after_step(replace(st, phase=Phase.STEP_DONE), settings, now)
        return replace(st, phase=Phase.SCALE_UP, candidate_replicas=goal_c, phase_since=now)
    if st.phase == Phase.SCALE_UP:
        if ob.candidate_ready < goal_c:
            if _makes_room(st, ob, settings):
                return replace(st, previous_replicas=st.previous_replicas - 1, message=(
                    f"no free device for the candidate ({ob.candidate_waiting}): a previous "
                    "replica stops first, as with max_unavailable_percent"))  # fmt: skip
            return _deadline(st, ob, settings, now, goal_c)
        if settings.rolling and settings.stabilization_time_seconds > 0:
            return replace(st, phase=Phase.STABILIZE, phase_since=now)
        return _shift(st, settings, now)
    # STABILIZE
    if ob.candidate_ready < goal_c:  # one of them went away: wait for it again
        return replace(st, phase=Phase.SCALE_UP, phase_since=now)
    if now - st.phase_since < settings.stabilization_time_seconds:
        return st
    return _shift(st, settings, now)


def _begin(st: RolloutState, settings: PromotionSettings, k: int, now: float) -> RolloutState:
    goal_c, goal_p = _targets(st, settings, k)
    steps = math.ceil(st.target_replicas / step_size(settings, st.target_replicas))
    base = replace(st, status=RolloutStatus.IN_PROGRESS, step=k, steps=steps, phase_since=now)
    if settings.rolling and settings.max_unavailable_percent is not None:
        return replace(base, phase=Phase.SCALE_DOWN, previous_replicas=goal_p)
    return replace(base, phase=Phase.SCALE_UP, candidate_replicas=goal_c)


def _makes_room(st: RolloutState, ob: Observed, settings: PromotionSettings) -> bool:
    """A rolling step's candidate waits for devices: one previous replica may go first,
    once the one before it is gone (``previous_live`` down to the count)."""
    return (
        ob.candidate_waiting is not None
        and settings.rolling
        and ob.previous_draining == 0
        and 0 < ob.previous_live <= st.previous_replicas
    )


def _overhead(st: RolloutState, settings: PromotionSettings) -> int:
    """Replicas ``replica_overhead_percent`` adds to the previous deployment's."""
    if not settings.rolling:
        return 0
    return math.ceil(st.previous_initial_replicas * settings.replica_overhead_percent / 100)


def _after_step(st: RolloutState, settings: PromotionSettings, now: float) -> RolloutState:
    if st.step >= 1 and _targets(st, settings, st.step)[0] >= st.target_replicas:
        return _succeed(st, settings, now)
    if st.requested == "pause":
        return replace(st, status=RolloutStatus.PAUSED, requested=None, phase_since=now)
    return _begin(st, settings, st.step + 1, now)


def _shift(st: RolloutState, settings: PromotionSettings, now: float) -> RolloutState:
    if settings.ramp_up_while_promoting:
        first = 100.0 / CANARY_STAGES
        return replace(st, phase=Phase.RAMP, step=1, steps=CANARY_STAGES,
                       candidate_traffic_percent=first, phase_since=now)  # fmt: skip
    if not settings.rolling:
        return _succeed(st, settings, now)
    goal_c, goal_p = _targets(st, settings, st.step)
    share = _share(goal_c, goal_p)
    if settings.max_unavailable_percent is not None:  # previous replicas went first
        return _after_step(replace(st, phase=Phase.STEP_DONE, candidate_traffic_percent=share),
                           settings, now)  # fmt: skip
    # min: previous replicas already stopped to make room for devices stay stopped
    return replace(st, phase=Phase.SCALE_DOWN, candidate_traffic_percent=share,
                   previous_replicas=min(goal_p, st.previous_replicas),
                   phase_since=now)  # fmt: skip


def _ramp(st: RolloutState, settings: PromotionSettings, now: float) -> RolloutState:
    """A canary stage ends after a tenth of the window; a pause holds it at its stage."""
    if st.requested == "pause":
        return replace(st, status=RolloutStatus.PAUSED, requested=None)
    if now - st.phase_since < settings.ramp_up_duration_seconds / CANARY_STAGES:
        return st
    if st.step + 1 >= CANARY_STAGES:
        return _succeed(st, settings, now)
    stage = st.step + 1
    return replace(st, step=stage, phase_since=now,
                   candidate_traffic_percent=round(100.0 * stage / CANARY_STAGES, 2))  # fmt: skip


def _deadline(
    st: RolloutState, ob: Observed, settings: PromotionSettings, now: float, wanted: int
) -> RolloutState:
    waited = now - st.phase_since
    if waited <= settings.ready_timeout_seconds:
        return st
    why = (
        f"candidate not ready: {ob.candidate_ready} of {wanted} replica(s) ready after "
        f"{settings.ready_timeout_seconds:g} s (ready_timeout_seconds)"
    )
    if ob.candidate_waiting:
        why += f"; {ob.candidate_waiting}"
    return _finish(st, RolloutStatus.FAILED, now, why)


def _succeed(st: RolloutState, settings: PromotionSettings, now: float) -> RolloutState:
    previous = 0 if settings.rolling else st.previous_initial_replicas
    done = replace(st, candidate_replicas=st.target_replicas, previous_replicas=previous,
                   step=max(st.step, st.steps))  # fmt: skip
    return _finish(done, RolloutStatus.SUCCEEDED, now, "")


def _finish(st: RolloutState, status: RolloutStatus, now: float, message: str) -> RolloutState:
    """A terminal state: SUCCEEDED moves all traffic to the candidate, the others back."""
    if status == RolloutStatus.SUCCEEDED:
        return replace(st, status=status, phase=Phase.DONE, candidate_traffic_percent=100.0,
                       requested=None, message=message, phase_since=now)  # fmt: skip
    return replace(st, status=status, phase=Phase.DONE, candidate_traffic_percent=0.0,
                   candidate_replicas=0, previous_replicas=st.previous_initial_replicas,
                   requested=None, message=message, phase_since=now)  # fmt: skip
