"""Pop in the two-tier store: one Redis script, then one DELETE in Postgres with the next flush,
and no flush that read the popped message before the pop can ever write it back."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from vel.stores.postgres import PostgresStore
from vel.stores.redis import RedisStore
from vel.stores.tiered import TieredStore


def msg(i: int) -> dict[str, Any]:
    return {"role": "user", "content": f"message {i}"}


def sid() -> str:
    return f"p-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def tiered(
    pg_dsn: str, migrated_schema: str, redis_url: str, key_prefix: str
) -> AsyncIterator[TieredStore]:
    """A tiered store whose flushes the test drives (flush_once)."""
    store = TieredStore(
        RedisStore(redis_url, key_prefix=key_prefix, write_behind=True, hot_ttl=60, flush_delay=0),
        PostgresStore(pg_dsn, schema=migrated_schema),
        flusher=False,
    )
    try:
        yield store
    finally:
        await store.aclose()


async def in_postgres(store: TieredStore, session_id: str) -> list[tuple[int, Any]]:
    snapshot = await store.cold.load_snapshot(session_id)
    assert snapshot is not None
    assert snapshot.last_seq == len(snapshot.rows)
    return [(seq, json.loads(text)) for seq, _, text in snapshot.rows]


async def forget_in_redis(store: TieredStore, session_id: str) -> None:
    """Drop the session's Redis copy, as an expiry or eviction of a clean session would."""
    redis = (await store.hot.client()).redis
    await redis.delete(*store.hot.keys.session(session_id).data)


async def ttl(store: TieredStore, session_id: str) -> int:
    redis = (await store.hot.client()).redis
    return int(await redis.pttl(store.hot.keys.session(session_id).meta))


async def test_a_flushed_message_leaves_postgres_with_the_next_flush(tiered: TieredStore) -> None:
    s = sid()
    await tiered.append(s, [msg(1), msg(2), msg(3)])
    await tiered.flusher.flush_once()
    assert await tiered.pop(s) == msg(3)
    assert await ttl(tiered, s) == -1, "popped but not yet flushed: dirty, so no TTL"
    assert [seq for seq, _ in await in_postgres(tiered, s)] == [1, 2, 3]
    await tiered.flusher.flush_once()
    assert await in_postgres(tiered, s) == [(1, msg(1)), (2, msg(2))]
    assert 0 < await ttl(tiered, s) <= 60_000, "clean again once Postgres has the pop"
    await forget_in_redis(tiered, s)
    assert await tiered.load(s) == [msg(1), msg(2)]
    assert await tiered.append(s, [msg(4)]) == 3


async def test_an_unflushed_message_popped_never_reaches_postgres(tiered: TieredStore) -> None:
    s = sid()
    await tiered.append(s, [msg(1)])
    await tiered.flusher.flush_once()
    await tiered.append(s, [msg(2)])
    assert (await tiered.stats())["unflushed_messages"] == 1
    assert await tiered.pop(s) == msg(2)
    assert (await tiered.stats())["unflushed_messages"] == 0
    await tiered.flusher.flush_once()
    assert await in_postgres(tiered, s) == [(1, msg(1))]
    assert (await tiered.stats())["dirty_sessions"] == 0


async def test_a_flush_that_read_the_message_before_the_pop_cannot_write_it_back(
    tiered: TieredStore,
) -> None:
    s = sid()
    await tiered.append(s, [msg(1), msg(2)])
    await tiered.flusher.flush_once()
    await tiered.append(s, [msg(3)])
    # A flusher read the batch holding message 3, then stalled; meanwhile it was popped.
    (late,) = await tiered.hot.pending([s], 100)
    assert late is not None and [seq for seq, _, _ in late.rows] == [3]
    assert await tiered.pop(s) == msg(3)
    # The stalled flusher goes on: it writes message 3, then its acknowledgement is refused.
    await tiered.cold.apply_flushes([(s, late.gen, late.rows)])
    assert [seq for seq, _ in await in_postgres(tiered, s)] == [1, 2, 3]
    assert await tiered.hot.ack([(s, late.gen, 3)]) == [-1]
    await tiered.flusher.flush_once()
    assert await in_postgres(tiered, s) == [(1, msg(1)), (2, msg(2))]
    # The seq is free again: the next message takes it without a conflict.
    assert await tiered.append(s, [msg(4)]) == 3
    await tiered.flusher.flush_once()
    assert await in_postgres(tiered, s) == [(1, msg(1)), (2, msg(2)), (3, msg(4))]
    assert (await tiered.stats())["flush_conflicts"] == 0


