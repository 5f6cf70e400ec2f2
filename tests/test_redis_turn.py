"""The one-step locked turn of the Redis stores: lock taken by the window read, released by
the commit (RedisStore.turn / TieredStore.turn, used by the Agent)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from servers import RedisServer

from vel.errors import InvalidInputError, SessionLockedError, StoreError
from vel.stores.postgres import PostgresStore
from vel.stores.redis import RedisStore
from vel.stores.tiered import TieredStore


def msg(i: int, role: str = "user") -> dict[str, Any]:
    return {"role": role, "content": f"m{i}"}


@pytest.fixture
async def tiered(
    pg_dsn: str, migrated_schema: str, redis_url: str, key_prefix: str
) -> AsyncIterator[TieredStore]:
    store = TieredStore(
        RedisStore(redis_url, key_prefix=key_prefix, write_behind=True, flush_delay=0),
        PostgresStore(pg_dsn, schema=migrated_schema),
        flusher=False,
    )
    yield store
    await store.aclose()


@pytest.fixture
async def redis_only(redis_url: str, key_prefix: str) -> AsyncIterator[RedisStore]:
    store = RedisStore(redis_url, key_prefix=key_prefix, hot_ttl=60)
    yield store
    await store.aclose()


async def lock_holder(store: RedisStore, session_id: str, redis_url: str) -> bytes | None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        value: bytes | None = await client.get(store.keys.session(session_id).turn_lock)
        return value
    finally:
        await client.aclose()


async def test_turn_reads_the_window_and_commit_appends_and_unlocks(
    tiered: TieredStore, redis_url: str
) -> None:
    s = f"t-{uuid.uuid4().hex[:8]}"
    await tiered.append(s, [msg(i) for i in range(5)])
    async with tiered.turn(s, limit=3) as turn:
        assert [m["content"] for m in turn.window] == ["m2", "m3", "m4"]
        assert await lock_holder(tiered.hot, s, redis_url) == turn.token.encode()
        assert await turn.commit([msg(5), msg(6, "assistant")]) == 7
        assert await lock_holder(tiered.hot, s, redis_url) is None
    assert [m["content"] for m in await tiered.load(s)] == [f"m{i}" for i in range(7)]


@pytest.mark.parametrize("limit", [None, 3])
async def test_a_turn_on_a_copy_whose_list_lost_messages_reads_the_whole_window(
    tiered: TieredStore, redis_url: str, limit: int | None
) -> None:
    """The window is read after the lock script in one MULTI/EXEC, not through Lua: a list
    gone while its meta stayed (a clean copy) goes back through the whole script, which
    drops the copy, and the turn warms it again from Postgres; a dirty one is reported as
    damaged and the lock is released."""
    s = f"t-{uuid.uuid4().hex[:8]}"
    await tiered.append(s, [msg(i) for i in range(5)])
    assert await tiered.flush(10)
    r = aioredis.Redis.from_url(redis_url)
    try:
        await r.delete(tiered.hot.keys.session(s).messages)  # what volatile-* may evict
        async with tiered.turn(s, limit=limit) as turn:
            want = [f"m{i}" for i in range(5)][-(limit or 5) :]
            assert [m["content"] for m in turn.window] == want
            assert await turn.commit([msg(5)]) == 6
        assert [m["content"] for m in await tiered.load(s)] == [f"m{i}" for i in range(6)]
        # Dirty now (msg 5 unflushed): a list that loses items is damage, never a rewarm.
        await r.delete(tiered.hot.keys.session(s).messages)
        with pytest.raises(StoreError, match="lost part of its data"):
            async with tiered.turn(s, limit=limit):
                pass
        assert await lock_holder(tiered.hot, s, redis_url) is None
    finally:
        await r.aclose()


async def test_a_turn_reads_its_window_outside_lua() -> None:
    """What issue 14 measured: 20 messages of 1 KB copied into Lua strings and back cost
    Redis about 35 us a read; the window's LRANGE runs beside the script, in a MULTI/EXEC."""
    with RedisServer() as server:
        store = RedisStore(server.url, hot_ttl=60)
        try:
            s = f"t-{uuid.uuid4().hex[:8]}"
            await store.append(s, [msg(i) for i in range(30)])
            await store.load(s, 1)
            async with store.turn(s, limit=1):
                pass  # both scripts loaded on the fresh server before counting
            client = aioredis.Redis.from_url(server.url)
            await client.config_resetstat()
            async with store.turn(s, limit=20) as turn:
                assert len(turn.window) == 20
                await turn.commit([msg(30)])
            assert len(await store.load(s, 20)) == 20
            stats = await client.info("commandstats")
            await client.aclose()
            assert stats["cmdstat_exec"]["calls"] == 2, stats
            assert stats["cmdstat_lrange"]["calls"] == 2
        finally:
            await store.aclose()


async def test_turn_of_a_session_only_in_postgres_warms_it(tiered: TieredStore) -> None:
    s = f"t-{uuid.uuid4().hex[:8]}"
    await tiered.append(s, [msg(0), msg(1, "assistant")])
    assert await tiered.flush()
    keys = tiered.hot.keys.session(s)
    client = aioredis.Redis.from_url(tiered.hot.url)
    await client.delete(*keys.data)
    await client.aclose()
    async with tiered.turn(s, limit=10) as turn:
        assert [m["content"] for m in turn.window] == ["m0", "m1"]
        await turn.commit([msg(2)])
    assert [m["content"] for m in await tiered.load(s)] == ["m0", "m1", "m2"]


