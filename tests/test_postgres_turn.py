"""The locked turn of the Postgres store (PostgresStore.turn, used by the Agent): the lock taken
with the window read, released by the commit's own transaction; two statements per turn."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from stores import sql

from vel.errors import InvalidInputError, SessionLockedError
from vel.stores.postgres import PostgresStore


def sid() -> str:
    return f"pt-{uuid.uuid4().hex[:10]}"


def msg(i: int | str, role: str = "user") -> dict[str, Any]:
    return {"role": role, "content": f"m{i}"}


@pytest.fixture
async def store(pg_dsn: str, migrated_schema: str) -> AsyncIterator[PostgresStore]:
    s = PostgresStore(pg_dsn, schema=migrated_schema, op_timeout=5.0)
    yield s
    await s.aclose()


async def lock_token(dsn: str, schema: str, session_id: str) -> str | None:
    """The token of the session's live lease (a released lease stays as a row, expired: 0008)."""
    rows = await sql(
        dsn,
        schema,
        "SELECT token FROM vel_locks WHERE session_id = $1 AND expires_at > now()",
        session_id,
    )
    return str(rows[0]["token"]) if rows else None


def contents(messages: list[dict[str, Any]]) -> list[str]:
    return [str(m["content"]) for m in messages]


async def test_turn_reads_the_window_and_commit_appends_and_unlocks(
    store: PostgresStore, pg_dsn: str, migrated_schema: str
) -> None:
    s = sid()
    await store.append(s, [msg(i) for i in range(5)])
    async with store.turn(s, limit=3) as turn:
        assert contents(turn.window) == ["m2", "m3", "m4"]
        assert await lock_token(pg_dsn, migrated_schema, s) == turn.token
        assert await turn.commit([msg(5), msg(6, "assistant")]) == 7
        assert await lock_token(pg_dsn, migrated_schema, s) is None
    assert contents(await store.load(s)) == [f"m{i}" for i in range(7)]
    async with store.turn(s) as turn:  # no limit: the whole history
        assert len(turn.window) == 7


async def test_a_turn_is_two_statements_and_its_lease_is_unlogged(
    pg_dsn: str, migrated_schema: str
) -> None:
    statements: list[str] = []

    async def log_queries(conn: asyncpg.Connection) -> None:
        conn.add_query_logger(lambda q: statements.append(q.query))

    async def keep_session(conn: asyncpg.Connection) -> None:
        pass  # as vel's own pools: no reset query on release

    pool = await asyncpg.create_pool(
        pg_dsn,
        server_settings={"search_path": migrated_schema},
        init=log_queries,
        reset=keep_session,
    )
    store = PostgresStore(pool=pool)
    try:
        s = sid()
        await store.append(s, [msg(0)])
        statements.clear()
        async with store.turn(s, limit=20) as turn:
            await turn.commit([msg(1), msg(2, "assistant")])
        assert len(statements) == 2, statements
        assert "vel_turn_begin" in statements[0] and "UPDATE vel_locks" in statements[1]
    finally:
        await store.aclose()
        await pool.close()
    rows = await sql(
        pg_dsn,
        migrated_schema,
        "SELECT relpersistence::text AS p FROM pg_class WHERE oid = 'vel_locks'::regclass",
    )
    assert rows[0]["p"] == "u"


async def test_a_second_turn_waits_for_the_commit_and_sees_it(store: PostgresStore) -> None:
    s = sid()
    seen: list[list[str]] = []

    async def second() -> None:
        async with store.turn(s, limit=10, timeout=10) as turn:
            seen.append(contents(turn.window))
            await turn.commit([msg(2)])

    async with store.turn(s, limit=10) as turn:
        waiter = asyncio.create_task(second())
        await asyncio.sleep(0.2)
        assert seen == []
        await turn.commit([msg(0), msg(1, "assistant")])
    await waiter
    assert seen == [["m0", "m1"]]
    assert (await store.stats())["lock_waits"] == 1


async def test_concurrent_turns_of_one_session_each_see_the_one_before(
    store: PostgresStore,
) -> None:
    s = sid()
    tasks, turns = 8, 6

    async def worker(t: int) -> None:
        for n in range(turns):
            async with store.turn(s, limit=2, timeout=30) as turn:
                before = turn.window[-1]["content"] if turn.window else ""
                await turn.commit([msg(f"{t}.{n}"), msg(f"after {before}", "assistant")])

    await asyncio.gather(*(worker(t) for t in range(tasks)))
    history = await store.load(s)
    assert len(history) == 2 * tasks * turns
    # Every turn's window ended with the assistant message of the turn committed just before.
    for k in range(2, len(history), 2):
        assert history[k + 1]["content"] == f"mafter {history[k - 1]['content']}", k


