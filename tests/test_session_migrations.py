"""Upgrades to the session-organising migrations (0005 owners and listings) from the schema
before them, with sessions in it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

from vel import ContextManager
from vel.stores.postgres import PostgresStore
from vel.stores.postgres.migrate import latest_version, load_migrations, migrate


def msg(i: int) -> dict[str, object]:
    return {"role": "user", "content": f"message {i}"}


@asynccontextmanager
async def connect(dsn: str, schema: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(dsn, server_settings={"search_path": schema})
    try:
        yield conn
    finally:
        await conn.close()


async def schema_before(dsn: str, schema: str, name: str) -> None:
    """Apply the migrations older than the one called ``name``, as an older vel did."""
    target = next(m for m in load_migrations() if m.name == name)
    async with connect(dsn, schema) as conn:
        await conn.execute(
            "CREATE TABLE vel_schema_version (version integer PRIMARY KEY,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for migration in load_migrations():
            if migration.version < target.version:
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO vel_schema_version (version) VALUES ($1)", migration.version
                )


async def test_upgrade_to_owners_keeps_sessions_and_lists_them(pg_dsn: str, pg_schema: str) -> None:
    await schema_before(pg_dsn, pg_schema, "session_owners")
    async with connect(pg_dsn, pg_schema) as conn:
        await conn.execute(
            "INSERT INTO vel_sessions (id, last_seq, generation, metadata, updated_at) VALUES"
            " ('old', 2, 3, '{\"title\": \"kept\"}', now() - interval '1 day'),"
            " ('new', 1, 0, '{}', now()), ('gone', 0, 1, '{}', now())"
        )
        await conn.execute(
            "INSERT INTO vel_messages (session_id, seq, message_id, message) VALUES"
            " ('old', 1, 'a', $1::jsonb), ('old', 2, 'b', $2::jsonb), ('new', 1, 'c', $1::jsonb)",
            json.dumps(msg(1)),
            json.dumps(msg(2)),
        )
    assert await migrate(pg_dsn, pg_schema) == latest_version()
    store = PostgresStore(pg_dsn, schema=pg_schema)
    cm = ContextManager()
    cm.bind(store)
    try:
        page = await cm.afind_sessions()
        assert [(i.session_id, i.owner, i.metadata) for i in page.sessions] == [
            ("new", None, {}),
            ("old", None, {"title": "kept"}),
        ]
        assert await store.load("old") == [msg(1), msg(2)]
        await cm.aset_session_details("old", owner="alice")
        assert await store.append("old", [msg(3)]) == 3
        mine = await cm.afind_sessions("alice")
        assert [(i.session_id, i.message_count) for i in mine.sessions] == [("old", 3)]
        older = await cm.aget_session_messages("old", before=3)
        assert older.messages == [msg(1), msg(2)]
    finally:
        await store.aclose()
    async with connect(pg_dsn, pg_schema) as conn:
        indexes = {
            r["indexname"]
            for r in await conn.fetch(
                "SELECT indexname FROM pg_indexes WHERE schemaname = $1", pg_schema
            )
        }
    assert {"vel_sessions_activity_idx", "vel_sessions_owner_activity_idx"} <= indexes
    assert "vel_sessions_updated_at_idx" not in indexes
