"""Every lease vel takes is short by default and renewed while its holder works.

Turn locks (Redis and Postgres), flush claims and warm leases: a holder that dies (or freezes)
blocks others for one lease at most, while a live holder keeps its lease however long its
work takes. The kill and restart runs are in ``test_faults.py``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest
from workers import Stack

from vel import ConfigurationError, failpoints
from vel.settings import load_settings
from vel.stores.postgres import PostgresStore
from vel.stores.redis import RedisStore
from vel.stores.tiered import TieredStore


def test_leases_are_short_by_default_and_set_from_the_environment() -> None:
    base = load_settings({})
    assert base.lock_lease <= 10 and base.flush_lease <= 5 and base.warm_lease <= 5
    env = {"VEL_LOCK_LEASE": "2.5", "VEL_FLUSH_LEASE": "1.5", "VEL_WARM_LEASE": "0.75"}
    settings = load_settings({**env, "POSTGRES_DSN": "postgresql://u@127.0.0.1/db"})
    hot = RedisStore(settings=settings, write_behind=True)
    cold = PostgresStore(settings=settings)
    tiered = TieredStore(hot, cold, settings=settings, flusher=False)
    assert hot.lock_lease == 2.5
    assert cold.lock_lease == 2.5
    assert tiered.flusher.lease == 1.5
    assert tiered.warm_lease == 0.75
    for name in env:
        for bad in ("0", "0.05", "3601", "soon", "-3", "nan"):
            with pytest.raises(ConfigurationError, match=name):
                load_settings({name: bad})


def store(stack: Stack, **options: Any) -> TieredStore:
    return TieredStore(
        RedisStore(stack.redis_url, key_prefix=stack.prefix, write_behind=True, flush_delay=0),
        PostgresStore(stack.pg_dsn, schema=stack.schema),
        flusher=False,
        **options,
    )


async def dirty_score(tiered: TieredStore, sid: str) -> float | None:
    dirty = tiered.hot.keys.session(sid).dirty
    score = await tiered.hot.call("zscore", lambda c: c.redis.zscore(dirty, sid))
    return None if score is None else float(score)


async def test_a_working_flusher_keeps_its_claim_past_the_lease(stack: Stack) -> None:
    """A flush transaction that takes 4 leases: the claim is renewed, so a second flusher
    claims nothing meanwhile; once done the session is clean."""
    a, b = store(stack, flush_lease=0.6), store(stack, flush_lease=0.6)
    sid = f"lease-{uuid.uuid4().hex[:8]}"
    try:
        await a.append(sid, [{"role": "user", "content": "hello"}])
        failpoints.configure("flush_mid_transaction=sleep:2.4@1")
        flushing = asyncio.create_task(a.flusher.flush_once())
        began = time.monotonic()
        while await dirty_score(a, sid) is None or not await claimed(a, sid):
            assert time.monotonic() - began < 5, "the first flusher never claimed"
            await asyncio.sleep(0.01)
        stolen = 0
        while not flushing.done():
            swept, _ = await b.hot.sweep([b.hot.keys.bucket_of(sid)], 0.0, 0.6, 10, 1000)
            stolen += any(sid in claim.session_ids for claim, _ in swept or [])
            await asyncio.sleep(0.1)
        assert await flushing == 1
        assert stolen == 0
        assert time.monotonic() - began >= 2.4
        assert await dirty_score(a, sid) is None  # clean
    finally:
        failpoints.configure("")
        await a.aclose()
        await b.aclose()


async def claimed(tiered: TieredStore, sid: str) -> bool:
    score = await dirty_score(tiered, sid)
    return score is not None and score > time.time() * 1000 + 100


async def test_a_frozen_flusher_loses_its_claim_after_one_lease(stack: Stack) -> None:
    """Frozen (its event loop blocked), a flusher renews nothing: its claim runs out after
    one lease and another flusher writes the session."""
    sid = f"lease-{uuid.uuid4().hex[:8]}"
    b = store(stack, flush_lease=0.5)

    def frozen_flusher() -> None:
        async def main() -> None:
            a = store(stack, flush_lease=0.5)
            try:
                await a.flusher.flush_once()
            finally:
                await a.aclose()

        asyncio.run(main())

    try:
        await b.append(sid, [{"role": "user", "content": "hello"}])
        failpoints.configure("flush_after_claim=freeze:3@1")
        frozen = asyncio.create_task(asyncio.to_thread(frozen_flusher))
        began = time.monotonic()
        while not await claimed(b, sid):
            assert time.monotonic() - began < 5, "the frozen flusher never claimed"
            await asyncio.sleep(0.01)
        claimed_at = time.monotonic()
        assert await b.flush(10)
        took = time.monotonic() - claimed_at
        assert not frozen.done(), "the frozen flusher woke before the session was flushed"
        assert 0.3 <= took < 2.5, took
        await frozen
    finally:
        failpoints.configure("")
        await b.aclose()


async def test_a_slow_warm_keeps_its_lease_and_loads_postgres_once(stack: Stack) -> None:
    """A warm that takes 4 warm leases (a slow Postgres) keeps its lease: a second process
    waits for it instead of loading the session from Postgres as well."""
    sid = f"lease-{uuid.uuid4().hex[:8]}"
    seed = store(stack)
    a, b = store(stack, warm_lease=0.5), store(stack, warm_lease=0.5)
    try:
        await seed.append(sid, [{"role": "user", "content": f"m{i}"} for i in range(3)])
        assert await seed.flush(10)
        await seed.hot.call("del", lambda c: c.redis.delete(*seed.hot.keys.session(sid).data))
        failpoints.configure("during_warm=sleep:2@1")
        first = asyncio.create_task(a.load(sid))
        await asyncio.sleep(0.2)
        second = await b.load(sid)
        assert [m["content"] for m in await first] == ["m0", "m1", "m2"]
        assert second == await first
        assert a.counters["postgres_loads"] + b.counters["postgres_loads"] == 1
        assert a.counters["warm_loads_stale"] == b.counters["warm_loads_stale"] == 0
    finally:
        failpoints.configure("")
        for s in (seed, a, b):
            await s.aclose()


async def test_an_abandoned_lock_attempt_delivered_late_cannot_take_the_lock(stack: Stack) -> None:
    """A cancelled attempt at a lock may reach the server after the caller gave it up (its
    connection closed, the give-up sent on another): the give-up leaves a tombstone that the
    late attempt cannot take, while every other token can."""
    hot = RedisStore(stack.redis_url, key_prefix=stack.prefix)
    key = hot.keys.session(f"lease-{uuid.uuid4().hex[:8]}").turn_lock
    try:
        await hot.abandon_lock(key, "late", 5)
        assert not await hot.try_lock(key, "late", 5)  # the attempt, arriving late
        assert await hot.try_lock(key, "other", 5)  # free for anyone else
        await hot.abandon_lock(key, "late", 5)  # another token's lock is left alone
        assert not await hot.try_lock(key, "third", 5)
        await hot.abandon_lock(key, "other", 5)  # the attempt had run: freed
        assert await hot.try_lock(key, "third", 5)
    finally:
        await hot.aclose()

    import asyncpg

    from vel.stores.postgres.locks import _LOCK_ABANDON, _LOCK_ACQUIRE

    conn = await asyncpg.connect(stack.dsn)
    try:
        sid = f"lease-{uuid.uuid4().hex[:8]}"
        await conn.execute(_LOCK_ABANDON, sid, "late")
        assert await conn.fetchval(_LOCK_ACQUIRE, sid, "late", 5.0) is None
        assert await conn.fetchval(_LOCK_ACQUIRE, sid, "other", 5.0) == "other"
        await conn.execute(_LOCK_ABANDON, sid, "late")
        assert await conn.fetchval(_LOCK_ACQUIRE, sid, "third", 5.0) is None
        await conn.execute(_LOCK_ABANDON, sid, "other")
        assert await conn.fetchval(_LOCK_ACQUIRE, sid, "third", 5.0) == "third"
        # The locked turn's one-call lock and read (vel_turn_begin) obeys the same rule.
        sid = f"lease-{uuid.uuid4().hex[:8]}"
        begin = "SELECT vel_turn_begin($1, $2, $3::float8, $4::bigint)"
        await conn.execute(_LOCK_ABANDON, sid, "late")
        assert await conn.fetchval(begin, sid, "late", 5.0, 10) is None
        assert await conn.fetchval(begin, sid, "other", 5.0, 10) == []
    finally:
        await conn.close()
