"""Ratios between modes (paired within each round) and the issues' targets, from the JSON."""

from __future__ import annotations

import statistics
from typing import Any

# (numerator, denominator, what it compares, goal: the numerator must reach goal x; None:
# a figure to read, not a target).
RATIOS: tuple[tuple[str, str, str, float | None], ...] = (
    ("redis-lock", "sdk-redis", "redis, Agent's locked turn vs SDK RedisSession", 1.5),
    ("redis-lock", "ref-redis", "redis, Agent's locked turn vs raw redis-py pipeline", 0.5),
    ("redis", "ref-redis", "redis vs raw redis-py pipeline", 0.75),
    ("redis", "ref-redis-2rt", "redis vs raw redis-py, read and write apart", None),
    ("redis", "sdk-redis", "redis, unlocked, vs SDK RedisSession", None),
    ("proto-redis", "sdk-redis", "prototype locked turn vs SDK RedisSession", None),
    ("proto-redis", "ref-redis", "prototype locked turn vs raw redis-py pipeline", None),
    ("database-lock", "ref-asyncpg", "database, Agent's locked turn vs raw asyncpg", 0.9),
    ("database-lock", "sdk-sqlalchemy", "database, Agent's locked turn vs SDK SQLAlchemy", 2.0),
    ("database", "ref-asyncpg", "database vs raw asyncpg", 0.9),
    ("database", "sdk-sqlalchemy", "database, unlocked, vs SDK SQLAlchemySession", None),
    ("redis", "database", "redis vs database", 3.0),
)
# Vel's own modes, whose growth, memory and shared-session figures are targets.
VEL_MODES = ("memory", "database", "database-lock", "redis", "redis-lock", "redis-only")


def get(data: dict[str, Any], *path: str) -> Any:
    node: Any = data
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _per_round(data: dict[str, Any], mode: str) -> list[float]:
    t = get(data, "modes", mode, "throughput")
    if t is None:
        return []
    rounds = t.get("rounds") or [{"turns_per_s": t["turns_per_s"]}]
    return [float(r["turns_per_s"]) for r in rounds]


def ratios(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Each ratio of :data:`RATIOS` whose modes ran: per round, and the median and range."""
    out = []
    for a, b, label, goal in RATIOS:
        x, y = _per_round(data, a), _per_round(data, b)
        if not x or not y:
            continue
        per_round = [round(p / q, 3) for p, q in zip(x, y, strict=False) if q]
        if not per_round:
            continue
        out.append(
            {
                "ratio": f"{a} / {b}",
                "label": label,
                "median": round(statistics.median(per_round), 2),
                "min": min(per_round),
                "max": max(per_round),
                "rounds": per_round,
                "goal": goal,
            }
        )
    return out


def _target(name: str, value: Any, goal: str, ok: bool | None) -> dict[str, Any]:
    return {"target": name, "value": value, "goal": goal, "ok": ok}


def targets(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target, with the measured value and whether it is met."""
    out: list[dict[str, Any]] = []
    for r in data.get("ratios") or ratios(data):
        if r["goal"] is not None:
            ok = r["median"] >= r["goal"]
            out.append(_target(f"turns/s, {r['label']}", r["median"], f">= {r['goal']}", ok))
    lock = get(data, "modes", "redis-lock", "throughput")
    if lock is not None:
        cmds = get(lock, "redis", "commands_per_turn")
        if cmds is not None:
            out.append(_target("redis-lock: Redis commands per turn", cmds, "<= 6", cmds <= 6))
        cpu = lock["client_cpu_us_per_turn"]
        out.append(_target("redis-lock: client CPU per turn (us)", cpu, "<= 200", cpu <= 200))
    for mode in VEL_MODES:
        g = get(data, "modes", mode, "growth", "ratio")
        if g is not None:
            out.append(_target(f"{mode}: last turns / first turns latency", g, "<= 1.2", g <= 1.2))
    for mode in ("redis", "redis-lock"):
        pg = get(data, "modes", mode, "throughput", "pg_tx_per_1000_messages")
        if pg is not None:
            out.append(
                _target(f"{mode}: Postgres transactions / 1000 messages", pg, "<= 20", pg <= 20)
            )
    lag = get(data, "modes", "redis", "steady", "flush_lag", "p99_ms")
    if lag is not None:
        out.append(_target("redis: flush lag p99 at steady rate (ms)", lag, "<= 1000", lag <= 1000))
    for mode in ("redis", "redis-only"):
        mem = get(data, "modes", mode, "throughput", "redis_memory", "ratio")
        if mem is not None:
            out.append(_target(f"{mode}: Redis bytes / JSON bytes", mem, "<= 1.5", mem <= 1.5))
    # vel's modes only: a peer's worker also imports the whole Agents SDK.
    rss = [
        get(data, "modes", m, "throughput", "worker_rss_mb")
        for m in VEL_MODES
        if get(data, "modes", m, "throughput", "worker_rss_mb") is not None
    ]
    if rss:
        out.append(_target("worker RSS, worst vel mode (MB)", max(rss), "<= 80", max(rss) <= 80))
    for mode in VEL_MODES:
        s = get(data, "modes", mode, "shared")
        if s is None:
            continue
        check = s["check"]
        lost = check["lost"]
        mixed = check["split"] + check["stale"] + check["duplicated"]
        out.append(
            _target(
                f"{mode}: shared sessions lost / interleaved turns",
                f"{lost} / {mixed}",
                "0 / 0",
                lost == 0 and mixed == 0,
            )
        )
        if mode != "memory" and s["p50_ms"]:
            spread = round(s["p99_ms"] / s["p50_ms"], 1)
            out.append(_target(f"{mode}: shared sessions p99 / p50", spread, "<= 5", spread <= 5))
    over = get(data, "agent", "redis", "overhead_p50_ms")
    if over is not None:
        out.append(_target("redis: vel overhead per agent turn p50 (ms)", over, "<= 2", over <= 2))
    return out