async def test_a_second_turn_waits_for_the_commit(tiered: TieredStore) -> None:
    s = f"t-{uuid.uuid4().hex[:8]}"
    order: list[str] = []

    async def second() -> None:
        async with tiered.turn(s, limit=10, timeout=10) as turn:
            order.append(f"second saw {len(turn.window)}")
            await turn.commit([msg(2)])

    async with tiered.turn(s, limit=10) as turn:
        waiter = asyncio.create_task(second())
        await asyncio.sleep(0.2)
        assert order == []
        await turn.commit([msg(0), msg(1, "assistant")])
    await waiter
    assert order == ["second saw 2"]


async def test_a_held_lock_times_out(redis_only: RedisStore) -> None:
    s = f"t-{uuid.uuid4().hex[:8]}"
    async with redis_only.turn(s):
        with pytest.raises(SessionLockedError):
            async with redis_only.turn(s, timeout=0.2):
                pass


async def test_leaving_without_commit_releases_and_stores_nothing(
    redis_only: RedisStore, redis_url: str
) -> None:
    s = f"t-{uuid.uuid4().hex[:8]}"
    await redis_only.append(s, [msg(0)])
    with pytest.raises(RuntimeError):
        async with redis_only.turn(s) as turn:
            assert [m["content"] for m in turn.window] == ["m0"]
            raise RuntimeError("the model failed")
    assert await lock_holder(redis_only, s, redis_url) is None
    assert [m["content"] for m in await redis_only.load(s)] == ["m0"]


async def test_bad_messages_store_nothing_and_still_unlock(
    redis_only: RedisStore, redis_url: str
) -> None:
    s = f"t-{uuid.uuid4().hex[:8]}"
    with pytest.raises(InvalidInputError):
        async with redis_only.turn(s) as turn:
            await turn.commit([{"role": "user", "content": {"a set"}}])
    assert await lock_holder(redis_only, s, redis_url) is None
    assert await redis_only.load(s) == []


async def test_commit_does_not_release_a_lock_another_turn_now_holds(
    redis_only: RedisStore, redis_url: str
) -> None:
    s = f"t-{uuid.uuid4().hex[:8]}"
    lock = redis_only.keys.session(s).turn_lock
    client = aioredis.Redis.from_url(redis_url)
    try:
        async with redis_only.turn(s) as turn:
            # Our lease ran out and another turn took the lock.
            await client.set(lock, "someone-else")
            await turn.commit([msg(0)])
            assert await client.get(lock) == b"someone-else"
    finally:
        await client.delete(lock)
        await client.aclose()
    assert [m["content"] for m in await redis_only.load(s)] == ["m0"]


async def test_a_long_turn_keeps_its_lock_past_the_lease(redis_url: str, key_prefix: str) -> None:
    store = RedisStore(redis_url, key_prefix=key_prefix, lock_lease=0.3)
    s = f"t-{uuid.uuid4().hex[:8]}"
    try:
        async with store.turn(s) as turn:
            await asyncio.sleep(1.0)  # more than three leases: renewals must have run
            with pytest.raises(SessionLockedError):
                async with store.turn(s, timeout=0):
                    pass
            await turn.commit([msg(0)])
        async with store.turn(s, timeout=0) as again:
            assert [m["content"] for m in again.window] == ["m0"]
    finally:
        await store.aclose()


async def test_waiting_turns_are_handed_the_lock_in_arrival_order(
    redis_only: RedisStore, redis_url: str
) -> None:
    """A turn that finds the lock held marks it and blocks on the session's wake list; the
    release reserves the lock for a turn that waited and wakes one: waiting turns get the
    lock one after another in the order they came (no polling race), each seeing the turn
    before it, and a turn that comes later waits behind them."""
    s = f"t-{uuid.uuid4().hex[:8]}"
    order: list[int] = []
    seen: list[str] = []

    async def waiter(i: int) -> None:
        async with redis_only.turn(s, limit=1, timeout=30) as turn:
            order.append(i)
            seen.append(turn.window[-1]["content"] if turn.window else "")
            await asyncio.sleep(0.01)  # time for the next arrival to find the lock held
            await turn.commit([msg(i)])

    waiters: list[asyncio.Task[None]] = []
    async with redis_only.turn(s) as holder:
        for i in range(4):
            waiters.append(asyncio.create_task(waiter(i)))
            await asyncio.sleep(0.05)  # each finds the lock held, in this order
        assert await lock_holder(redis_only, s, redis_url) == holder.token.encode() + b"!"
        await holder.commit([msg(-1)])
    waiters.append(asyncio.create_task(waiter(4)))  # comes after the release: waits behind
    await asyncio.wait_for(asyncio.gather(*waiters), 30)
    assert order == [0, 1, 2, 3, 4]
    assert seen == ["m-1", "m0", "m1", "m2", "m3"]
    assert [m["content"] for m in await redis_only.load(s)] == [f"m{i}" for i in range(-1, 5)]


async def test_a_turn_that_gives_up_waiting_leaves_the_lock_usable(
    redis_only: RedisStore,
) -> None:
    """A waiter that times out (SessionLockedError) or is cancelled while blocked on the
    wake list leaves nothing behind: the next turn takes the lock once it is released."""
    s = f"t-{uuid.uuid4().hex[:8]}"
    async with redis_only.turn(s) as holder:
        with pytest.raises(SessionLockedError):
            async with redis_only.turn(s, timeout=0.3):
                pass
        blocked = asyncio.create_task(redis_only.turn(s, timeout=30).__aenter__())
        await asyncio.sleep(0.2)
        blocked.cancel()
        with pytest.raises(asyncio.CancelledError):
            await blocked
        await holder.commit([msg(0)])
    async with redis_only.turn(s, timeout=5) as turn:
        assert [m["content"] for m in turn.window] == ["m0"]
        await turn.commit([msg(1)])
