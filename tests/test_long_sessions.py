"""Sessions of any length: whole-history writes of 100,000 messages, atomic to readers, in every
mode; imports that are all-or-nothing per file; and windowed warms (DESIGN.md 3.10), whose cost
in time and Redis memory is bounded by the window, not by the history."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from conftest import model_for, schema_dsn
from servers import sized
from test_cli import clean_env, vel_cmd

from vel import Agent, ContextManager
from vel.errors import InvalidInputError
from vel.stores.postgres import PostgresStore
from vel.stores.redis import RedisStore
from vel.stores.tiered import TieredStore
from vel.testing import FakeOpenAIServer


def sid() -> str:
    return f"long-{uuid.uuid4().hex[:8]}"


def history(n: int, tag: str = "m") -> list[dict[str, Any]]:
    return [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"{tag}{i}"} for i in range(n)
    ]


@pytest.fixture
def env(pg_dsn: str, migrated_schema: str, redis_url: str, key_prefix: str) -> dict[str, str]:
    return clean_env(
        POSTGRES_DSN=schema_dsn(pg_dsn, migrated_schema),
        REDIS_URL=redis_url,
        VEL_KEY_PREFIX=key_prefix,
    )


@pytest.fixture
async def tier(
    pg_dsn: str, migrated_schema: str, redis_url: str, key_prefix: str
) -> AsyncIterator[TieredStore]:
    store = TieredStore(
        RedisStore(redis_url, key_prefix=key_prefix, write_behind=True, flush_delay=0),
        PostgresStore(pg_dsn, schema=migrated_schema),
        flusher=False,
    )
    try:
        yield store
    finally:
        await store.aclose()


# -- whole-history writes ---------------------------------------------------------------------


async def test_set_session_context_takes_ten_thousand_messages_in_every_mode(
    storage_mode: str, srv: FakeOpenAIServer
) -> None:
    """A set is not an append: the append limit (1,000 per call) does not apply."""
    s = sid()
    messages = history(10_000)
    async with Agent(
        id="l",
        model=model_for(srv),
        session_storage=storage_mode,
        context_manager=ContextManager(max_history=50),
    ) as agent:
        await agent.ctxmgr.aset_session_context(s, messages)
        assert await agent.ctxmgr.aget_session_context(s) == messages
        await agent.run({"message": "next"}, session_id=s)
        assert len(await agent.ctxmgr.aget_session_context(s)) == 10_002


async def test_a_long_replace_is_atomic_to_readers(tier: TieredStore) -> None:
    """Readers see the old history or the new one whole, never a part (Redis: built under a
    staging key, swapped in by one script)."""
    s = sid()
    old = history(3, "old")
    await tier.replace(s, old)
    new = history(30_000, "new")
    seen: list[int] = []
    writer = asyncio.create_task(tier.replace(s, new))
    while not writer.done():
        seen.append(len(await tier.load(s)))
        await asyncio.sleep(0)
    await writer
    assert set(seen) <= {3, 30_000}, sorted(set(seen))
    assert await tier.load(s) == new
    assert await tier.flush(60)
    assert await tier.cold.load(s) == new


async def test_append_keeps_its_limit_with_a_clear_message(tier: TieredStore) -> None:
    with pytest.raises(InvalidInputError, match="one append"):
        await tier.append(sid(), history(1_001))


# -- import -----------------------------------------------------------------------------------


@pytest.mark.parametrize("storage", ["database", "redis"])
async def test_export_then_import_of_a_long_session_gives_an_equal_session(
    storage: str,
    env: dict[str, str],
    pg_dsn: str,
    redis_url: str,
    key_prefix: str,
    tmp_path: Path,
    tier: TieredStore,
) -> None:
    """100,000 messages in the full matrix (scripts/faults), 20,000 in the default suite."""
    from conftest import fresh_schema

    from vel.stores.postgres.migrate import migrate

    s, short = sid(), sid()
    big = history(int(sized(20_000, 100_000)))
    await tier.replace(s, big)
    assert await tier.flush(120)
    await tier.append(short, history(1_500, "x")[:1_000])
    await tier.append(short, history(1_500, "x")[1_000:])
    out = tmp_path / "export.jsonl"
    exported = await asyncio.to_thread(vel_cmd, "sessions", "export", "--out", str(out), env=env)
    assert exported.returncode == 0, exported.stderr
    async with fresh_schema(pg_dsn) as schema:
        await migrate(pg_dsn, schema=schema)
        target = dict(env, POSTGRES_DSN=schema_dsn(pg_dsn, schema), VEL_KEY_PREFIX=key_prefix + "t")
        result = await asyncio.to_thread(
            vel_cmd, "sessions", "import", str(out), "--storage", storage, env=target, timeout=300
        )
        assert result.returncode == 0, result.stderr
        assert "imported 2 sessions" in result.stdout
        back = TieredStore(
            RedisStore(redis_url, key_prefix=key_prefix + "t", write_behind=True),
            PostgresStore(pg_dsn, schema=schema),
            flusher=False,
        )
        try:
            assert await back.load(s) == big
            assert await back.load(short) == history(1_500, "x")
            assert await back.cold.load(s) == big
        finally:
            await back.aclose()
            client = (await tier.hot.client()).redis
            keys = [k async for k in client.scan_iter(match=f"{key_prefix}t:*")]
            if keys:
                await client.delete(*keys)


@pytest.mark.parametrize("storage", ["database", "redis"])
async def test_a_file_with_one_bad_session_imports_nothing(
    storage: str, env: dict[str, str], tmp_path: Path, tier: TieredStore
) -> None:
    good, bad = sid(), sid()
    lines = [
        {"id": good, "messages": history(5)},
        # A real U+0000: no store can keep it (Postgres' jsonb refuses it).
        {"id": bad, "messages": [*history(3), {"role": "user", "content": "nul \u0000"}]},
    ]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = await asyncio.to_thread(
        vel_cmd, "sessions", "import", str(path), "--storage", storage, env=env
    )
    assert result.returncode == 1
    assert "line 2" in result.stderr and "Traceback" not in result.stderr
    assert await tier.load(good) == [] and await tier.cold.load(good) == []


async def test_a_file_naming_one_session_twice_imports_nothing(
    env: dict[str, str], tmp_path: Path, tier: TieredStore
) -> None:
    s = sid()
    path = tmp_path / "twice.jsonl"
    path.write_text(
        json.dumps({"id": s, "messages": history(2)})
        + "\n"
        + json.dumps({"id": s, "messages": history(3)})
        + "\n"
    )
    result = await asyncio.to_thread(vel_cmd, "sessions", "import", str(path), env=env)
    assert result.returncode == 1 and "line 2" in result.stderr
    assert await tier.load(s) == []


# -- windowed warm ----------------------------------------------------------------------------


async def seed_postgres(dsn: str, session_id: str, n: int) -> None:
    """A cold session of ``n`` messages written straight into Postgres."""
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.execute(
                "INSERT INTO vel_session_rows (id, last_seq) VALUES ($1, $2)", session_id, n
            )
            await conn.execute(
                "INSERT INTO vel_messages (session_id, seq, message_id, message)"
                " SELECT $1, g, 'id' || g, jsonb_build_object('role',"
                " CASE WHEN g % 2 = 1 THEN 'user' ELSE 'assistant' END,"
                " 'content', 'm' || (g - 1))"
                " FROM generate_series(1, $2::bigint) AS g",
                session_id,
                n,
            )
    finally:
        await conn.close()


async def redis_bytes(tier: TieredStore, session_id: str) -> int:
    client = (await tier.hot.client()).redis
    total = 0
    for key in tier.hot.keys.session(session_id).data:
        total += int(await client.memory_usage(key) or 0)
    return total


async def test_a_cold_windowed_turn_loads_its_window_not_the_history(
    monkeypatch: pytest.MonkeyPatch,
    env: dict[str, str],
    srv: FakeOpenAIServer,
    tier: TieredStore,
) -> None:
    """Issue 13, failing input 4: a max_history=20 turn on a cold 300,000-message session."""
    for name in ("POSTGRES_DSN", "REDIS_URL", "VEL_KEY_PREFIX"):
        monkeypatch.setenv(name, env[name])
    monkeypatch.setenv("VEL_OP_TIMEOUT", "1")
    s = sid()
    n = 300_000
    await seed_postgres(env["POSTGRES_DSN"], s, n)
    async with Agent(
        id="w",
        model=model_for(srv),
        session_storage="redis",
        context_manager=ContextManager(max_history=20),
    ) as agent:
        await agent.run({"message": "hi"}, session_id=s)
        sent = srv.requests[-1]["messages"]
        assert [m["content"] for m in sent[-21:-1]] == [f"m{i}" for i in range(n - 20, n)]
        added = await redis_bytes(tier, s)
        assert added < 1_000_000, added
        # Reads beyond the window still work: from Redis and Postgres, consistent.
        window = await agent.ctxmgr.store.load(s, 1_000)
        assert [m["content"] for m in window[:2]] == [f"m{n - 998}", f"m{n - 997}"]
        assert window[-1]["content"] == "You said: hi"
        assert await redis_bytes(tier, s) < 1_000_000
        whole = await agent.ctxmgr.aget_session_context(s)
        assert len(whole) == n + 2 and whole[0]["content"] == "m0"
        assert whole[n - 1]["content"] == f"m{n - 1}"
    assert await tier.flush(10)
    assert (await tier.cold.last_seq(s))[1] == n + 2


async def test_a_retried_append_after_a_windowed_warm_is_still_a_replay(
    tier: TieredStore, pg_dsn: str, migrated_schema: str
) -> None:
    s = sid()
    await tier.append(s, history(500)[:400])
    ids = [uuid.uuid4().hex for _ in range(2)]
    assert await tier.append(s, history(2, "r"), message_ids=ids) == 402
    assert await tier.flush(10)
    await tier.hot.call("del", lambda c: c.redis.delete(*tier.hot.keys.session(s).data))
    assert await tier.append(s, history(2, "r"), message_ids=ids) == 402
    assert await tier.load(s, 2) == history(2, "r")
    assert len(await tier.load(s)) == 402
