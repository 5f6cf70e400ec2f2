"""What one 'database'-mode append writes to Postgres' WAL, before and after the migrations of
issue 16 (0005 owners and listing indexes, 0006 the spec's view): the append must cost what it
did.

The same append statement (vel's own, ``vel.stores.postgres.sessions._APPEND``) runs against
three schemas of a database of the script's own: ``before`` (migrations up to 0004, the base
table still named ``vel_sessions``), ``after`` (every migration), and ``after_owned`` (every
migration, each session with an owner, so the owner's listing index takes an entry too). WAL
records are read back with ``pg_walinspect`` and counted only for this database's relations
(and the commits of the transactions that wrote them), so other clients of the server do not
count. Reported per schema: WAL records and bytes (without full-page images) per append, and
the append's median time.

    nice -n 10 .venv/bin/python scripts/bench_append_wal.py [--appends 2000] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
import uuid
from typing import Any

import asyncpg
from _bench import emit, in_private_database

from vel.stores.postgres.migrate import load_migrations, migrate
from vel.stores.postgres.sessions import _APPEND

SESSIONS = 100
_RECORDS = """
SELECT xid::text::bigint AS xid, resource_manager, record_length, fpi_length,
       coalesce(block_ref, '') AS block_ref
  FROM public.pg_get_wal_records_info($1::pg_lsn, $2::pg_lsn)
"""


async def prepare(conn: asyncpg.Connection, dsn: str, schema: str) -> str:
    """Create ``schema`` at the shape its name says; return the table appends lock."""
    await conn.execute(f'CREATE SCHEMA "{schema}"')
    if schema == "before":
        await conn.execute(f'SET search_path = "{schema}"')
        await conn.execute(
            "CREATE TABLE vel_schema_version (version integer PRIMARY KEY,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for m in load_migrations():
            if m.version < 5:
                await conn.execute(m.sql)
        table = "vel_sessions"
    else:
        await migrate(dsn, schema)
        table = "vel_session_rows"
    await conn.execute(f'SET search_path = "{schema}"')
    owner = "'someone'" if schema == "after_owned" else "NULL"
    columns = "(id, last_seq, owner)" if schema != "before" else "(id, last_seq)"
    values = f"'s' || n, 0, {owner}" if schema != "before" else "'s' || n, 0"
    await conn.execute(
        f"INSERT INTO {table} {columns} SELECT {values} FROM generate_series(1, {SESSIONS}) n"
    )
    await conn.execute("CHECKPOINT")
    return table


async def run(conn: asyncpg.Connection, schema: str, table: str, appends: int) -> dict[str, Any]:
    await conn.execute(f'SET search_path = "{schema}"')
    sql = _APPEND.replace("vel_session_rows", table)
    dboid = await conn.fetchval("SELECT oid FROM pg_database WHERE datname = current_database()")
    message = json.dumps({"role": "user", "content": "hello there"})
    start = await conn.fetchval("SELECT pg_current_wal_insert_lsn()")
    times: list[float] = []
    for i in range(appends):
        began = time.perf_counter()
        await conn.fetchval(sql, f"s{1 + i % SESSIONS}", [uuid.uuid4().hex], [message], None)
        times.append((time.perf_counter() - began) * 1000)
    # Every append committed synchronously, so its records are flushed by now (walinspect
    # reads up to the flushed end only).
    end = await conn.fetchval("SELECT pg_current_wal_flush_lsn()")
    rows = await conn.fetch(_RECORDS, start, end)
    marker = f"/{dboid}/"
    mine = {r["xid"] for r in rows if marker in r["block_ref"] and r["xid"]}
    ours = [r for r in rows if r["xid"] in mine]
    return {
        "wal_records_per_append": round(len(ours) / appends, 3),
        "wal_bytes_per_append": round(
            sum(r["record_length"] - r["fpi_length"] for r in ours) / appends, 1
        ),
        "append_ms_p50": round(statistics.median(times), 3),
        "records_by_kind": _kinds(ours, appends),
    }


def _kinds(rows: list[Any], appends: int) -> dict[str, float]:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["resource_manager"]] = counts.get(r["resource_manager"], 0) + 1
    return {k: round(v / appends, 3) for k, v in sorted(counts.items())}


async def bench(dsn: str, appends: int) -> dict[str, Any]:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("CREATE EXTENSION pg_walinspect SCHEMA public")
        result: dict[str, Any] = {"appends": appends}
        tables = {s: await prepare(conn, dsn, s) for s in ("before", "after", "after_owned")}
        for schema, table in tables.items():
            await run(conn, schema, table, 200)  # warm-up
            result[schema] = await run(conn, schema, table, appends)
        return result
    finally:
        await conn.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dsn", default=os.environ.get("POSTGRES_DSN", "postgresql://postgres@127.0.0.1/test")
    )
    parser.add_argument("--appends", type=int, default=2000)
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args()
    result = await in_private_database(args.dsn, "wal", lambda dsn: bench(dsn, args.appends))
    emit(result, args.json)


if __name__ == "__main__":
    asyncio.run(main())
