"""Prometheus text exposition (format 0.0.4): families of samples, rendered once per scrape.

Only what Kingpost exports needs: counters, gauges and histograms with fixed buckets, plus
families re-exposed as parsed from a replica (any type, written as they came).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

__all__ = ["CONTENT_TYPE", "Family", "render"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Labels = Mapping[str, str]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _help(text: str) -> str:
    """A HELP line's text as format 0.0.4 wants it: backslashes and line breaks escaped,
    quotes not. A replica's help may hold a line break (``prometheus_client`` unescapes
    ``\\n`` when it parses one), and a raw one would end the line there and break the whole
    scrape for every reader."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
    return "{" + inner + "}"


@dataclass
class Family:
    """One metric family: a name, a type, a help line and its samples."""

    name: str
    type: str
    help: str
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)
    """(sample name, labels, value); the sample name is the family's or, for a histogram,
    with ``_bucket``/``_sum``/``_count``."""

    def add(self, labels: Labels, value: float) -> None:
        self.samples.append((self.name, dict(labels), value))

    def histogram(
        self, labels: Labels, bounds: Sequence[float], buckets: Sequence[int], total_s: float
    ) -> None:
        """``buckets``: counts per bucket, not cumulative, the last one for ``+Inf``."""
        running = 0
        for bound, n in zip([*bounds, math.inf], buckets, strict=True):
            running += n
            le = "+Inf" if math.isinf(bound) else repr(float(bound))  # as prometheus_client
            self.samples.append((f"{self.name}_bucket", {**labels, "le": le}, running))
        self.samples.append((f"{self.name}_sum", dict(labels), total_s))
        self.samples.append((f"{self.name}_count", dict(labels), running))


def render(families: Iterable[Family]) -> str:
    """The text of ``families``; those without samples are left out."""
    out: list[str] = []
    for fam in families:
        if not fam.samples:
            continue
        out.append(f"# HELP {fam.name} {_help(fam.help)}")
        out.append(f"# TYPE {fam.name} {fam.type}")
        out.extend(f"{name}{_labels(labels)} {_number(v)}" for name, labels, v in fam.samples)
    return "\n".join(out) + "\n" if out else ""