async def test_a_flush_arriving_after_the_pop_reached_postgres_is_stale(
    tiered: TieredStore,
) -> None:
    s = sid()
    await tiered.append(s, [msg(1), msg(2)])
    (late,) = await tiered.hot.pending([s], 100)
    assert late is not None
    assert await tiered.pop(s) == msg(2)
    await tiered.flusher.flush_once()
    (result,) = await tiered.cold.apply_flushes([(s, late.gen, late.rows)])
    assert result.stale
    assert await in_postgres(tiered, s) == [(1, msg(1))]


async def test_pops_with_a_flush_between_them_keep_what_postgres_already_has(
    tiered: TieredStore,
) -> None:
    s = sid()
    await tiered.append(s, [msg(1), msg(2), msg(3), msg(4)])
    await tiered.flusher.flush_once()
    assert await tiered.pop(s) == msg(4)
    # A flusher reads the first pop's generation and stalls; a second pop follows.
    (between,) = await tiered.hot.pending([s], 100)
    assert between is not None and between.truncate is not None
    assert await tiered.pop(s) == msg(3)
    await tiered.cold.apply_flushes([(s, between.gen, between.rows)], {s: between.truncate})
    assert [seq for seq, _ in await in_postgres(tiered, s)] == [1, 2, 3]
    # Postgres is at the first pop's generation; the second pop's flush still only truncates.
    await tiered.flusher.flush_once()
    assert await in_postgres(tiered, s) == [(1, msg(1)), (2, msg(2))]
    await forget_in_redis(tiered, s)
    assert await tiered.load(s) == [msg(1), msg(2)]


async def test_pops_then_appends_before_any_flush(tiered: TieredStore) -> None:
    s = sid()
    await tiered.append(s, [msg(1), msg(2), msg(3)])
    await tiered.flusher.flush_once()
    assert [await tiered.pop(s), await tiered.pop(s)] == [msg(3), msg(2)]
    await tiered.append(s, [msg(5), msg(6)])
    assert await tiered.pop(s) == msg(6)
    await tiered.append(s, [msg(7)])
    await tiered.flusher.flush_once()
    assert await in_postgres(tiered, s) == [(1, msg(1)), (2, msg(5)), (3, msg(7))]
    assert (await tiered.stats())["dirty_sessions"] == 0


async def test_a_replace_after_a_pop_starts_postgres_afresh(tiered: TieredStore) -> None:
    s = sid()
    await tiered.append(s, [msg(1), msg(2), msg(3)])
    await tiered.flusher.flush_once()
    await tiered.pop(s)
    await tiered.replace(s, [msg(8), msg(9)])
    await tiered.flusher.flush_once()
    assert await in_postgres(tiered, s) == [(1, msg(8)), (2, msg(9))]


async def test_pop_warms_a_session_redis_no_longer_has(tiered: TieredStore) -> None:
    s = sid()
    await tiered.append(s, [msg(1), msg(2)])
    await tiered.flusher.flush_once()
    await forget_in_redis(tiered, s)
    assert await tiered.pop(s) == msg(2)
    await tiered.flusher.flush_once()
    assert await in_postgres(tiered, s) == [(1, msg(1))]


async def test_popping_everything_leaves_an_empty_session_in_both_tiers(
    tiered: TieredStore,
) -> None:
    s = sid()
    await tiered.append(s, [msg(1), msg(2)])
    await tiered.flusher.flush_once()
    assert [await tiered.pop(s), await tiered.pop(s), await tiered.pop(s)] == [
        msg(2),
        msg(1),
        None,
    ]
    await tiered.flusher.flush_once()
    assert await in_postgres(tiered, s) == []
    await forget_in_redis(tiered, s)
    assert await tiered.load(s) == []
    assert await tiered.append(s, [msg(3)]) == 1
