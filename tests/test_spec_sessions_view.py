"""The spec's "Database Schema" table, as documented: its SQL runs as written against a
migrated database with sessions in it (the vel_sessions view of migration 0006), in
'database' and 'redis' modes, and an upgrade across 0006 keeps every session."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import pytest
from test_session_migrations import schema_before

from vel.stores.postgres import PostgresStore
from vel.stores.postgres.migrate import latest_version, migrate
from vel.stores.redis import RedisStore
from vel.stores.tiered import TieredStore

# From the spec's page, as written.
SPEC_SELECT = (
    "SELECT id, context, created_at, updated_at, expires_at FROM vel_sessions WHERE id = $1"
)
SPEC_CLEANUP = """\
DELETE FROM vel_sessions
WHERE updated_at < NOW() - INTERVAL '7 days';
"""


def msg(i: int, role: str = "user") -> dict[str, Any]:
    return {"role": role, "content": f"message {i}"}


def uid() -> str:
    return f"v-{uuid.uuid4().hex[:8]}"


@asynccontextmanager
async def connect(dsn: str, schema: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(dsn, server_settings={"search_path": schema})
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def store(pg_dsn: str, migrated_schema: str) -> AsyncIterator[PostgresStore]:
    s = PostgresStore(pg_dsn, schema=migrated_schema)
    yield s
    await s.aclose()


@pytest.fixture
async def tiered(
    pg_dsn: str, migrated_schema: str, redis_url: str, key_prefix: str
) -> AsyncIterator[TieredStore]:
    s = TieredStore(
        RedisStore(redis_url, key_prefix=key_prefix, write_behind=True, flush_delay=0),
        PostgresStore(pg_dsn, schema=migrated_schema),
        flusher=False,
    )
    yield s
    await s.aclose()


async def age(conn: asyncpg.Connection, session_id: str, days: int) -> None:
    await conn.execute(
        "UPDATE vel_sessions SET updated_at = now() - make_interval(days => $2) WHERE id = $1",
        session_id,
        days,
    )


async def test_the_spec_select_returns_each_history_as_one_json_array(
    store: PostgresStore, pg_dsn: str, migrated_schema: str
) -> None:
    s = uid()
    await store.append(s, [msg(1), msg(2, "assistant")])
    await store.append(s, [msg(3)])
    async with connect(pg_dsn, migrated_schema) as conn:
        row = await conn.fetchrow(SPEC_SELECT, s)
        by_id = await conn.fetchrow("SELECT id, context FROM vel_sessions WHERE id = $1", s)
        plan = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {SPEC_SELECT}", s)
    assert row is not None and by_id is not None
    assert json.loads(row["context"]) == [msg(1), msg(2, "assistant"), msg(3)]
    assert json.loads(by_id["context"]) == json.loads(row["context"])
    assert row["created_at"] <= row["updated_at"] and row["expires_at"] is None
    assert "Seq Scan" not in plan  # one session's row and messages, by their keys


async def test_the_spec_cleanup_removes_old_sessions_with_their_messages(
    store: PostgresStore, pg_dsn: str, migrated_schema: str
) -> None:
    old, new = uid(), uid()
    await store.append(old, [msg(1), msg(2)])
    await store.append(new, [msg(3)])
    async with connect(pg_dsn, migrated_schema) as conn:
        await age(conn, old, 8)
        status = await conn.execute(SPEC_CLEANUP)
        left = await conn.fetch("SELECT session_id, count(*) FROM vel_messages GROUP BY 1")
        listed = await conn.fetch("SELECT id FROM vel_sessions WHERE id = ANY($1)", [old, new])
    assert status == "DELETE 1"
    assert {r["session_id"]: r["count"] for r in left if r["session_id"] in (old, new)} == {new: 1}
    assert [r["id"] for r in listed] == [new]
    assert await store.load(old) == []
    assert await store.append(old, [msg(9)]) == 1  # a new session under the old id


async def test_writes_through_the_view_replace_the_history(
    store: PostgresStore, pg_dsn: str, migrated_schema: str
) -> None:
    s = uid()
    async with connect(pg_dsn, migrated_schema) as conn:
        await conn.execute(
            "INSERT INTO vel_sessions (id, context) VALUES ($1, $2::jsonb)",
            s,
            json.dumps([msg(1), msg(2)]),
        )
        assert await store.load(s) == [msg(1), msg(2)]
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute("INSERT INTO vel_sessions (id, context) VALUES ($1, '[]'::jsonb)", s)
        await conn.execute(
            "UPDATE vel_sessions SET context = $2::jsonb WHERE id = $1", s, json.dumps([msg(7)])
        )
        with pytest.raises(asyncpg.InvalidParameterValueError):
            await conn.execute("UPDATE vel_sessions SET context = '{\"a\": 1}' WHERE id = $1", s)
    assert await store.load(s) == [msg(7)]
    assert await store.append(s, [msg(8)]) == 2
    assert await store.load(s) == [msg(7), msg(8)]


async def test_the_spec_cleanup_in_redis_mode_reaches_both_tiers(
    tiered: TieredStore, pg_dsn: str, migrated_schema: str
) -> None:
    old, kept = uid(), uid()
    await tiered.append(old, [msg(1), msg(2)])
    await tiered.append(kept, [msg(3)])
    (late,) = await tiered.hot.pending([old], 100)  # a flusher read a batch, then stalled
    assert late is not None and late.rows
    assert await tiered.flush(10)  # another flusher wrote it: the Redis copy is clean
    async with connect(pg_dsn, migrated_schema) as conn:
        await age(conn, old, 8)
        assert await conn.execute(SPEC_CLEANUP) == "DELETE 1"
        # The stalled flush arrives: Postgres holds a newer generation, nothing is written.
        outcome = await tiered.cold.apply_flushes([(old, late.gen, late.rows)])
        assert outcome[0].stale
        left = await conn.fetchval("SELECT count(*) FROM vel_messages WHERE session_id = $1", old)
    assert left == 0
    # The two-tier purge (`vel sessions purge`) drops the Redis copy of the deleted history.
    await tiered.purge_expired_tiers()
    assert not await tiered.hot.exists(old)
    assert await tiered.load(old) == []
    assert await tiered.load(kept) == [msg(3)]
    await tiered.append(old, [msg(5)])  # a new session under the old id
    assert await tiered.flush(10)
    assert await tiered.cold.load(old) == [msg(5)]


async def test_a_deleted_session_with_unflushed_writes_becomes_a_conflict(
    tiered: TieredStore, pg_dsn: str, migrated_schema: str
) -> None:
    """Writes Postgres never saw are not silently dropped, nor written back over the delete:
    the copy is set aside as a flush conflict for an operator (DESIGN.md 3.8)."""
    s = uid()
    await tiered.append(s, [msg(1)])
    assert await tiered.flush(10)
    await tiered.append(s, [msg(2)])  # unflushed
    async with connect(pg_dsn, migrated_schema) as conn:
        await age(conn, s, 8)
        assert await conn.execute(SPEC_CLEANUP) == "DELETE 1"
    await tiered.flusher.flush_once()
    assert [c.session_id for c in await tiered.hot.conflicts()] == [s]
    assert await tiered.cold.load(s) == []


async def test_upgrade_across_the_view_keeps_sessions_and_turns(
    pg_dsn: str, pg_schema: str
) -> None:
    await schema_before(pg_dsn, pg_schema, "spec_sessions_view")
    async with connect(pg_dsn, pg_schema) as conn:
        await conn.execute(
            "INSERT INTO vel_sessions (id, last_seq, generation, owner, metadata) VALUES"
            " ('old', 2, 3, 'alice', '{\"title\": \"t\"}'), ('gone', 0, 1, NULL, '{}')"
        )
        await conn.execute(
            "INSERT INTO vel_messages (session_id, seq, message_id, message) VALUES"
            " ('old', 1, 'a', $1::jsonb), ('old', 2, 'b', $2::jsonb)",
            json.dumps(msg(1)),
            json.dumps(msg(2)),
        )
    assert await migrate(pg_dsn, pg_schema) == latest_version()
    async with connect(pg_dsn, pg_schema) as conn:
        rows = await conn.fetch("SELECT id, context, owner, message_count FROM vel_sessions")
        base = await conn.fetch("SELECT id, generation FROM vel_session_rows ORDER BY id")
    assert [(r["id"], json.loads(r["context"]), r["owner"], r["message_count"]) for r in rows] == [
        ("old", [msg(1), msg(2)], "alice", 2)
    ]
    assert [(r["id"], r["generation"]) for r in base] == [("gone", 1), ("old", 3)]
    store = PostgresStore(pg_dsn, schema=pg_schema)
    try:
        async with store.turn("old", limit=10) as turn:  # vel_turn_begin on the new names
            assert turn.window == [msg(1), msg(2)]
            await turn.commit([msg(3)])
        assert await store.load("old") == [msg(1), msg(2), msg(3)]
        assert await store.last_seq("old") == (3, 3)
    finally:
        await store.aclose()


async def test_the_spec_select_of_every_session_in_redis_mode_after_a_flush(
    tiered: TieredStore, pg_dsn: str, migrated_schema: str
) -> None:
    histories = {uid(): [msg(i) for i in range(1, n + 2)] for n in range(4)}
    for s, history in histories.items():
        await tiered.append(s, history)
    await tiered.clear(next(iter(histories)))  # a cleared session is no row of the spec's
    assert await tiered.flush(10)
    async with connect(pg_dsn, migrated_schema) as conn:
        rows = await conn.fetch(
            "SELECT id, context, created_at, updated_at, expires_at FROM vel_sessions"
        )
    found = {r["id"]: json.loads(r["context"]) for r in rows}
    expected = dict(list(histories.items())[1:])
    assert found == expected
