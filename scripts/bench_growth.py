"""Per-turn cost as a session grows: turn 10 against turn 500 with ``max_history=20``.

A turn is what an agent does to its store: read the 20-message window, then append the user
message (~300 B) and the assistant answer (~800 B) in one atomic append. With ``--agent`` a
full ``Agent.run`` turn is timed too, against vel's fake OpenAI server.

    .venv/bin/python scripts/bench_growth.py [--turns 500] [--modes memory,database,redis]

Needs POSTGRES_DSN (default postgresql://postgres@127.0.0.1:5432/test) and Redis on
REDIS_URL; it uses its own schema and key prefix and removes them afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg

from vel import Agent, ContextManager
from vel.stores.base import SessionStore
from vel.stores.memory import MemoryStore
from vel.stores.migrate import migrate
from vel.stores.postgres import PostgresStore
from vel.stores.redis import RedisStore
from vel.stores.tiered import TieredStore
from vel.testing.fake_openai import FakeOpenAIServer

USER = {"role": "user", "content": "u" * 280}
ASSISTANT = {"role": "assistant", "content": "a" * 780}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def window_stats(latencies: list[float], around: int, width: int = 10) -> float:
    """Median latency (ms) of the turns numbered around-width/2 .. around+width/2."""
    lo = max(0, around - width // 2 - 1)
    return statistics.median(latencies[lo : lo + width]) * 1000


async def store_turns(store: SessionStore, turns: int) -> list[float]:
    session = f"growth-{uuid.uuid4().hex[:8]}"
    latencies = []
    for _ in range(turns):
        start = time.perf_counter()
        await store.load(session, limit=20)
        await store.append(session, [USER, ASSISTANT])
        latencies.append(time.perf_counter() - start)
    return latencies


async def agent_turns(store: SessionStore, turns: int, base_url: str) -> list[float]:
    session = f"growth-agent-{uuid.uuid4().hex[:8]}"
    agent = Agent(
        id="bench",
        model={"provider": "openai", "model": "gpt-4o", "api_key": "x", "base_url": base_url},
        session_storage=store,
        context_manager=ContextManager(max_history=20),
    )
    latencies = []
    for i in range(turns):
        start = time.perf_counter()
        await agent.run({"message": f"turn {i} " + "u" * 280}, session_id=session)
        latencies.append(time.perf_counter() - start)
    await agent.provider.aclose()
    return latencies


async def make(mode: str, dsn: str, schema: str, redis_url: str, prefix: str) -> SessionStore:
    if mode == "memory":
        return MemoryStore()
    if mode == "database":
        return PostgresStore(dsn, schema=schema)
    if mode == "redis":
        return TieredStore(
            RedisStore(redis_url, key_prefix=prefix, write_behind=True),
            PostgresStore(dsn, schema=schema),
        )
    raise SystemExit(f"unknown mode {mode}")


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=500)
    parser.add_argument("--modes", default="memory,database,redis")
    parser.add_argument("--agent", action="store_true", help="also time full Agent turns")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()
    dsn = os.environ.get("POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(dsn)
    await conn.execute(f'CREATE SCHEMA "{schema}"')
    await migrate(dsn, schema=schema)
    results: dict[str, Any] = {}
    server = FakeOpenAIServer().start() if args.agent else None
    try:
        for mode in args.modes.split(","):
            kinds = [("store", store_turns)]
            for kind, _ in kinds + ([("agent", None)] if server else []):
                store = await make(mode, dsn, schema, redis_url, prefix)
                try:
                    if kind == "store":
                        lat = await store_turns(store, args.turns)
                    else:
                        assert server is not None
                        lat = await agent_turns(store, args.turns, server.base_url)
                finally:
                    await store.aclose()
                t10 = window_stats(lat, 10)
                tn = window_stats(lat, args.turns)
                results[f"{mode}/{kind}"] = {
                    "turn_10_ms": round(t10, 3),
                    f"turn_{args.turns}_ms": round(tn, 3),
                    "ratio": round(tn / t10, 3),
                    "p50_ms": round(statistics.median(lat) * 1000, 3),
                    "p99_ms": round(percentile(lat, 0.99) * 1000, 3),
                }
                row = results[f"{mode}/{kind}"]
                print(
                    f"{mode:9} {kind:6} turn 10: {t10:7.3f} ms   turn {args.turns}: {tn:7.3f} ms"
                    f"   ratio {row['ratio']:.2f}   (p50 {row['p50_ms']} ms, p99 "
                    f"{row['p99_ms']} ms)",
                    flush=True,
                )
    finally:
        if server is not None:
            server.stop()
        await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await conn.close()
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(redis_url)
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*", count=1000)]
        if keys:
            await client.delete(*keys)
        await client.aclose()
    if args.json:
        await asyncio.to_thread(Path(args.json).write_text, json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
