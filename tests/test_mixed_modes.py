"""Two storage modes on one Postgres (DESIGN.md 3.8): a 'database'-mode writer beside 'redis'
workers never makes an acknowledged turn disappear. While the Redis tier may hold a session
(its tier lease in Postgres is live) a 'database'-mode write is refused with TierLeaseError
naming the supported way; and a flush that finds Postgres changed behind the tier is never
counted as flushed: the session becomes a visible, TTL-less flush conflict until resolved.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from conftest import model_for, schema_dsn
from test_cli import clean_env, vel_cmd

from vel import Agent, TurnReceipt, turn_committed
from vel.errors import TierLeaseError
from vel.stores.postgres import PostgresStore
from vel.stores.redis import RedisStore
from vel.stores.tiered import TieredStore
from vel.testing import FakeOpenAIServer


def sid() -> str:
    return f"mix-{uuid.uuid4().hex[:8]}"


def contents(messages: list[dict[str, Any]]) -> list[str]:
    return [str(m.get("content")) for m in messages]


@pytest.fixture
def both_modes(
    monkeypatch: pytest.MonkeyPatch,
    pg_dsn: str,
    migrated_schema: str,
    redis_url: str,
    key_prefix: str,
) -> dict[str, str]:
    """The environment a 'redis' and a 'database' Agent read: one Postgres for both."""
    env = {
        "POSTGRES_DSN": schema_dsn(pg_dsn, migrated_schema),
        "REDIS_URL": redis_url,
        "VEL_KEY_PREFIX": key_prefix,
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
async def tier(
    pg_dsn: str, migrated_schema: str, redis_url: str, key_prefix: str
) -> AsyncIterator[TieredStore]:
    """An in-test tiered store on the same schema and prefix, without a flusher."""
    store = TieredStore(
        RedisStore(redis_url, key_prefix=key_prefix, write_behind=True, flush_delay=0),
        PostgresStore(pg_dsn, schema=migrated_schema),
        flusher=False,
    )
    try:
        yield store
    finally:
        await store.aclose()


async def wipe_redis_copy(tier: TieredStore, session_id: str) -> None:
    keys = tier.hot.keys.session(session_id)
    await tier.hot.call("del", lambda c: c.redis.delete(*keys.data))


async def postgres_contents(dsn: str, session_id: str) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT message::text FROM vel_messages WHERE session_id = $1 ORDER BY seq",
            session_id,
        )
    finally:
        await conn.close()
    return [json.loads(r[0])["content"] for r in rows]


async def test_database_writer_beside_redis_workers_drops_no_acknowledged_turn(
    both_modes: dict[str, str], srv: FakeOpenAIServer, tier: TieredStore
) -> None:
    """Issue 13, failing input 1, as written: redis turns, a 'database' set, a redis turn."""
    s = sid()
    async with Agent(id="r1", model=model_for(srv), session_storage="redis") as agent:
        await agent.run({"message": "one"}, session_id=s)
        await agent.run({"message": "two"}, session_id=s)
    replacement = [
        {"role": "user", "content": "set by admin"},
        {"role": "assistant", "content": "noted"},
    ]
    async with Agent(id="d", model=model_for(srv), session_storage="database") as admin:
        with pytest.raises(TierLeaseError) as refused:
            await admin.ctxmgr.aset_session_context(s, replacement)
    assert "session_storage='redis'" in str(refused.value)
    assert refused.value.session_id == s
    async with Agent(id="r2", model=model_for(srv), session_storage="redis") as agent:
        await agent.run({"message": "three"}, session_id=s)
        seen = contents(await agent.ctxmgr.aget_session_context(s))
    expected = ["one", "You said: one", "two", "You said: two", "three", "You said: three"]
    assert seen == expected
    # Nothing acknowledged lives only in Redis: with the Redis copy gone, both modes agree.
    await wipe_redis_copy(tier, s)
    assert await postgres_contents(both_modes["POSTGRES_DSN"], s) == expected
    async with Agent(id="d2", model=model_for(srv), session_storage="database") as admin:
        assert contents(await admin.ctxmgr.aget_session_context(s)) == expected
    assert contents(await tier.load(s)) == expected


async def test_every_database_mode_write_is_refused_while_the_tier_holds_the_session(
    both_modes: dict[str, str], tier: TieredStore
) -> None:
    s = sid()
    await tier.append(s, [{"role": "user", "content": "hot"}])
    assert await tier.flush(10)
    db = PostgresStore(both_modes["POSTGRES_DSN"])
    try:
        for write in (
            lambda: db.append(s, [{"role": "user", "content": "x"}]),
            lambda: db.replace(s, [{"role": "user", "content": "x"}]),
            lambda: db.clear(s),
        ):
            with pytest.raises(TierLeaseError):
                await write()
        # Reads are allowed (they show what has been flushed).
        assert contents(await db.load(s)) == ["hot"]
        # A session the tier never held is the database writer's.
        other = sid()
        assert await db.append(other, [{"role": "user", "content": "db"}]) == 1
    finally:
        await db.aclose()
    assert contents(await tier.load(s)) == ["hot"]


async def test_a_database_mode_turn_is_refused_before_the_model_is_called(
    both_modes: dict[str, str], srv: FakeOpenAIServer, tier: TieredStore
) -> None:
    s = sid()
    await tier.append(s, [{"role": "user", "content": "hot"}])
    calls = len(srv.requests)
    async with Agent(id="d", model=model_for(srv), session_storage="database") as admin:
        with pytest.raises(TierLeaseError):
            await admin.run({"message": "hello"}, session_id=s)
        assert len(srv.requests) == calls
    assert contents(await tier.load(s)) == ["hot"]


async def test_a_database_turn_whose_session_the_tier_takes_meanwhile_stores_nothing(
    both_modes: dict[str, str], srv: FakeOpenAIServer, tier: TieredStore
) -> None:
    """A 'redis' worker takes a brand-new session while a 'database' turn on it runs (here:
    during its tool call): the commit is refused with TierLeaseError inside its transaction,
    so the receipt says nothing was stored (it said "unknown": newuser trial F3, 44 of 50
    races), and Postgres holds only the 'redis' worker's message."""
    s = sid()

    async def take(key: str) -> str:
        await tier.append(s, [{"role": "user", "content": "redis"}])
        return key

    receipt = TurnReceipt()
    async with Agent(
        id="d", model=model_for(srv), session_storage="database", tools=[take]
    ) as agent:
        with pytest.raises(TierLeaseError) as refused:
            await agent.run(
                {"message": '[[call take {"key": "k"}]]'}, session_id=s, receipt=receipt
            )
    assert receipt.stored is False
    assert turn_committed(refused.value) is False
    assert await tier.flush(10)
    assert await postgres_contents(both_modes["POSTGRES_DSN"], s) == ["redis"]


