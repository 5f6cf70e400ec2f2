"""The Prometheus text format (version 0.0.4) of vel's figures, with no dependency."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from vel.metrics.families import COUNTER, Family, family_of
from vel.metrics.histograms import HISTOGRAMS, Histogram

__all__ = ["CONTENT_TYPE", "grouped", "render"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "vel_"

Labels = tuple[tuple[str, str], ...]


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if value != int(value) else str(int(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels) + "}"


def grouped(
    values: Iterable[tuple[str, str | None, float]],
) -> dict[Family, dict[Labels, float]]:
    """``(stats key, tier, value)`` triples as ``{family: {labels: value}}`` (values of one
    family and label set added up)."""
    families: dict[Family, dict[Labels, float]] = {}
    for key, tier, value in values:
        family, labels = family_of(key, tier)
        samples = families.setdefault(family, {})
        samples[labels] = samples.get(labels, 0.0) + float(value)
    return families


def _family_lines(family: Family, samples: Mapping[Labels, float]) -> list[str]:
    name = PREFIX + family.name + ("_total" if family.kind == COUNTER else "")
    lines = [f"# HELP {name} {family.help}", f"# TYPE {name} {family.kind}"]
    for labels, value in sorted(samples.items()):
        lines.append(f"{name}{_labels(labels)} {_number(value)}")
    return lines


def _histogram_lines(histogram: Histogram) -> list[str]:
    name = PREFIX + histogram.name
    buckets, total, count = histogram.snapshot()
    lines = [f"# HELP {name} {histogram.help}", f"# TYPE {name} histogram"]
    for bound, cumulative in buckets:
        le = "+Inf" if math.isinf(bound) else repr(bound)
        lines.append(f'{name}_bucket{{le="{le}"}} {cumulative}')
    lines.append(f"{name}_sum {_number(total)}")
    lines.append(f"{name}_count {count}")
    return lines


def render(
    values: Mapping[str, float] | None = None,
    *,
    tier: str | None = None,
    histograms: bool = True,
) -> str:
    """Return ``values`` (a ``stats()``-style mapping) and, with ``histograms``, this
    process's latency histograms, in the Prometheus text format.

    Args:
        values: figures by ``stats()`` key (see :data:`vel.metrics.families.STATS`); a key
            nobody declared is exported as a gauge, so every family is typed.
        tier: the kind of store the unprefixed keys come from (``memory``, ``redis`` or
            ``postgres``), the ``tier`` label of the families that take one.
        histograms: add the turn, load, append, flush, warm and lock-wait histograms.
    """
    families = grouped((key, tier, value) for key, value in (values or {}).items())
    lines: list[str] = []
    for family in sorted(families, key=lambda f: f.name):
        lines += _family_lines(family, families[family])
    if histograms:
        for histogram in HISTOGRAMS:
            lines += _histogram_lines(histogram)
    return "\n".join(lines) + "\n"
