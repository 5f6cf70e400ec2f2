"""Summaries of the workers' raw figures: percentiles, medians over rounds, flush lag."""

from __future__ import annotations

import statistics
from typing import Any


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def latency_summary(seconds: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in seconds]
    return {
        "p50_ms": round(percentile(ms, 0.50), 3),
        "p95_ms": round(percentile(ms, 0.95), 3),
        "p99_ms": round(percentile(ms, 0.99), 3),
    }


def window_median(latencies: list[float], around: int, width: int = 10) -> float:
    """Median latency (ms) of the ``width`` turns ending at turn ``around`` (1-based)."""
    hi = max(width, min(around, len(latencies)))
    return statistics.median(latencies[hi - width : hi]) * 1000 if latencies else 0.0


def flush_lag(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Time from an append's acknowledgement to the Postgres commit holding it."""
    commits: dict[str, list[tuple[float, int]]] = {}
    for r in results:
        for sid, upto, at in r["commits"]:
            commits.setdefault(sid, []).append((at, upto))
    for entries in commits.values():
        entries.sort()
    lags: list[float] = []
    unflushed = 0
    for r in results:
        for sid, seq, acked in r["acks"]:
            done = next((at for at, upto in commits.get(sid, []) if upto >= seq), None)
            if done is None:
                unflushed += 1
            else:
                lags.append(max(0.0, done - acked))
    return {
        "samples": len(lags),
        "never_flushed": unflushed,
        "p50_ms": round(percentile(lags, 0.5) * 1000, 1),
        "p99_ms": round(percentile(lags, 0.99) * 1000, 1),
        "max_ms": round(max(lags, default=0.0) * 1000, 1),
    }


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def median_of_rounds(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from the rounds' rows: the median of every number (nested dicts too); lists
    are joined (errors), anything else is taken from the first round."""
    out: dict[str, Any] = {}
    for key in rows[0]:
        values = [r[key] for r in rows if key in r]
        if all(_is_number(v) for v in values):
            m = statistics.median(values)
            out[key] = round(m, 3) if isinstance(m, float) else m
        elif all(isinstance(v, dict) for v in values):
            out[key] = median_of_rounds(values)
        elif all(isinstance(v, list) for v in values):
            out[key] = [x for v in values for x in v][:5]
        else:
            out[key] = values[0]
    return out
