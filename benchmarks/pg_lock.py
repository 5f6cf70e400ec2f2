"""How a locked 'database' turn should take and give back its lease: the options, measured.

    python -m benchmarks.pg_lock                 # 3 interleaved rounds, about two minutes
    python -m benchmarks.pg_lock --quick

Every option runs the same turn as the bench (read the 20-message window, append a user and
an assistant message) under a turn lock, 2 processes x 16 tasks, in interleaved rounds beside
raw asyncpg (no lock, the floor) and vel's unlocked append. The lock variants:

- ``4rt-logged``: vel before this change: acquire, read, append, release; four round trips,
  the lease row in a logged table (two extra durable commits per turn);
- ``4rt-unlogged``: the same round trips, the lease table ``UNLOGGED`` (no WAL, so the lock
  commits wait for no disk flush; a Postgres crash forgets held leases);
- ``4rt-async-commit``: the same round trips on a logged table, the lock statements on
  connections with ``synchronous_commit = off``;
- ``3rt-unlogged``: acquire; read; append and release in one statement (one durable commit);
- ``2rt-unlogged``: acquire and read in one call (``vel_turn_begin``: its later statements
  take fresh snapshots, so they see the turn that released the lock just before); append and
  release (a DELETE of the lease row) in one statement. What vel did from 0002 to 0007;
- ``2rt-keep-row``: the same, the release keeping the row, expired (``UPDATE``), so the next
  acquire updates it in place instead of inserting it (migration 0008). What vel now does;
- ``2rt-async-commit``: the same on a logged lease table, the function committing with
  ``synchronous_commit = off`` (``set_config`` local to its transaction).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg

from benchmarks.modes import PostgresReference, create_reference_table
from benchmarks.workload import turn_messages

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"
OPTIONS = (
    "ref-asyncpg",
    "unlocked",
    "4rt-logged",
    "4rt-unlogged",
    "4rt-async-commit",
    "3rt-unlogged",
    "2rt-unlogged",
    "2rt-keep-row",
    "2rt-async-commit",
)
LEASE = 10.0

_ACQUIRE = """
INSERT INTO vel_locks AS l (session_id, token, expires_at)
VALUES ($1, $2, now() + $3::float8 * interval '1 second')
ON CONFLICT (session_id) DO UPDATE
   SET token = EXCLUDED.token, expires_at = EXCLUDED.expires_at
 WHERE l.expires_at < now()
RETURNING token
"""
_RELEASE = "DELETE FROM vel_locks WHERE session_id = $1 AND token = $2"
_LOAD = """
SELECT m.message::text FROM vel_messages m
 WHERE m.session_id = $1
   AND EXISTS (SELECT 1 FROM vel_session_rows s WHERE s.id = $1 AND s.last_seq > 0
                AND (s.expires_at IS NULL OR s.expires_at > now()))
 ORDER BY m.seq DESC LIMIT $2::bigint
"""
_APPEND_CTES = """
sess AS (
    INSERT INTO vel_session_rows AS s (id, last_seq, expires_at)
    VALUES ($1, cardinality($2::text[]), now() + $4::float8 * interval '1 second')
    ON CONFLICT (id) DO UPDATE
       SET last_seq = s.last_seq + EXCLUDED.last_seq, updated_at = now(),
           expires_at = EXCLUDED.expires_at,
           created_at = CASE WHEN s.last_seq = 0 THEN now() ELSE s.created_at END
     WHERE s.expires_at IS NULL OR s.expires_at > now()
    RETURNING s.last_seq
), ins AS (
    INSERT INTO vel_messages (session_id, seq, message_id, message)
    SELECT $1, sess.last_seq - cardinality($2::text[]) + m.ord, m.message_id, m.message::jsonb
      FROM sess, unnest($2::text[], $3::text[]) WITH ORDINALITY AS m (message_id, message, ord)
)"""
_APPEND = f"WITH {_APPEND_CTES} SELECT last_seq FROM sess"
_APPEND_RELEASE = f"""WITH {_APPEND_CTES}, rel AS (
    DELETE FROM vel_locks WHERE session_id = $1 AND token = $5 AND EXISTS (SELECT 1 FROM sess)
) SELECT last_seq FROM sess"""
_APPEND_KEEP_ROW = f"""WITH {_APPEND_CTES}, rel AS (
    UPDATE vel_locks SET expires_at = '-infinity'
     WHERE session_id = $1 AND token = $5 AND EXISTS (SELECT 1 FROM sess)
) SELECT last_seq FROM sess"""
# The async-commit variant wraps vel's own vel_turn_begin (migration 0002): set_config(...,
# true) lasts until the transaction commits, where a function's SET clause would not.
_BEGIN_ASYNC_FUNCTION = """
CREATE FUNCTION vel_turn_begin_async(p_session text, p_token text, p_lease float8, p_limit bigint)
RETURNS text[] LANGUAGE plpgsql AS $$
BEGIN
  PERFORM set_config('synchronous_commit', 'off', true);
  RETURN vel_turn_begin(p_session, p_token, p_lease, p_limit);
