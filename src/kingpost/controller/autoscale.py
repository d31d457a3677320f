"""Autoscaling as a pure decision: ``decide(settings, samples, current, now) -> Decision``.

No I/O and no clock reads: the loop keeps a window of :class:`Sample` per deployment (what
the gateway held for it, pulled about once a second), calls :func:`decide` and sets the
result as ``Want.replicas``. Tested table-driven with an injected clock in
``tests/unit/test_autoscale.py``.

The rules, after Baseten's autoscaler (names are its settings) and Knative's panic mode:

- **Demand** is the requests the gateway holds for the deployment, in flight plus queued.
  A replica is meant to carry ``concurrency_target * target_utilization_percentage / 100``
  of it, so the *recommendation* at a moment is ``ceil(demand averaged over the last
  autoscaling_window / per replica)``.
- **Up** at once to the recommendation. A **burst** (the demand of the last few seconds, the
  panic window, at least :data:`PANIC_THRESHOLD` times what the current replicas carry)
  scales up on that short window without waiting for the long one to catch up.
- **Down** only to the highest recommendation seen over the last ``scale_down_delay``
  seconds (so a lull shorter than the delay changes nothing), and only after that much
  history exists, and a whole window of it (a restarted control plane, or a new
  deployment, removes nothing until it has seen both). One step removes at most
  ``max_scale_down_rate`` per cent of the replicas (at least one), and the next step waits
  one autoscaling window, so that window's average is measured on the smaller set.
- **Bounds**: ``min_replica`` and ``max_replica`` clamp every answer, at once.
- **Zero**: with ``min_replica`` 0 a deployment goes to zero only after a whole delay (and
  window) without a single request; any demand at zero wakes one replica (or more, as
  the burst asks) at the next decision.
- **Frozen** (a rollout runs): the current count stands.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

from kingpost.errors import ValidationError

__all__ = [
    "AUTOSCALING_FIELDS",
    "FRESH_S",
    "PANIC_THRESHOLD",
    "AutoscalingSettings",
    "Decision",
    "Sample",
    "decide",
    "panic_window_s",
]

PANIC_THRESHOLD = 2.0
"""A burst: the panic window's demand at least this many times what the replicas carry."""
FRESH_S = 5.0
"""Seconds within which the newest sample must fall for demand to count as known: the
gateway's figures come every second, and a gap (a gateway restarting, a pull failing)
is not a lull. Without fresh figures nothing is removed, and an old sample's waiting
request wakes nobody."""


@dataclass(frozen=True)
class AutoscalingSettings:
    """One deployment's autoscaling settings (Baseten's field names and ranges)."""

    min_replica: int = 1
    """Replicas kept however idle (0: scale to zero). Baseten's default is 0; Kingpost's
    is 1, so a push serves at once and an idle self-hosted machine keeps its model warm."""
    max_replica: int = 1
    autoscaling_window: int = 60
    """Seconds of demand averaged for a decision."""
    scale_down_delay: int = 900
    """Seconds of lower demand before a replica is removed."""
    concurrency_target: int = 1
    """Requests one replica should carry at once."""
    target_utilization_percentage: int = 70
    """Share of ``concurrency_target`` to aim at, leaving headroom for bursts."""
    max_scale_down_rate: int = 50
    """Per cent of the replicas one scale-down step may remove (at least one)."""

    def validate(self) -> AutoscalingSettings:
        """Itself, or a :class:`ValidationError` naming the field, the rule and the value."""
        rules: list[tuple[str, bool, str]] = [
            ("min_replica", self.min_replica >= 0, "must be at least 0"),
            ("max_replica", self.max_replica >= 1, "must be at least 1"),
            ("autoscaling_window", 10 <= self.autoscaling_window <= 3600, "must be 10-3600 s"),
            ("scale_down_delay", 0 <= self.scale_down_delay <= 3600, "must be 0-3600 s"),
            ("concurrency_target", self.concurrency_target >= 1, "must be at least 1"),
            (
                "target_utilization_percentage",
                1 <= self.target_utilization_percentage <= 100,
                "must be 1-100 (%)",
            ),
            ("max_scale_down_rate", 1 <= self.max_scale_down_rate <= 100, "must be 1-100 (%)"),
        ]
        for name, ok, rule in rules:
            if not ok:
                value = getattr(self, name)
                raise ValidationError(
                    f"autoscaling_settings.{name}: {rule}, got {value!r}", field=name, value=value
                )
        if self.min_replica > self.max_replica:
            raise ValidationError(
                f"autoscaling_settings.min_replica: must not exceed max_replica "
                f"({self.max_replica}), got {self.min_replica}; raise max_replica too",
                field="min_replica",
                value=self.min_replica,
            )
        return self

    def to_json(self) -> dict[str, int]:
        return {f.name: int(getattr(self, f.name)) for f in fields(self)}

    def merged(self, changes: dict[str, Any]) -> AutoscalingSettings:
        """These settings with ``changes`` (fields given as ``None`` are left as they are),
        validated."""
        unknown = sorted(set(changes) - set(AUTOSCALING_FIELDS))
        if unknown:
            raise ValidationError(
                f"autoscaling_settings: unknown field(s) {', '.join(unknown)}; known: "
                f"{', '.join(AUTOSCALING_FIELDS)}",
                field=unknown[0],
            )
        given = {k: v for k, v in changes.items() if v is not None}
        for name, value in given.items():
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValidationError(
                    f"autoscaling_settings.{name}: must be an integer, got {value!r}",
                    field=name,
                    value=value,
                )
        return AutoscalingSettings(**{**self.to_json(), **given}).validate()

    @property
    def per_replica(self) -> float:
        """The demand one replica is meant to carry."""
        return self.concurrency_target * self.target_utilization_percentage / 100


