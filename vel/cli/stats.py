"""``vel stats``: the write-behind backlog and every process's counters, from Redis.

Counters are cumulative over every worker and flusher sharing the key prefix (each process
reports what grew at most once a second, see :mod:`vel.totals`), so this works from any
machine. ``--watch`` redraws in place until Ctrl-C.

Summaries (``ContextManager(summarize=True)``): summariser calls and failures, sessions whose
summary is due (K or more messages older than the window not covered yet, as a summariser
last saw them) and the largest such lag, from Redis ('redis' mode) plus, when a DSN is
configured, from Postgres' ``vel_summaries`` ('database' mode).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from vel.bounds import COUNT, INTERVAL, cli
from vel.cli._common import add_command, add_connection_flags, settings_from
from vel.errors import VelError
from vel.totals import RATE_WINDOW, read_totals


async def summaries(hot: Any, cold: Any = None) -> dict[str, float]:
    """Summary figures of both tiers (a Postgres that cannot be read is reported, skipped)."""
    from vel.summaries.postgres import PostgresSummaries
    from vel.summaries.redis import summary_figures

    figures = await summary_figures(hot)
    if cold is not None:
        try:
            durable = await PostgresSummaries(cold).figures()
        except VelError as exc:
            print(f"vel stats: summaries in Postgres not read: {exc}", file=sys.stderr)
            return figures
        for key in ("summary_calls", "summary_failures", "summary_sessions_behind"):
            figures[key] += durable[key]
        figures["summary_max_lag"] = max(figures["summary_max_lag"], durable["summary_max_lag"])
    return figures


async def collect(hot: Any, cold: Any = None) -> dict[str, float]:
    """Backlog gauges, the flush rate, the shared counters and the summary figures."""
    unflushed, oldest, dirty = await hot.backlog()
    conflicts = await hot.conflict_count()
    totals, rate = await read_totals(hot)
    hits = totals.get("redis_hits", 0.0)
    misses = totals.get("redis_misses", 0.0)
    return {
        "unflushed_messages": unflushed,
        "oldest_dirty_age": round(oldest, 3),
        "dirty_sessions": dirty,
        "conflict_sessions": conflicts,
        "flush_rate": round(rate, 3),
        "flushed_messages": totals.get("flushed_messages", 0.0),
        "flush_batches_ok": totals.get("flush_batches_ok", 0.0),
        "flush_batches_failed": totals.get("flush_batches_failed", 0.0),
        "warm_hits": hits,
        "warm_misses": misses,
        "warm_hit_ratio": round(hits / (hits + misses), 4) if hits + misses else 0.0,
        "warm_loads": totals.get("warm_loads_ok", 0.0),
        "backpressure_rejections": totals.get("backpressure_rejections", 0.0),
        **(await summaries(hot, cold)),
    }


_LABELS = {
    "unflushed_messages": "unflushed messages",
    "oldest_dirty_age": "oldest dirty age (s)",
    "dirty_sessions": "dirty sessions",
    "conflict_sessions": "flush conflicts (unresolved)",
    "flush_rate": f"flush rate (msg/s, {RATE_WINDOW} s)",
    "flushed_messages": "flushed messages",
    "flush_batches_ok": "flush batches ok",
    "flush_batches_failed": "flush batches failed",
    "warm_hits": "warm hits",
    "warm_misses": "warm misses",
    "warm_hit_ratio": "warm hit ratio",
    "warm_loads": "loaded from Postgres",
    "backpressure_rejections": "backpressure rejections",
    "summary_calls": "summariser calls",
    "summary_failures": "summariser failures",
    "summary_sessions_behind": "sessions with a summary due",
    "summary_max_lag": "largest summary lag (messages)",
}


def _number(value: float) -> str:
    return str(int(value)) if value == int(value) else f"{value:.3f}"


def _table(figures: dict[str, float]) -> list[str]:
    return [f"{_LABELS.get(k, k):32} {_number(v)}" for k, v in figures.items()]


async def cmd_stats(args: argparse.Namespace) -> int:
    from vel.stores.redis import RedisStore

    settings = settings_from(args)
    hot = RedisStore.from_settings(settings, write_behind=True)
    cold = None
    if settings.postgres_dsn:
        from vel.stores.postgres import PostgresStore

        cold = PostgresStore.from_settings(settings)
    drawn = 0
    try:
        iteration = 0
        while True:
            figures = await collect(hot, cold)
            iteration += 1
            if args.json:
                print(json.dumps(figures), flush=True)
            else:
                lines = _table(figures)
                if args.watch:
                    stamp = time.strftime("%H:%M:%S")
                    lines.insert(0, f"vel stats  {hot.keys.prefix}  {stamp}  (Ctrl-C to stop)")
                    # Move up over the previous table and clear it: redrawn in place.
                    up = f"\x1b[{drawn}F\x1b[J" if drawn else ""
                    sys.stdout.write(up + "\n".join(lines) + "\n")
                    sys.stdout.flush()
                    drawn = len(lines)
                else:
                    print("\n".join(lines))
            if not args.watch or (args.count and iteration >= args.count):
                return 0
            await asyncio.sleep(args.interval)
    finally:
        await hot.aclose()
        if cold is not None:
            await cold.aclose()


def register(sub: Any) -> None:
    p = add_command(sub, "stats", "backlog, flush rate, warm hits/misses and summaries")
    # Redis, and Postgres for 'database'-mode summaries when a DSN is configured.
    add_connection_flags(p)
    p.add_argument("--json", action="store_true", help="one JSON object per refresh")
    p.add_argument("--watch", action="store_true", help="refresh in place until Ctrl-C")
    p.add_argument(
        "--interval",
        type=cli(INTERVAL, "--interval"),
        default=2.0,
        help="seconds between refreshes",
    )
    p.add_argument(
        "--count",
        type=cli(COUNT, "--count"),
        default=0,
        help="with --watch: stop after N refreshes (0: never)",
    )
    p.set_defaults(run=cmd_stats)