END $$
"""


def _pool(dsn: str, schema: str, size: int, **settings: str) -> Any:
    return asyncpg.create_pool(
        dsn,
        min_size=size,
        max_size=size,
        server_settings={"search_path": f'"{schema}"', **settings},
    )


class Option:
    """One way of running a locked turn on a raw asyncpg pool (vel's SQL, no vel code)."""

    def __init__(self, name: str, dsn: str, schema: str, size: int) -> None:
        self.name, self.dsn, self.schema, self.size = name, dsn, schema, size
        self.pool: Any = None
        self.lock_pool: Any = None
        function = "vel_turn_begin_async" if name == "2rt-async-commit" else "vel_turn_begin"
        self.begin = f"SELECT {function}($1, $2, $3, $4)"

    async def open(self) -> None:
        self.pool = await _pool(self.dsn, self.schema, self.size)
        self.lock_pool = self.pool
        if self.name == "4rt-async-commit":
            self.lock_pool = await _pool(self.dsn, self.schema, self.size, synchronous_commit="off")

    async def aclose(self) -> None:
        await self.pool.close()
        if self.lock_pool is not self.pool:
            await self.lock_pool.close()

    async def acquire(self, sid: str, token: str) -> None:
        delay = 0.005
        while await self.lock_pool.fetchval(_ACQUIRE, sid, token, LEASE) is None:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.25)

    async def turn(self, sid: str, msgs: list[dict[str, Any]], limit: int) -> list[Any]:
        token = secrets.token_hex(16)
        texts = [json.dumps(m, separators=(",", ":")) for m in msgs]
        ids = [uuid.uuid4().hex for _ in msgs]
        if self.name == "unlocked":
            rows = await self.pool.fetch(_LOAD, sid, limit)
            await self.pool.fetchval(_APPEND, sid, ids, texts, None)
            return [json.loads(r[0]) for r in reversed(rows)]
        if self.name.startswith("2rt"):
            delay = 0.005
            while True:
                got = await self.pool.fetchval(self.begin, sid, token, LEASE, limit)
                if got is not None:
                    break
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.25)
            window = [json.loads(t) for t in reversed(got)]
            append = _APPEND_KEEP_ROW if self.name == "2rt-keep-row" else _APPEND_RELEASE
            await self.pool.fetchval(append, sid, ids, texts, None, token)
            return window
        await self.acquire(sid, token)
        rows = await self.pool.fetch(_LOAD, sid, limit)
        window = [json.loads(r[0]) for r in reversed(rows)]
        if self.name == "3rt-unlogged":
            await self.pool.fetchval(_APPEND_RELEASE, sid, ids, texts, None, token)
        else:
            await self.pool.fetchval(_APPEND, sid, ids, texts, None)
            await self.lock_pool.execute(_RELEASE, sid, token)
        return window


async def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    name, limit = spec["option"], 20
    driver: Any
    if name == "ref-asyncpg":
        driver = PostgresReference(spec["dsn"], spec["schema"], spec["tasks"] + 4)
    else:
        driver = Option(name, spec["dsn"], spec["schema"], spec["tasks"] + 4)
    await driver.open()
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    await asyncio.to_thread(sys.stdin.readline)
    tasks, sessions, turns = spec["tasks"], spec["sessions"], spec["turns"]

    async def task(t: int) -> None:
        own = [f"p{spec['proc']}-s{i}" for i in range(t, sessions, tasks)]
        for n in range(turns):
            for sid in own:
                await driver.turn(sid, turn_messages(f"{sid}/{n}"), limit)

    started, cpu = time.time(), time.process_time()
    await asyncio.gather(*(task(t) for t in range(tasks)))
    ended, cpu = time.time(), time.process_time() - cpu
    await driver.aclose()
    return {"started": started, "ended": ended, "cpu_s": cpu, "turns": turns * sessions}


