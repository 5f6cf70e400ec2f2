"""A cold turn on a long session: 'redis' mode against 'database' mode (DESIGN.md 3.10).

A session of N messages (default 300,000, ~110 B each) is written straight into Postgres;
then an Agent with ``ContextManager(max_history=20)`` takes one turn on it, the model served
by vel's fake OpenAI server. 'database' mode reads its window from Postgres; 'redis' mode finds
the session absent from Redis (cold) and warms it. Each run uses its own copy of the session
and, in 'redis' mode, starts with no key of it in Redis; the Agent's connections are opened
by a turn on an empty session first, so the time is the long session's turn alone. Reported
per mode: the turn's time (median and max of the runs) and, for 'redis', the bytes the
session's keys take in Redis afterwards (``MEMORY USAGE``), and how many messages Redis holds
of it.

    .venv/bin/python scripts/bench_cold_window.py [--messages 300000] [--runs 5]
        [--op-timeout 1] [--json out.json]

Needs POSTGRES_DSN-style access to the local test servers (``--dsn``, ``--redis-url``); it
works in a schema and key prefix of its own, removed afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from _bench import drop_namespace

from vel import Agent, ContextManager
from vel.stores.postgres.migrate import migrate
from vel.stores.redis.keys import KeyLayout
from vel.testing import FakeOpenAIServer

SEED = """
INSERT INTO vel_messages (session_id, seq, message_id, message)
SELECT $1, g, md5($1 || g), jsonb_build_object(
    'role', CASE WHEN g % 2 = 1 THEN 'user' ELSE 'assistant' END,
    'content', 'message ' || g || ' ' || repeat('x', 80))
  FROM generate_series(1, $2::bigint) AS g
"""


async def seed(dsn: str, schema: str, sids: list[str], n: int) -> None:
    conn = await asyncpg.connect(dsn, server_settings={"search_path": schema})
    try:
        for sid in sids:
            await conn.execute(
                "INSERT INTO vel_session_rows (id, last_seq) VALUES ($1, $2)", sid, n
            )
            await conn.execute(SEED, sid, n)
        await conn.execute("ANALYZE vel_messages")
    finally:
        await conn.close()


async def redis_footprint(url: str, prefix: str, sid: str) -> tuple[int, int]:
    keys = KeyLayout(prefix).session(sid)
    client = aioredis.Redis.from_url(url)
    try:
        total = 0
        for key in keys.data:
            total += int(await client.memory_usage(key, samples=0) or 0)
        held = int(await client.llen(keys.messages))
    finally:
        await client.aclose()
    return total, held


async def one_turn(mode: str, sid: str, server: FakeOpenAIServer) -> float:
    model = {"provider": "openai", "model": "gpt-4o", "api_key": "x", "base_url": server.base_url}
    async with Agent(
        id="bench",
        model=model,
        session_storage=mode,
        context_manager=ContextManager(max_history=20),
    ) as agent:
        # Connections opened first (on a new, empty session), so only the cold read counts.
        await agent.run({"message": "warm-up"}, session_id=f"warmup-{uuid.uuid4().hex}")
        began = time.perf_counter()
        await agent.run({"message": "hello"}, session_id=sid)
        return time.perf_counter() - began


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    await migrate(args.dsn, schema=schema)
    os.environ.update(
        POSTGRES_DSN=f"{args.dsn}?search_path={schema}",
        REDIS_URL=args.redis_url,
        VEL_KEY_PREFIX=prefix,
        VEL_OP_TIMEOUT=str(args.op_timeout),
    )
    runs: dict[str, list[float]] = {"database": [], "redis": []}
    footprint: list[tuple[int, int]] = []
    errors: dict[str, list[str]] = {"database": [], "redis": []}
    sids = {mode: [f"{mode}-{i}" for i in range(args.runs)] for mode in runs}
    try:
        began = time.perf_counter()
        await seed(args.dsn, schema, sids["database"] + sids["redis"], args.messages)
        print(f"seeded {2 * args.runs} sessions of {args.messages} messages "
              f"in {time.perf_counter() - began:.1f} s")  # fmt: skip
        with FakeOpenAIServer() as server:
            for i in range(args.runs):
                for mode in ("database", "redis"):
                    sid = sids[mode][i]
                    try:
                        runs[mode].append(await one_turn(mode, sid, server))
                    except Exception as exc:  # a failed turn is a figure, not a crash
                        errors[mode].append(f"{type(exc).__name__}: {exc}")
                        continue
                    if mode == "redis":
                        footprint.append(await redis_footprint(args.redis_url, prefix, sid))
    finally:
        await drop_namespace(args.dsn, schema, args.redis_url, prefix)

    def summary(xs: list[float]) -> dict[str, Any]:
        if not xs:
            return {"runs": 0}
        return {"runs": len(xs), "median_s": round(statistics.median(xs), 4),
                "max_s": round(max(xs), 4)}  # fmt: skip

    figures: dict[str, Any] = {
        "messages": args.messages,
        "op_timeout_s": args.op_timeout,
        "database": {**summary(runs["database"]), "errors": errors["database"]},
        "redis": {**summary(runs["redis"]), "errors": errors["redis"]},
    }
    if footprint:
        figures["redis"]["redis_bytes_max"] = max(b for b, _ in footprint)
        figures["redis"]["redis_messages_held_max"] = max(h for _, h in footprint)
    if runs["database"] and runs["redis"]:
        figures["redis_over_database"] = round(
            statistics.median(runs["redis"]) / statistics.median(runs["database"]), 2
        )
    return figures


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/test")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--messages", type=int, default=300_000)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--op-timeout", type=float, default=1.0, help="VEL_OP_TIMEOUT for the turns")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    figures = asyncio.run(measure(args))
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