async def test_a_held_lock_times_out_and_zero_tries_once(store: PostgresStore) -> None:
    s = sid()
    async with store.turn(s):
        with pytest.raises(SessionLockedError):
            async with store.turn(s, timeout=0.2):
                pass
        with pytest.raises(SessionLockedError):
            async with store.turn(s, timeout=0):
                pass
    async with store.turn(s, timeout=0):
        pass


async def test_leaving_without_commit_releases_and_stores_nothing(
    store: PostgresStore, pg_dsn: str, migrated_schema: str
) -> None:
    s = sid()
    await store.append(s, [msg(0)])
    with pytest.raises(RuntimeError):
        async with store.turn(s) as turn:
            assert contents(turn.window) == ["m0"]
            raise RuntimeError("the model failed")
    assert await lock_token(pg_dsn, migrated_schema, s) is None
    assert contents(await store.load(s)) == ["m0"]


async def test_bad_messages_store_nothing_and_still_unlock(
    store: PostgresStore, pg_dsn: str, migrated_schema: str
) -> None:
    s = sid()
    with pytest.raises(InvalidInputError):
        async with store.turn(s) as turn:
            try:
                await turn.commit([{"role": "user", "content": {"a set"}}])
            finally:
                assert await lock_token(pg_dsn, migrated_schema, s) == turn.token
    assert await lock_token(pg_dsn, migrated_schema, s) is None
    assert await store.load(s) == []


async def test_commit_does_not_release_a_lock_another_turn_now_holds(
    store: PostgresStore, pg_dsn: str, migrated_schema: str
) -> None:
    s = sid()
    async with store.turn(s) as turn:
        # Our lease ran out and another turn took the lock.
        await sql(pg_dsn, migrated_schema, "UPDATE vel_locks SET token = 'someone-else'")
        await turn.commit([msg(0)])
    assert await lock_token(pg_dsn, migrated_schema, s) == "someone-else"
    assert contents(await store.load(s)) == ["m0"]


async def test_the_expired_lease_of_a_crashed_holder_is_taken_over(
    store: PostgresStore, pg_dsn: str, migrated_schema: str
) -> None:
    s = sid()
    await sql(
        pg_dsn,
        migrated_schema,
        "INSERT INTO vel_locks VALUES ($1, 'crashed', now() - interval '1 second')",
        s,
    )
    async with store.turn(s, timeout=0) as turn:
        assert await lock_token(pg_dsn, migrated_schema, s) == turn.token
        await turn.commit([msg(0)])


async def test_a_replayed_commit_stores_nothing_and_unlocks(
    store: PostgresStore, pg_dsn: str, migrated_schema: str
) -> None:
    s = sid()
    ids = [uuid.uuid4().hex, uuid.uuid4().hex]
    assert await store.append(s, [msg(0), msg(1, "assistant")], message_ids=ids) == 2
    async with store.turn(s) as turn:
        # A retry of a commit whose reply was lost: the same ids, already stored.
        assert await turn.commit([msg(0), msg(1, "assistant")], message_ids=ids) == 2
    assert await lock_token(pg_dsn, migrated_schema, s) is None
    assert contents(await store.load(s)) == ["m0", "m1"]


async def test_a_turn_on_an_expired_session_starts_it_afresh_and_unlocks(
    pg_dsn: str, migrated_schema: str
) -> None:
    s = sid()
    store = PostgresStore(pg_dsn, schema=migrated_schema, retention_ttl=0.3)
    async with store:
        await store.append(s, [msg(0)])
        await asyncio.sleep(0.5)
        async with store.turn(s) as turn:
            assert turn.window == []
            assert await turn.commit([msg(1)]) == 1
        assert await lock_token(pg_dsn, migrated_schema, s) is None
        assert contents(await store.load(s)) == ["m1"]


async def test_a_long_turn_keeps_its_lease(pg_dsn: str, migrated_schema: str) -> None:
    s = sid()
    store = PostgresStore(pg_dsn, schema=migrated_schema, lock_lease=0.6)
    async with store, store.turn(s) as turn:
        await asyncio.sleep(1.3)
        with pytest.raises(SessionLockedError):
            async with store.turn(s, timeout=0.2):
                pass
        await turn.commit([msg(0)])