async def test_import_in_database_mode_beside_redis_workers_is_refused_whole(
    both_modes: dict[str, str], tier: TieredStore, tmp_path: Path
) -> None:
    held, free = sid(), sid()
    await tier.append(held, [{"role": "user", "content": "live"}])
    assert await tier.flush(10)
    lines = [
        {"id": free, "messages": [{"role": "user", "content": "imported"}]},
        {"id": held, "messages": [{"role": "user", "content": "overwrite"}]},
    ]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    env = clean_env(**both_modes)
    result = vel_cmd("sessions", "import", str(path), "--replace", "--storage", "database", env=env)
    assert result.returncode == 1, result.stdout
    assert "--storage redis" in result.stderr and "Traceback" not in result.stderr
    assert await postgres_contents(both_modes["POSTGRES_DSN"], free) == []
    assert contents(await tier.load(held)) == ["live"]
    # Through the tier, as the error says, the same file imports whole.
    result = vel_cmd("sessions", "import", str(path), "--replace", "--storage", "redis", env=env)
    assert result.returncode == 0, result.stderr
    assert contents(await tier.load(held)) == ["overwrite"]
    assert contents(await tier.load(free)) == ["imported"]


async def lapse_tier_lease(dsn: str, session_id: str) -> None:
    """What a flusher stopped for a whole lease leaves behind: Postgres no longer knows that
    the Redis tier holds the session."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "UPDATE vel_session_rows SET hot_until = now() - interval '1 second' WHERE id = $1",
            session_id,
        )
    finally:
        await conn.close()


async def test_a_flush_that_finds_postgres_changed_is_a_visible_conflict_never_dropped(
    both_modes: dict[str, str], tier: TieredStore
) -> None:
    """The second line of defence: the tier lease lapsed while Redis held unflushed turns
    (no flusher ran for a whole lease), a 'database' writer replaced the session, and a
    'redis' turn followed. The flush must not count the Redis copy as flushed."""
    s = sid()
    dsn = both_modes["POSTGRES_DSN"]
    await tier.append(s, [{"role": "user", "content": f"m{i}"} for i in range(4)])
    assert await tier.flush(10)
    await tier.append(s, [{"role": "user", "content": "unflushed"}])
    await lapse_tier_lease(dsn, s)
    db = PostgresStore(dsn)
    try:
        await db.replace(s, [{"role": "user", "content": "admin"}])
    finally:
        await db.aclose()
    await tier.append(s, [{"role": "user", "content": "after"}])
    await tier.flusher.flush_once()
    stats = await tier.stats()
    assert stats["conflict_sessions"] == 1
    assert stats["unflushed_messages"] == 2
    keys = tier.hot.keys.session(s)
    client = (await tier.hot.client()).redis
    assert await client.pttl(keys.meta) == -1 and await client.pttl(keys.messages) == -1
    # The flusher leaves it alone (it is not retried forever), and a drain is not blocked.
    assert await tier.flush(5)
    assert await postgres_contents(dsn, s) == ["admin"]
    env = clean_env(**both_modes)
    shown = vel_cmd("stats", "--json", env=env)
    assert json.loads(shown.stdout)["conflict_sessions"] == 1, shown.stderr
    doctor = vel_cmd("doctor", env=env)
    assert doctor.returncode == 1 and "vel sessions resolve" in doctor.stdout
    listed = vel_cmd("sessions", "conflicts", env=env)
    assert listed.returncode == 0 and s in listed.stdout, listed.stderr
    # The operator keeps both: the admin's history, then what Redis alone held.
    resolved = vel_cmd("sessions", "resolve", s, "--keep", "both", env=env)
    assert resolved.returncode == 0, resolved.stderr
    assert await postgres_contents(dsn, s) == ["admin", "unflushed", "after"]
    assert contents(await tier.load(s)) == ["admin", "unflushed", "after"]
    stats = await tier.stats()
    assert stats["conflict_sessions"] == 0 and stats["unflushed_messages"] == 0


@pytest.mark.parametrize("keep", ["postgres", "redis"])
async def test_resolving_a_conflict_keeps_one_side_whole(
    both_modes: dict[str, str], tier: TieredStore, keep: str, tmp_path: Path
) -> None:
    s = sid()
    dsn = both_modes["POSTGRES_DSN"]
    await tier.append(s, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    assert await tier.flush(10)
    await tier.append(s, [{"role": "user", "content": "c"}])
    await lapse_tier_lease(dsn, s)
    db = PostgresStore(dsn)
    try:
        await db.append(s, [{"role": "user", "content": "db"}])
    finally:
        await db.aclose()
    await tier.flusher.flush_once()
    assert (await tier.stats())["conflict_sessions"] == 1
    saved = tmp_path / "discarded.jsonl"
    args = ["sessions", "resolve", s, "--keep", keep]
    if keep == "postgres":
        args += ["--save", str(saved)]
    result = vel_cmd(*args, env=clean_env(**both_modes))
    assert result.returncode == 0, result.stderr
    want = ["a", "b", "db"] if keep == "postgres" else ["a", "b", "c"]
    assert await postgres_contents(dsn, s) == want
    assert contents(await tier.load(s)) == want
    if keep == "postgres":
        (line,) = saved.read_text().splitlines()
        assert contents(json.loads(line)["messages"]) == ["c"]