async def _run_option(args: argparse.Namespace, option: str, dsn: str, tag: str) -> dict[str, Any]:
    schema = f"pglock_{tag}_{option.replace('-', '_')}"
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'CREATE SCHEMA "{schema}"')
        if option == "ref-asyncpg":
            await create_reference_table(conn, schema)
        else:
            from vel.stores.postgres.migrate import migrate

            await migrate(conn, schema)
            await conn.execute(f'SET search_path = "{schema}"')
            # vel's schema has the lease table UNLOGGED (migration 0002); the others undo it.
            if option in ("4rt-logged", "4rt-async-commit", "2rt-async-commit"):
                await conn.execute("ALTER TABLE vel_locks SET LOGGED")
            if option == "2rt-async-commit":
                await conn.execute(_BEGIN_ASYNC_FUNCTION)
    finally:
        await conn.close()
    procs = []
    for p in range(args.processes):
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "benchmarks.pg_lock", "--worker"),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=ROOT,
        )
        assert proc.stdin is not None
        spec = {
            "option": option,
            "dsn": dsn,
            "schema": schema,
            "proc": p,
            "tasks": args.tasks,
            "sessions": args.sessions // args.processes,
            "turns": args.turns,
        }
        proc.stdin.write((json.dumps(spec) + "\n").encode())
        await proc.stdin.drain()
        procs.append(proc)
    for proc in procs:
        assert proc.stdout is not None
        if (await proc.stdout.readline()).strip() != b"ready":
            raise RuntimeError(f"pg_lock worker failed ({option})")
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
        await proc.stdin.drain()
    results = []
    for proc in procs:
        assert proc.stdout is not None
        results.append(json.loads(await proc.stdout.readline()))
        await proc.wait()
    wall = max(r["ended"] for r in results) - min(r["started"] for r in results)
    turns = sum(r["turns"] for r in results)
    return {
        "turns_per_s": round(turns / wall, 1),
        "client_cpu_us_per_turn": round(sum(r["cpu_s"] for r in results) * 1e6 / turns, 1),
    }


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    base = os.environ.get("POSTGRES_DSN") or DEFAULT_DSN
    database = f"vel_pglock_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(base)
    await admin.execute(f'CREATE DATABASE "{database}"')
    dsn = base.rsplit("/", 1)[0] + f"/{database}"
    options = [o for o in args.options.split(",") if o]
    per_round: dict[str, list[dict[str, Any]]] = {o: [] for o in options}
    load_before = list(os.getloadavg())
    try:
        for r in range(args.rounds):
            order = options[r % len(options) :] + options[: r % len(options)]
            for option in order:
                print(f"[pg_lock] round {r + 1}: {option}", file=sys.stderr, flush=True)
                per_round[option].append(await _run_option(args, option, dsn, f"r{r}"))
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await admin.close()
    out: dict[str, Any] = {"load_before": load_before, "load_after": list(os.getloadavg())}
    for option, rows in per_round.items():
        ref = per_round.get("ref-asyncpg")
        ratios = [
            round(x["turns_per_s"] / y["turns_per_s"], 3)
            for x, y in zip(rows, ref or [], strict=False)
        ]
        out[option] = {
            "turns_per_s": statistics.median(x["turns_per_s"] for x in rows),
            "client_cpu_us_per_turn": statistics.median(x["client_cpu_us_per_turn"] for x in rows),
            "rounds": [x["turns_per_s"] for x in rows],
            "vs_ref_asyncpg": statistics.median(ratios) if ratios else None,
            "vs_ref_asyncpg_rounds": ratios,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pg_lock", description=__doc__)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--sessions", type=int, default=256)
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--options", default=",".join(OPTIONS))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", metavar="FILE", help="keep the figures")
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(sys.stdin.readline())
        print(json.dumps(asyncio.run(_worker(spec))), flush=True)
        return 0
    if args.quick:
        args.sessions, args.turns, args.rounds = 64, 5, 1
    result = asyncio.run(amain(args))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"load average before / after: {result.pop('load_before')} / {result.pop('load_after')}")
    print("| option | turns/s (median) | rounds | x raw asyncpg (paired) | client CPU us / turn |")
    print("|---|---|---|---|---|")
    for option, row in result.items():
        print(
            f"| {option} | {row['turns_per_s']} | {row['rounds']} | {row['vs_ref_asyncpg']} "
            f"({row['vs_ref_asyncpg_rounds']}) | {row['client_cpu_us_per_turn']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
