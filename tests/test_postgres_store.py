"""PostgresStore and its migrations against the real local Postgres (one fresh schema per test)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import asyncpg
import pytest
from servers import PostgresServer

from vel.errors import (
    ConfigurationError,
    InvalidInputError,
    SessionLockedError,
    StoreTimeoutError,
    StoreUnavailableError,
)
from vel.settings import Settings
from vel.stores.base import SessionStore
from vel.stores.postgres import FlushConflictError, FlushResult, PostgresStore
from vel.stores.postgres import sessions as pg_sessions
from vel.stores.postgres.migrate import latest_version, migrate, schema_version


def msg(i: int, role: str = "user") -> dict[str, Any]:
    return {"role": role, "content": f"message {i}"}


def sid() -> str:
    return f"s-{uuid.uuid4().hex[:8]}"


def text(i: int) -> str:
    return json.dumps(msg(i))


@pytest.fixture
async def store(pg_dsn: str, migrated_schema: str) -> AsyncIterator[PostgresStore]:
    s = PostgresStore(pg_dsn, schema=migrated_schema, op_timeout=5.0, retention_ttl=3600.0)
    yield s
    await s.aclose()


@asynccontextmanager
async def connect(dsn: str, schema: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(dsn, server_settings={"search_path": schema})
    try:
        yield conn
    finally:
        await conn.close()


async def sql(dsn: str, schema: str, query: str, *args: Any) -> list[asyncpg.Record]:
    async with connect(dsn, schema) as conn:
        return await conn.fetch(query, *args)


@asynccontextmanager
async def silent_server() -> AsyncIterator[int]:
    """A TCP listener that accepts connections and never says a word (a hung Postgres)."""
    writers: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await reader.read()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        for writer in writers:
            writer.close()
        await server.wait_closed()


# --- migrations -----------------------------------------------------------------------------


async def test_migration_creates_the_documented_schema(pg_dsn: str, pg_schema: str) -> None:
    assert await migrate(pg_dsn, pg_schema) == latest_version()
    columns = await sql(
        pg_dsn,
        pg_schema,
        "SELECT table_name, column_name, data_type, is_nullable FROM information_schema.columns"
        " WHERE table_schema = $1 ORDER BY table_name, ordinal_position",
        pg_schema,
    )
    shape: dict[str, list[tuple[str, str, str]]] = {}
    for c in columns:
        shape.setdefault(c["table_name"], []).append(
            (c["column_name"], c["data_type"], c["is_nullable"])
        )
    tz = "timestamp with time zone"
    assert shape["vel_session_rows"] == [
        ("id", "text", "NO"),
        ("created_at", tz, "NO"),
        ("updated_at", tz, "NO"),
        ("expires_at", tz, "YES"),
        ("last_seq", "bigint", "NO"),
        ("generation", "bigint", "NO"),
        ("metadata", "jsonb", "NO"),
        ("hot_until", tz, "YES"),
        ("revision", "bigint", "NO"),
        ("owner", "text", "YES"),
    ]
    assert shape["vel_messages"] == [
        ("session_id", "text", "NO"),
        ("seq", "bigint", "NO"),
        ("message_id", "text", "NO"),
        ("message", "jsonb", "NO"),
        ("created_at", tz, "NO"),
    ]
    assert [c[0] for c in shape["vel_session_contexts"]] == [
        "id",
        "context",
        "created_at",
        "updated_at",
        "expires_at",
    ]
    assert shape["vel_session_contexts"][1][1] == "jsonb"
    # The spec's table, as documented (a view over vel_session_rows and vel_messages; 0006).
    assert shape["vel_sessions"][:5] == [
        ("id", "text", "YES"),
        ("context", "jsonb", "YES"),
        ("created_at", tz, "YES"),
        ("updated_at", tz, "YES"),
        ("expires_at", tz, "YES"),
    ]
    assert [c[0] for c in shape["vel_locks"]] == ["session_id", "token", "expires_at", "waited"]
    assert [c[0] for c in shape["vel_schema_version"]] == ["version", "applied_at"]

    indexes = {
        r["indexname"]: r["indexdef"]
        for r in await sql(
            pg_dsn,
            pg_schema,
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = $1",
            pg_schema,
        )
    }
    assert "(session_id, seq)" in indexes["vel_messages_pkey"]
    assert "UNIQUE" in indexes["vel_messages_message_id_key"]
    assert "(session_id, message_id)" in indexes["vel_messages_message_id_key"]
    assert any("vel_session_rows" in d and "(updated_at, id)" in d for d in indexes.values())
    assert any("vel_session_rows" in d and "(owner, updated_at, id)" in d for d in indexes.values())
    assert any("vel_session_rows" in d and "(expires_at)" in d for d in indexes.values())
    fk = await sql(
        pg_dsn,
        pg_schema,
        "SELECT confdeltype::text FROM pg_constraint WHERE contype = 'f'"
        " AND conrelid = 'vel_messages'::regclass",
    )
    assert [r["confdeltype"] for r in fk] == ["c"]  # ON DELETE CASCADE


async def test_migrate_twice_changes_nothing(pg_dsn: str, pg_schema: str) -> None:
    latest = latest_version()
    assert await migrate(pg_dsn, pg_schema) == latest
    async with connect(pg_dsn, pg_schema) as conn:
        assert await migrate(conn) == latest
        assert await schema_version(conn) == latest
        rows = await conn.fetch("SELECT version FROM vel_schema_version ORDER BY version")
    assert [r["version"] for r in rows] == list(range(1, latest + 1))


async def test_three_concurrent_migrators_apply_each_file_once(pg_dsn: str, pg_schema: str) -> None:
    versions = await asyncio.gather(*(migrate(pg_dsn, pg_schema) for _ in range(3)))
    latest = latest_version()
    assert versions == [latest] * 3
    rows = await sql(pg_dsn, pg_schema, "SELECT version FROM vel_schema_version ORDER BY 1")
    assert [r["version"] for r in rows] == list(range(1, latest + 1))


async def test_upgrade_to_the_tier_lease_keeps_the_sessions_it_holds(
    pg_dsn: str, pg_schema: str
) -> None:
    """The tier lease and revision (0004) applied over the schema before it, sessions in it."""
    from vel.stores.postgres.migrate import load_migrations

    lease = next(m for m in load_migrations() if m.name == "tier_lease")
    before = [m for m in load_migrations() if m.version < lease.version]
    async with connect(pg_dsn, pg_schema) as conn:
        await conn.execute(
            "CREATE TABLE vel_schema_version (version integer PRIMARY KEY,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for migration in before:
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO vel_schema_version (version) VALUES ($1)", migration.version
            )
        await conn.execute(
            "INSERT INTO vel_sessions (id, last_seq, generation, expires_at)"
            " VALUES ('old', 2, 3, now() + interval '1 hour'), ('gone', 0, 1, NULL)"
        )
        await conn.execute(
            "INSERT INTO vel_messages (session_id, seq, message_id, message) VALUES"
            " ('old', 1, 'a', $1::jsonb), ('old', 2, 'b', $2::jsonb)",
            text(1),
            text(2),
        )
    with pytest.raises(
        ConfigurationError, match=f"version {lease.version - 1}, need {latest_version()}"
    ):
        await PostgresStore(pg_dsn, schema=pg_schema).open()
    assert await migrate(pg_dsn, pg_schema) == latest_version()
    rows = await sql(
        pg_dsn, pg_schema, "SELECT id, hot_until, revision FROM vel_session_rows ORDER BY id"
    )
    assert [(r["id"], r["hot_until"], r["revision"]) for r in rows] == [
        ("gone", None, 0),
        ("old", None, 0),
    ]
    store = PostgresStore(pg_dsn, schema=pg_schema)
    try:
        assert await store.load("old") == [msg(1), msg(2)]
        assert await store.last_seq("old") == (3, 2)
        assert await store.append("old", [msg(3)]) == 3
        assert await store.load("old") == [msg(1), msg(2), msg(3)]
    finally:
        await store.aclose()


async def test_unmigrated_schema_is_refused_with_a_hint(pg_dsn: str, pg_schema: str) -> None:
    store = PostgresStore(pg_dsn, schema=pg_schema, migrate=False)
    try:
        with pytest.raises(ConfigurationError, match="vel migrate"):
            await store.open()
        with pytest.raises(ConfigurationError, match="vel migrate"):
            await store.load(sid())
        assert await sql(pg_dsn, pg_schema, "SELECT to_regclass('vel_sessions') AS t") == [(None,)]
    finally:
        await store.aclose()


async def test_migrate_true_applies_the_schema_on_open(pg_dsn: str, pg_schema: str) -> None:
    async with PostgresStore(pg_dsn, schema=pg_schema, migrate=True) as store:
        assert await store.append("s", [msg(1)]) == 1
    async with connect(pg_dsn, pg_schema) as conn:
        assert await schema_version(conn) == latest_version()


# --- the SessionStore behaviour -------------------------------------------------------------


async def test_append_numbers_messages_and_load_returns_them_oldest_first(
    store: PostgresStore,
) -> None:
    s = sid()
    assert isinstance(store, SessionStore)
    assert await store.load(s) == []
    assert await store.append(s, [msg(1), msg(2, "assistant")]) == 2
    assert await store.append(s, [msg(3)]) == 3
    assert await store.append(s, []) == 3
    assert await store.load(s) == [msg(1), msg(2, "assistant"), msg(3)]
    assert await store.load(s, limit=2) == [msg(2, "assistant"), msg(3)]
    assert await store.load(s, limit=0) == []
    assert await store.load(s, limit=10) == [msg(1), msg(2, "assistant"), msg(3)]


async def test_message_json_round_trips_unchanged(store: PostgresStore) -> None:
    s = sid()
    odd = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        ],
        "name": 'ünïcødé 🎉 "quoted" \\ back',
        "n": [1, 2.5, True, None, {"nested": {}}],
    }
    await store.append(s, [odd])
    assert await store.load(s) == [odd]


async def test_window_reads_the_primary_key_backwards(
    store: PostgresStore, pg_dsn: str, migrated_schema: str
) -> None:
    s = sid()
    for _ in range(4):
        await store.append(s, [msg(i) for i in range(1000)])
    async with connect(pg_dsn, migrated_schema) as conn:
        await conn.execute("ANALYZE vel_messages")
        plan = "\n".join(
            r[0] for r in await conn.fetch("EXPLAIN ANALYZE " + pg_sessions._LOAD, s, 5)
        )
    # The window is read straight off the index, newest first, stopping after 5 rows.
    assert "Index Scan Backward using vel_messages_pkey" in plan
    assert "Sort" not in plan
    assert "rows=5 loops=1" in plan


async def test_replayed_append_is_stored_once(store: PostgresStore) -> None:
    s = sid()
    await store.append(s, [msg(0)])
    ids = [uuid.uuid4().hex, uuid.uuid4().hex]
    assert await store.append(s, [msg(1), msg(2)], message_ids=ids) == 3
    await store.append(s, [msg(3)])
    assert await store.append(s, [msg(1), msg(2)], message_ids=ids) == 3
    assert await store.load(s) == [msg(0), msg(1), msg(2), msg(3)]
    assert (await store.stats())["append_retries_deduplicated"] == 1
    with pytest.raises(InvalidInputError, match="already"):
        await store.append(s, [msg(1), msg(9)], message_ids=[ids[0], "fresh"])
    assert await store.load(s) == [msg(0), msg(1), msg(2), msg(3)]


async def test_bad_input_is_rejected_before_any_io() -> None:
    unreachable = PostgresStore("postgresql://postgres@127.0.0.1:1/test", op_timeout=1.0)
    with pytest.raises(InvalidInputError):
        await unreachable.append("", [msg(1)])
    with pytest.raises(InvalidInputError):
        await unreachable.append("s", [{"role": "user", "content": {"a set"}}])
    with pytest.raises(InvalidInputError):
        await unreachable.pop("")
    with pytest.raises(InvalidInputError):
        await unreachable.apply_flushes([("s", 1, [])], {"s": (1, 0)})  # not below gen 1
    with pytest.raises(InvalidInputError):
        await unreachable.apply_flushes([("s", 1, [])], {"other": (0, 0)})
    with pytest.raises(InvalidInputError):
        await unreachable.append("s", [msg(1)], message_ids=["a", "b"])
    with pytest.raises(InvalidInputError):
        await unreachable.load("s", limit=-1)
    with pytest.raises(InvalidInputError):
        await unreachable.apply_flush("s", 0, [(0, "id", "{}")])


async def test_replace_swaps_history_and_bumps_generation(store: PostgresStore) -> None:
    s = sid()
    await store.append(s, [msg(1), msg(2), msg(3)])
    await store.replace(s, [msg(9, "assistant")])
    assert await store.load(s) == [msg(9, "assistant")]
    assert await store.last_seq(s) == (1, 1)
    assert await store.append(s, [msg(10)]) == 2
    assert await store.load(s) == [msg(9, "assistant"), msg(10)]
    fresh = sid()
    await store.replace(fresh, [msg(1)])
    assert await store.load(fresh) == [msg(1)]


async def test_clear_leaves_a_tombstone_that_reads_as_absent(store: PostgresStore) -> None:
    s = sid()
    await store.append(s, [msg(1), msg(2)])
    await store.clear(s)
    assert await store.load(s) == []
    assert s not in [i.session_id for i in await store.list_sessions()]
    assert await store.last_seq(s) == (1, 0)
    snapshot = await store.load_snapshot(s)
    assert snapshot is not None and (snapshot.generation, snapshot.rows) == (1, [])
    assert await store.append(s, [msg(3)]) == 1
    assert await store.load(s) == [msg(3)]
    await store.clear(sid())  # unknown session: no-op
    assert await store.load_snapshot(sid()) is None


async def test_list_sessions_oldest_first_with_inactivity_filter(
    store: PostgresStore, pg_dsn: str, migrated_schema: str
) -> None:
    old, mid, new = sid(), sid(), sid()
    for s in (old, mid, new):
        await store.append(s, [msg(1), msg(2)])
    await sql(
        pg_dsn,
        migrated_schema,
        "UPDATE vel_session_rows SET updated_at = now() - make_interval(hours => h)"
        " FROM (VALUES ($1, 5), ($2, 2)) AS v (id, h) WHERE vel_session_rows.id = v.id",
        old,
        mid,
    )
    listed = await store.list_sessions()
    assert [i.session_id for i in listed] == [old, mid, new]
    assert [i.message_count for i in listed] == [2, 2, 2]
    assert listed[0].expires_at is not None
    assert [i.session_id for i in await store.list_sessions(inactive_for=3 * 3600)] == [old]
    assert [i.session_id for i in await store.list_sessions(inactive_for=3600)] == [old, mid]
    assert [i.session_id for i in await store.list_sessions(limit=1)] == [old]


async def test_expired_sessions_are_invisible_restart_and_get_purged(
    store: PostgresStore, pg_dsn: str, migrated_schema: str
) -> None:
    gone, kept, restarted, cleared = sid(), sid(), sid(), sid()
    for s in (gone, kept, restarted, cleared):
        await store.append(s, [msg(1), msg(2)])
    await store.clear(cleared)
    await sql(
        pg_dsn,
        migrated_schema,
        "UPDATE vel_session_rows SET expires_at = now() - interval '1 second' WHERE id = ANY($1)",
        [gone, restarted],
    )
    await sql(
        pg_dsn,
        migrated_schema,
        "UPDATE vel_session_rows SET updated_at = now() - interval '2 hours' WHERE id = $1",
        cleared,
    )
    assert await store.load(gone) == []
    assert await store.load_snapshot(gone) is None
    assert await store.last_seq(gone) == (0, 0)
    assert gone not in [i.session_id for i in await store.list_sessions()]
    # Appending to an expired session starts a new history at seq 1.
    assert await store.append(restarted, [msg(7)]) == 1
    assert await store.load(restarted) == [msg(7)]

    assert await store.purge_expired() == 1
    remaining = await sql(pg_dsn, migrated_schema, "SELECT id FROM vel_session_rows ORDER BY id")
    assert sorted(r["id"] for r in remaining) == sorted([kept, restarted])
    orphans = await sql(
        pg_dsn,
        migrated_schema,
        "SELECT count(*) AS n FROM vel_messages WHERE session_id = $1",
        gone,
    )
    assert orphans[0]["n"] == 0
    assert await store.load(kept) == [msg(1), msg(2)]


async def test_spec_cleanup_delete_cascades_to_messages(
    store: PostgresStore, pg_dsn: str, migrated_schema: str
) -> None:
    stale, fresh = sid(), sid()
    await store.append(stale, [msg(1), msg(2)])
    await store.append(fresh, [msg(3)])
    async with connect(pg_dsn, migrated_schema) as conn:
        await conn.execute(
            "UPDATE vel_sessions SET updated_at = now() - interval '8 days' WHERE id = $1", stale
        )
        await conn.execute("DELETE FROM vel_sessions WHERE updated_at < NOW() - INTERVAL '7 days'")
        counts = dict(
            await conn.fetch("SELECT session_id, count(*) FROM vel_messages GROUP BY session_id")
        )
    assert counts == {fresh: 1}
    assert await store.load(stale) == []
    assert await store.load(fresh) == [msg(3)]


async def test_context_view_has_the_spec_shape(
    store: PostgresStore, pg_dsn: str, migrated_schema: str
) -> None:
    s, empty = sid(), sid()
    await store.append(s, [msg(1), msg(2, "assistant")])
    await store.append(s, [msg(3)])
    await store.append(empty, [msg(1)])
    await store.clear(empty)
    rows = await sql(
        pg_dsn,
        migrated_schema,
        "SELECT id, context, created_at, updated_at, expires_at FROM vel_session_contexts"
        " WHERE id = ANY($1)",
        [s, empty],
    )
    contexts = {r["id"]: json.loads(r["context"]) for r in rows}
    assert contexts == {s: [msg(1), msg(2, "assistant"), msg(3)], empty: []}
    assert all(r["created_at"] <= r["updated_at"] for r in rows)


async def test_concurrent_appends_from_two_pools_keep_every_message_once_in_order(
    pg_dsn: str, migrated_schema: str
) -> None:
    s = sid()
    a = PostgresStore(pg_dsn, schema=migrated_schema, pool_max=5)
    b = PostgresStore(pg_dsn, schema=migrated_schema, pool_max=5)
    sizes = [1 + i % 3 for i in range(200)]
    try:

        async def one(i: int) -> int:
            batch = [msg(i * 10 + j) for j in range(sizes[i])]
            return await (a if i % 2 else b).append(s, batch)

        lasts = await asyncio.gather(*(one(i) for i in range(200)))
        total = sum(sizes)
        history = await a.load(s)
    finally:
        await a.aclose()
        await b.aclose()
    assert len(history) == total
    # Each append landed contiguously at the seqs it reported.
    for i, last in enumerate(lasts):
        first = last - sizes[i] + 1
        assert history[first - 1 : last] == [msg(i * 10 + j) for j in range(sizes[i])]
    seqs = await sql(
        pg_dsn,
        migrated_schema,
        "SELECT seq FROM vel_messages WHERE session_id = $1 ORDER BY seq",
        s,
    )
    assert [r["seq"] for r in seqs] == list(range(1, total + 1))


async def test_one_store_serves_several_event_loops(store: PostgresStore) -> None:
    s = sid()
    await store.append(s, [msg(1)])

    def in_another_loop() -> list[dict[str, Any]]:
        async def work() -> list[dict[str, Any]]:
            await store.append(s, [msg(2)])
            history = await store.load(s)
            await store.aclose()
            return history

        return asyncio.run(work())

    assert await anyio.to_thread.run_sync(in_another_loop) == [msg(1), msg(2)]
    assert await store.load(s) == [msg(1), msg(2)]


async def test_injected_pool_stays_open_after_aclose(pg_dsn: str, migrated_schema: str) -> None:
    pool = await asyncpg.create_pool(
        pg_dsn, min_size=1, max_size=2, server_settings={"search_path": migrated_schema}
    )
    try:
        store = PostgresStore(pool=pool)
        await store.append("s", [msg(1)])
        await store.aclose()
        assert await pool.fetchval("SELECT count(*) FROM vel_messages") == 1
        assert "caller" in repr(store)
    finally:
        await pool.close()


async def test_stats_report_gauges_and_counters(store: PostgresStore) -> None:
    await store.append(sid(), [msg(1), msg(2)])
    await store.append(sid(), [msg(3)])
    stats = await store.stats()
    assert stats["sessions"] == 2 and stats["messages"] == 3
    assert stats["appends"] == 2
    assert stats["pool_size"] >= 1 and stats["pool_idle"] >= 1
    assert {"append_retries_deduplicated", "lock_waits"} <= stats.keys()


# --- durable tier of the two-tier store -----------------------------------------------------


async def test_apply_flush_is_idempotent(store: PostgresStore) -> None:
    s = sid()
    rows = [(1, "m1", text(1)), (2, "m2", text(2))]
    assert await store.apply_flush(s, 0, rows) == FlushResult(inserted=2, duplicates=0)
    assert await store.apply_flush(s, 0, rows) == FlushResult(inserted=0, duplicates=2)
    more = [(2, "m2", text(2)), (3, "m3", text(3))]
    assert await store.apply_flush(s, 0, more) == FlushResult(inserted=1, duplicates=1)
    assert await store.load(s) == [msg(1), msg(2), msg(3)]
    snapshot = await store.load_snapshot(s)
    assert snapshot is not None
    assert (snapshot.generation, snapshot.last_seq) == (0, 3)
    assert [(seq, mid) for seq, mid, _ in snapshot.rows] == [(1, "m1"), (2, "m2"), (3, "m3")]
    assert [json.loads(t) for _, _, t in snapshot.rows] == [msg(1), msg(2), msg(3)]
    assert snapshot.expires_ms is not None and snapshot.expires_ms > snapshot.updated_ms


async def test_apply_flush_of_an_older_generation_is_ignored(store: PostgresStore) -> None:
    s = sid()
    await store.apply_flush(s, 2, [(1, "new", text(1))])
    result = await store.apply_flush(s, 1, [(1, "old", text(8)), (2, "old2", text(9))])
    assert result.stale
    assert await store.load(s) == [msg(1)]
    # A clear recorded first makes a late flush of the cleared data stale too.
    t = sid()
    await store.apply_clear(t, 5)
    assert (await store.apply_flush(t, 4, [(1, "x", text(1))])).stale
    assert await store.last_seq(t) == (5, 0)


async def test_apply_flush_of_a_newer_generation_replaces_old_rows(store: PostgresStore) -> None:
    s = sid()
    await store.apply_flush(s, 0, [(1, "a", text(1)), (2, "b", text(2)), (3, "c", text(3))])
    result = await store.apply_flush(s, 1, [(1, "z", text(9))])
    assert result == FlushResult(inserted=1, duplicates=0)
    assert await store.load(s) == [msg(9)]
    assert await store.last_seq(s) == (1, 1)


async def test_apply_clear_wipes_only_for_a_newer_generation(store: PostgresStore) -> None:
    s = sid()
    await store.apply_flush(s, 3, [(1, "a", text(1))])
    await store.apply_clear(s, 3)
    assert await store.load(s) == [msg(1)]
    await store.apply_clear(s, 4)
    assert await store.load(s) == []
    assert await store.last_seq(s) == (4, 0)


async def test_apply_flush_refuses_a_divergent_history(store: PostgresStore) -> None:
    s, other = sid(), sid()
    await store.apply_flush(s, 0, [(1, "a", text(1)), (2, "b", text(2))])
    with pytest.raises(FlushConflictError) as by_seq:
        await store.apply_flushes(
            [(other, 0, [(1, "o", text(5))]), (s, 0, [(2, "not-b", text(2)), (3, "c", text(3))])]
        )
    assert (by_seq.value.session_id, by_seq.value.seqs) == (s, [2])
    with pytest.raises(FlushConflictError) as by_id:
        await store.apply_flush(s, 0, [(3, "a", text(1))])
    assert (by_id.value.session_id, by_id.value.seqs) == (s, [1])
    # Nothing of the failed transactions was written.
    assert await store.load(s) == [msg(1), msg(2)]
    assert await store.load_snapshot(other) is None


async def test_apply_flushes_writes_many_sessions_at_once(store: PostgresStore) -> None:
    a, b, c = sid(), sid(), sid()
    await store.apply_clear(c, 9)
    results = await store.apply_flushes(
        [
            (a, 0, [(1, "a1", text(1))]),
            (b, 0, [(1, "b1", text(2)), (2, "b2", text(3))]),
            (c, 8, [(1, "c1", text(4))]),
        ]
    )
    assert results == [FlushResult(1, 0), FlushResult(2, 0), FlushResult(0, 0, stale=True)]
    assert await store.load(b) == [msg(2), msg(3)]
    assert await store.apply_flushes([]) == []


# --- turn locks -------------------------------------------------------------------------------


async def test_second_turn_waits_for_the_first_to_release(store: PostgresStore) -> None:
    s = sid()
    order: list[str] = []
    first_in = asyncio.Event()

    async def first() -> None:
        async with store.turn_lock(s):
            order.append("first in")
            first_in.set()
            await asyncio.sleep(0.3)
            order.append("first out")

    async def second() -> None:
        await first_in.wait()
        async with store.turn_lock(s, timeout=5):
            order.append("second in")

    await asyncio.gather(first(), second())
    assert order == ["first in", "first out", "second in"]
    assert (await store.stats())["lock_waits"] == 1


async def test_lock_wait_times_out_with_session_locked_error(store: PostgresStore) -> None:
    s = sid()
    async with store.turn_lock(s):
        started = time.monotonic()
        with pytest.raises(SessionLockedError):
            async with store.turn_lock(s, timeout=0.3):
                pass
        assert 0.25 <= time.monotonic() - started < 2
    async with store.turn_lock(s, timeout=0):
        pass


async def test_held_lock_is_renewed_past_its_lease(pg_dsn: str, migrated_schema: str) -> None:
    s = sid()
    store = PostgresStore(pg_dsn, schema=migrated_schema, lock_lease=0.6)
    async with store, store.turn_lock(s):
        await asyncio.sleep(1.2)
        with pytest.raises(SessionLockedError):
            async with store.turn_lock(s, timeout=0.2):
                pass


async def test_an_expired_lease_of_a_crashed_holder_is_taken_over(
    store: PostgresStore, pg_dsn: str, migrated_schema: str
) -> None:
    s = sid()
    await sql(
        pg_dsn,
        migrated_schema,
        "INSERT INTO vel_locks VALUES ($1, 'crashed', now() - interval '1 second')",
        s,
    )
    async with store.turn_lock(s, timeout=0):
        tokens = await sql(
            pg_dsn, migrated_schema, "SELECT token FROM vel_locks WHERE session_id = $1", s
        )
        assert tokens[0]["token"] != "crashed"
    # Released: the row stays, expired (migration 0008), so no live lease is left.
    live = "SELECT 1 FROM vel_locks WHERE session_id = $1 AND expires_at > now()"
    assert await sql(pg_dsn, migrated_schema, live, s) == []


# --- configuration and failures ---------------------------------------------------------------


async def test_missing_dsn_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="POSTGRES_DSN"):
        PostgresStore(settings=Settings())
    with pytest.raises(ConfigurationError, match="schema"):
        PostgresStore("postgresql://u@h/db", schema='x"; DROP TABLE y; --')


async def test_unreachable_server_fails_fast_without_leaking_the_password() -> None:
    store = PostgresStore("postgresql://postgres:secretpw@127.0.0.1:1/test", op_timeout=5.0)
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError) as opened:
        await store.open()
    with pytest.raises(StoreUnavailableError) as loaded:
        await store.load("s")
    assert time.monotonic() - started < 10
    for exc in (opened.value, loaded.value):
        assert "secretpw" not in str(exc)
        assert "127.0.0.1:1" in str(exc)
        assert "\n" not in str(exc)
    assert "secretpw" not in repr(store)
    await store.aclose()


async def test_bad_dsn_syntax_is_a_configuration_error() -> None:
    store = PostgresStore("postgresql://postgres:secretpw@127.0.0.1:notaport/test")
    with pytest.raises(ConfigurationError) as info:
        await store.open()
    assert "secretpw" not in str(info.value)


async def test_silent_server_times_out_within_the_deadline() -> None:
    async with silent_server() as port:
        store = PostgresStore(
            f"postgresql://postgres:secretpw@127.0.0.1:{port}/test",
            op_timeout=1.0,
            connect_timeout=10.0,
        )
        started = time.monotonic()
        with pytest.raises(StoreTimeoutError) as info:
            await store.append("s", [msg(1)])
        assert time.monotonic() - started < 1.0 + 2
        assert "secretpw" not in str(info.value)
        await store.aclose()


async def test_a_stuck_statement_times_out_and_its_connection_is_not_reused(
    pg_dsn: str, migrated_schema: str
) -> None:
    s = sid()
    async with PostgresStore(pg_dsn, schema=migrated_schema, op_timeout=1.0, pool_max=1) as store:
        await store.append(s, [msg(1)])
        ids = [uuid.uuid4().hex]
        async with connect(pg_dsn, migrated_schema) as blocker:
            tx = blocker.transaction()
            await tx.start()
            await blocker.execute("SELECT 1 FROM vel_session_rows WHERE id = $1 FOR UPDATE", s)
            before = await store._db.run("pid", lambda c: c.fetchval("SELECT pg_backend_pid()"))
            started = time.monotonic()
            with pytest.raises(StoreTimeoutError):
                await store.append(s, [msg(2)], message_ids=ids)
            assert time.monotonic() - started < 1.0 + 2
            await tx.rollback()
        # The single pooled connection was replaced; the retry with the same ids lands once
        # (whether or not the abandoned statement went on to commit).
        after = await store._db.run("pid", lambda c: c.fetchval("SELECT pg_backend_pid()"))
        assert after != before
        assert await store.append(s, [msg(2)], message_ids=ids) == 2
        assert await store.load(s) == [msg(1), msg(2)]


async def test_a_frozen_server_times_out_and_the_store_recovers() -> None:
    server = await anyio.to_thread.run_sync(lambda: PostgresServer().start())
    try:
        await migrate(server.dsn)
        s, ids = sid(), [uuid.uuid4().hex]
        store = PostgresStore(server.dsn, op_timeout=1.0, pool_max=2)
        await store.append(s, [msg(1)])
        async with connect(server.dsn, "public") as conn:
            backends = await conn.fetch(
                "SELECT pid FROM pg_stat_activity WHERE application_name = 'vel'"
            )
        frozen = [server.pid] + [r["pid"] for r in backends]
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(StoreTimeoutError):
                await store.append(s, [msg(2)], message_ids=ids)  # on a pooled connection
            with pytest.raises(StoreTimeoutError):
                await store.load(s)  # on a new connection to the frozen postmaster
            assert time.monotonic() - started < 2 * (1.0 + 2)
        finally:
            for pid in frozen:
                os.kill(pid, signal.SIGCONT)
        assert await store.append(s, [msg(2)], message_ids=ids) == 2
        assert await store.load(s) == [msg(1), msg(2)]
        await store.aclose()
    finally:
        await anyio.to_thread.run_sync(server.destroy)