AUTOSCALING_FIELDS = tuple(f.name for f in fields(AutoscalingSettings))


@dataclass(frozen=True)
class Sample:
    """What the gateway held for one deployment at one moment."""

    at: float
    inflight: int = 0
    queued: int = 0
    replicas: int = 0
    """The replica count the autoscaler wanted when the sample was taken."""

    @property
    def demand(self) -> int:
        return self.inflight + self.queued


@dataclass(frozen=True)
class Decision:
    replicas: int
    reason: str
    panic: bool = False


def panic_window_s(settings: AutoscalingSettings) -> float:
    """The short window a burst is judged on: a tenth of the autoscaling window, 2-6 s."""
    return min(6.0, max(2.0, settings.autoscaling_window / 10))


def _average(samples: Sequence[Sample], since: float) -> float:
    values = [s.demand for s in samples if s.at > since]
    return sum(values) / len(values) if values else 0.0


def _recommend(demand: float, settings: AutoscalingSettings) -> int:
    return math.ceil(demand / settings.per_replica - 1e-9) if demand > 0 else 0


def _highest_over_delay(
    samples: Sequence[Sample], settings: AutoscalingSettings, now: float
) -> int:
    """The highest recommendation at any sample of the last ``scale_down_delay`` seconds
    (each on the window that ended there): a sliding window over the samples, O(n)."""
    window, start = settings.autoscaling_window, now - settings.scale_down_delay
    best, total, lo = 0, 0, 0
    for hi, s in enumerate(samples):
        total += s.demand
        while samples[lo].at <= s.at - window:
            total -= samples[lo].demand
            lo += 1
        if s.at >= start:
            best = max(best, _recommend(total / (hi - lo + 1), settings))
    return best


def decide(
    settings: AutoscalingSettings,
    samples: Sequence[Sample],
    current: int,
    now: float,
    *,
    frozen: bool = False,
) -> Decision:
    """How many replicas the deployment should have now, and why.

    ``samples``: oldest first, as far back as ``autoscaling_window + scale_down_delay``
    (older ones are ignored). ``current``: the replicas wanted so far (starting ones
    count: they are capacity on its way). ``frozen``: a rollout owns the count.
    """
    if frozen:
        return Decision(current, f"frozen at {current}: a rollout is in progress")
    lo, hi = settings.min_replica, settings.max_replica
    if current < lo or current > hi:
        bound = max(lo, min(hi, current))
        return Decision(bound, f"{current} is outside min_replica {lo}..max_replica {hi}")
    window = settings.autoscaling_window
    stable = _average(samples, now - window)
    want = _recommend(stable, settings)
    panic_s = panic_window_s(settings)
    burst = _average(samples, now - panic_s)
    # A burst: the short window is well above what the replicas carry and above the long
    # window (a load that has lasted the whole window is a plain scale-up).
    panic = burst > stable and burst >= PANIC_THRESHOLD * settings.per_replica * max(current, 1)
    if panic:
        want = max(want, _recommend(burst, settings))
    fresh = bool(samples) and samples[-1].at > now - FRESH_S
    if current == 0 and want == 0 and fresh and samples[-1].demand > 0:
        want = 1  # a request waits at zero: wake now, whatever the window says
    load = f"{stable:.2f} in flight over {window}s"
    if want > current and current == hi:
        return Decision(current, f"at max_replica {hi}: {load} asks for {want}", panic)
    if want > current:
        up = min(hi, want)
        if panic:
            why = f"burst: {burst:.2f} in flight over the last {panic_s:.0f}s"
            return Decision(up, f"{why}, target {settings.per_replica:.2f} per replica", True)
        if current == 0:
            return Decision(up, f"waking from zero: {max(stable, burst):.2f} requests waiting")
        return Decision(up, f"scale up: {load}, target {settings.per_replica:.2f} per replica")
    if want == current == 0:
        return Decision(0, "at zero: no request waiting")
    if want == current or panic:
        return Decision(current, f"steady: {load} for {current} replica(s)", panic)
    if not fresh:
        return Decision(current, f"holding {current}: no demand figures for {FRESH_S:g}s")
    return _scale_down(settings, samples, current, now, load, want)


def _scale_down(
    settings: AutoscalingSettings,
    samples: Sequence[Sample],
    current: int,
    now: float,
    load: str,
    want: int,
) -> Decision:
    delay, window = settings.scale_down_delay, settings.autoscaling_window
    if not samples or samples[0].at > now - max(delay, window):
        seen = f"less than scale_down_delay {delay}s and autoscaling_window {window}s seen"
        return Decision(current, f"holding {current}: {seen}")
    floor = max(settings.min_replica, want, _highest_over_delay(samples, settings, now))
    if floor >= current:
        return Decision(current, f"holding {current}: demand was higher within {delay}s")
    if any(s.replicas != current for s in samples if s.at > now - window):
        return Decision(current, f"holding {current}: changed within the last {window}s")
    step = max(1, current * settings.max_scale_down_rate // 100)
    down = max(floor, current - step)
    if down == 0:
        return Decision(0, f"scale to zero: no request for {delay}s")
    return Decision(down, f"scale down: {load}, nothing higher for {delay}s")
