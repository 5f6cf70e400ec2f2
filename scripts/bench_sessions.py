"""Listing sessions at scale (issue 16): 1,000,000 sessions over 10,000 owners in Postgres.

Measured through vel's own API (``PostgresStore.find_sessions``, what ``agent.ctxmgr.
find_sessions`` calls), round trip included:

- one page of 50 of an owner's sessions, newest activity first, for random owners: p50, p99;
- one page of 50 of all sessions by cursor: page 1 and page 1,000 (the cursor of page 999
  kept and the page re-read), p50 of each and their ratio;
- the plans of both statements (index scans, rows read).

The sessions are written straight into a database of the script's own (created, then dropped
at the end), each with one message row; their activity times are spread over 30 days.

    nice -n 10 .venv/bin/python scripts/bench_sessions.py [--sessions 1000000]
        [--owners 10000] [--queries 2000] [--json out.json] [--dsn postgresql://...]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import time
from typing import Any

import asyncpg
from _bench import emit, in_private_database

from vel.stores.listing import make_query
from vel.stores.postgres import PostgresStore
from vel.stores.postgres.catalog import listing_sql
from vel.stores.postgres.migrate import migrate

SEED = """
INSERT INTO vel_session_rows (id, owner, last_seq, metadata, created_at, updated_at)
SELECT 's' || n, 'u' || (n % $2), 1, jsonb_build_object('title', 'conversation ' || n),
       t - interval '1 hour', t
  FROM (SELECT n, now() - random() * interval '30 days' AS t
          FROM generate_series($1::bigint, $1::bigint + $3 - 1) AS n) g
"""
SEED_MESSAGES = """
INSERT INTO vel_messages (session_id, seq, message_id, message)
SELECT 's' || n, 1, 'm' || n, '{"role": "user", "content": "hello"}'::jsonb
  FROM generate_series($1::bigint, $1::bigint + $2 - 1) AS n
"""


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def seed(dsn: str, sessions: int, owners: int) -> float:
    started = time.perf_counter()
    conn = await asyncpg.connect(dsn)
    try:
        chunk = 100_000
        for first in range(0, sessions, chunk):
            size = min(chunk, sessions - first)
            await conn.execute(SEED, first, owners, size)
            await conn.execute(SEED_MESSAGES, first, size)
        await conn.execute("VACUUM ANALYZE vel_session_rows")
        await conn.execute("VACUUM ANALYZE vel_messages")
    finally:
        await conn.close()
    return time.perf_counter() - started


async def timed(store: PostgresStore, **query: Any) -> tuple[float, Any]:
    q = make_query(query.get("owner"), None, query.get("order", "newest"), 50, query.get("cursor"))
    started = time.perf_counter()
    page = await store.find_sessions(q)
    return (time.perf_counter() - started) * 1000, page


async def plan(dsn: str, sql: str, *args: Any) -> str:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) {sql}", *args)
    finally:
        await conn.close()
    return "\n".join(r[0] for r in rows)


async def bench(dsn: str, sessions: int, owners: int, queries: int) -> dict[str, Any]:
    result: dict[str, Any] = {"sessions": sessions, "owners": owners}
    await migrate(dsn)
    result["seed_seconds"] = round(await seed(dsn, sessions, owners), 1)
    store = PostgresStore(dsn, pool_max=2)
    try:
        rng = random.Random(16)
        for _ in range(50):  # warm the pool and the caches
            await timed(store, owner=f"u{rng.randrange(owners)}")
        owner_ms: list[float] = []
        for _ in range(queries):
            ms, page = await timed(store, owner=f"u{rng.randrange(owners)}")
            assert len(page.sessions) == min(50, sessions // owners)
            owner_ms.append(ms)
        result["owner_page_ms"] = {
            "p50": round(statistics.median(owner_ms), 2),
            "p99": round(quantile(owner_ms, 0.99), 2),
            "max": round(max(owner_ms), 2),
        }
        # All sessions by cursor: walk to page 1,000, keeping the cursor of page 999.
        cursor = None
        for _ in range(999):
            _, page = await timed(store, cursor=cursor)
            cursor = page.next_cursor
        assert cursor is not None
        first_ms, last_ms = [], []
        for _ in range(max(100, queries // 10)):
            ms, _ = await timed(store)
            first_ms.append(ms)
            ms, page = await timed(store, cursor=cursor)
            assert len(page.sessions) == 50
            last_ms.append(ms)
        p1, p1000 = statistics.median(first_ms), statistics.median(last_ms)
        result["all_pages_ms"] = {
            "page_1_p50": round(p1, 2),
            "page_1000_p50": round(p1000, 2),
            "page_1000_over_page_1": round(p1000 / p1, 2),
            "page_1_p99": round(quantile(first_ms, 0.99), 2),
            "page_1000_p99": round(quantile(last_ms, 0.99), 2),
        }
        result["plan_owner_page"] = await plan(dsn, listing_sql(True, True, True), "u42", None, 51)
    finally:
        await store.aclose()
    return result


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dsn", default=os.environ.get("POSTGRES_DSN", "postgresql://postgres@127.0.0.1/test")
    )
    parser.add_argument("--sessions", type=int, default=1_000_000)
    parser.add_argument("--owners", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args()
    result = await in_private_database(
        args.dsn, "sessions", lambda dsn: bench(dsn, args.sessions, args.owners, args.queries)
    )
    emit(result, args.json)


if __name__ == "__main__":
    asyncio.run(main())
