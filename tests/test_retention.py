"""Retention counts from the last write, in both tiers (DESIGN.md 3.9).

Reads refresh the hot TTL (a cache policy), never the retention (a data policy); a session
past retention reads empty in every tier at once, the next write starts it afresh at seq 1,
and no read or turn ever fails because a session expired.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest
from checker import postgres_rows
from conftest import model_for

from vel import Agent, MemoryStore
from vel.stores.redis import RedisStore
from vel.testing import FakeOpenAIServer


def sid() -> str:
    return f"ret-{uuid.uuid4().hex[:8]}"


async def read_every(agent: Agent, session_id: str, period: float, until: float) -> list[Any]:
    """(seconds since start, messages read) every ``period`` seconds until ``until``."""
    seen = []
    began = time.monotonic()
    while (elapsed := time.monotonic() - began) < until:
        messages = await agent.ctxmgr.aget_session_context(session_id)
        seen.append((elapsed, len(messages)))
        await asyncio.sleep(period)
    return seen


async def test_reads_never_extend_retention(
    storage_mode: str, srv: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 13, failing input 2: VEL_RETENTION_TTL=3, one turn, a read every 0.7 s."""
    monkeypatch.setenv("VEL_RETENTION_TTL", "3")
    s = sid()
    async with Agent(id="r", model=model_for(srv), session_storage=storage_mode) as agent:
        await agent.run({"message": "hello"}, session_id=s)
        seen = await read_every(agent, s, 0.7, 5.0)
    early = [n for t, n in seen if t < 2.0]
    late = [n for t, n in seen if t > 3.3]
    assert early and all(n == 2 for n in early), seen
    assert late and all(n == 0 for n in late), seen


async def test_a_turn_after_retention_starts_afresh_in_both_tiers(
    storage_mode: str,
    srv: FakeOpenAIServer,
    monkeypatch: pytest.MonkeyPatch,
    pg_dsn: str,
    migrated_schema: str,
) -> None:
    """The second half of failing input 2: with VEL_HOT_TTL=1, a turn after 4.5 s of reads,
    then reads and turns after the Redis copy expired: never a StoreTimeoutError, and
    Postgres holds the new turn from seq 1, nothing older."""
    monkeypatch.setenv("VEL_RETENTION_TTL", "3")
    monkeypatch.setenv("VEL_HOT_TTL", "1")
    s = sid()
    async with Agent(id="r", model=model_for(srv), session_storage=storage_mode) as agent:
        await agent.run({"message": "first"}, session_id=s)
        await read_every(agent, s, 0.7, 4.5)
        await agent.run({"message": "second"}, session_id=s)
        after = await agent.ctxmgr.aget_session_context(s)
        assert [m["content"] for m in after] == ["second", "You said: second"]
        await asyncio.sleep(1.5)  # the Redis copy (hot TTL 1 s) expires
        again = await agent.ctxmgr.aget_session_context(s)
        assert [m["content"] for m in again] == ["second", "You said: second"]
        await agent.run({"message": "third"}, session_id=s)
        final = [m["content"] for m in await agent.ctxmgr.aget_session_context(s)]
        assert final == ["second", "You said: second", "third", "You said: third"]
        if storage_mode == "redis":
            assert await agent.store.flush(10)  # type: ignore[attr-defined]
    if storage_mode != "memory":
        rows = await postgres_rows(pg_dsn, migrated_schema, s)
        assert [(r.seq, r.content) for r in rows] == list(enumerate(final, start=1))


async def test_redis_only_mode_reads_never_extend_retention(
    redis_url: str, key_prefix: str
) -> None:
    """'redis' without POSTGRES_DSN: the key TTL is the retention, and reads slide the hot
    TTL only up to it."""
    store = RedisStore(redis_url, key_prefix=key_prefix, hot_ttl=60, retention_ttl=3)
    try:
        s = sid()
        await store.append(s, [{"role": "user", "content": "x"}])
        for _ in range(3):
            await asyncio.sleep(0.6)
            assert len(await store.load(s)) == 1
        await asyncio.sleep(1.7)
        assert await store.load(s) == []
        assert await store.append(s, [{"role": "user", "content": "y"}]) == 1
    finally:
        await store.aclose()


async def test_memory_mode_sweeps_expired_sessions_it_is_never_asked_about() -> None:
    """20,000 expired sessions nobody reads again leave memory as other sessions are used."""
    store = MemoryStore(retention_ttl=2.0)
    for i in range(20_000):
        await store.append(f"old-{i}", [{"role": "user", "content": "x"}])
    assert (await store.stats())["sessions"] > 0
    await asyncio.sleep(2.1)
    for i in range(2_000):
        await store.append("live", [{"role": "user", "content": str(i)}])
        await store.load("live", 1)
    assert (await store.stats())["sessions"] == 1
    assert len(await store.load("live")) == 2_000


async def test_redis_only_mode_reads_slide_the_session_ttl(redis_url: str, key_prefix: str) -> None:
    """'redis' without POSTGRES_DSN: the TTL ends the session, and every read starts it
    again (no retention set)."""
    store = RedisStore(redis_url, key_prefix=key_prefix, hot_ttl=2)
    try:
        s = sid()
        await store.append(s, [{"role": "user", "content": "x"}])
        await asyncio.sleep(0.9)
        assert len(await store.load(s)) == 1
        await asyncio.sleep(1.5)  # past the TTL counted from the write, not from the read
        assert len(await store.load(s)) == 1
    finally:
        await store.aclose()
