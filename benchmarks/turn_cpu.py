"""Client CPU per turn: vel's Redis-only store against plain redis.asyncio calls.

One process, 16 asyncio tasks, 64 sessions, 200 turns per task after a warm-up round; a turn
reads the last 20 messages and appends a ~300 B and a ~800 B message. Prints turns/s and
client CPU per turn for each variant (docs/benchmarks.md, "where the time goes").

    .venv/bin/python -m benchmarks.turn_cpu [--redis-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis

from benchmarks.workload import turn_messages
from vel.stores.redis import RedisStore

TASKS, TURNS, SESSIONS, WINDOW = 16, 200, 64, 20

Turn = Callable[[str, int], Awaitable[None]]


async def measure(name: str, turn: Turn) -> None:
    async def task(i: int) -> None:
        for n in range(TURNS):
            await turn(f"s{(i * 7 + n) % SESSIONS}", n)

    await asyncio.gather(*(task(i) for i in range(TASKS)))  # warm-up: sessions hold history
    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(task(i) for i in range(TASKS)))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    turns = TASKS * TURNS
    print(f"{name:58} {turns / wall:8.0f} turns/s {cpu / turns * 1e6:6.0f} us CPU/turn")


def plain_turn(client: aioredis.Redis, prefix: str) -> Turn:
    async def turn(sid: str, n: int) -> None:
        key = f"{prefix}:{sid}"
        [json.loads(item) for item in await client.lrange(key, -WINDOW, -1)]
        encoded = [json.dumps(m, separators=(",", ":")) for m in turn_messages(f"{sid}/{n}")]
        await client.rpush(key, *encoded)

    return turn


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    url = parser.parse_args().redis_url
    prefix = f"velcpu-{uuid.uuid4().hex[:8]}"
    default = aioredis.Redis.from_url(url)
    blocking = aioredis.Redis(
        connection_pool=aioredis.BlockingConnectionPool.from_url(
            url, max_connections=20, timeout=5, socket_timeout=5, socket_connect_timeout=5
        )
    )
    store = RedisStore(url, key_prefix=prefix, write_behind=False, pool_max=20)

    async def vel_turn(sid: str, n: int) -> None:
        await store.load(sid, limit=WINDOW)
        await store.append(sid, turn_messages(f"{sid}/{n}"))

    try:
        await measure("redis-py, LRANGE then RPUSH, default pool", plain_turn(default, prefix))
        await measure(
            "redis-py, the same on vel's pool settings", plain_turn(blocking, prefix + "b")
        )
        await measure("vel RedisStore (Redis-only): load + append", vel_turn)
    finally:
        keys = [k async for k in default.scan_iter(match=f"{prefix}*", count=1000)]
        if keys:
            await default.delete(*keys)
        await store.aclose()
        await default.aclose()
        await blocking.aclose()


if __name__ == "__main__":
    asyncio.run(main())
