"""TieredStore behaviour against real Redis and Postgres: write-behind, TTLs, warm, clear."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from servers import RedisServer

from vel.errors import BackpressureError, StoreFullError
from vel.stores.postgres import PostgresStore
from vel.stores.redis import RedisStore
from vel.stores.tiered import TieredStore


def msg(i: int, role: str = "user") -> dict[str, Any]:
    return {"role": role, "content": f"message {i}"}


def sid() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"


MakeTiered = Callable[..., TieredStore]


@pytest.fixture
async def make_tiered(
    pg_dsn: str, migrated_schema: str, redis_url: str, key_prefix: str
) -> AsyncIterator[MakeTiered]:
    """Build tiered stores on this test's schema and prefix; closed at the end of the test.

    Keyword arguments go to the RedisStore, except ``flusher`` (default False: tests drive
    flush_once() themselves).
    """
    made: list[TieredStore] = []

    def make(flusher: bool = False, **redis_options: Any) -> TieredStore:
        options: dict[str, Any] = {"hot_ttl": 60, "flush_delay": 0, **redis_options}
        store = TieredStore(
            RedisStore(redis_url, key_prefix=key_prefix, write_behind=True, **options),
            PostgresStore(pg_dsn, schema=migrated_schema),
            flusher=flusher,
        )
        made.append(store)
        return store

    yield make
    for store in made:
        await store.aclose()


@pytest.fixture
def tiered(make_tiered: MakeTiered) -> TieredStore:
    """A tiered store without an embedded flusher."""
    return make_tiered()


async def redis_client(store: TieredStore) -> Any:
    return (await store.hot.client()).redis


async def postgres_messages(store: TieredStore, session_id: str) -> list[tuple[int, str]]:
    snapshot = await store.cold.load_snapshot(session_id)
    return [] if snapshot is None else [(seq, text) for seq, _, text in snapshot.rows]


async def test_appends_reach_postgres_only_through_the_flusher(tiered: TieredStore) -> None:
    s = sid()
    await tiered.append(s, [msg(1), msg(2, "assistant")])
    assert await postgres_messages(tiered, s) == []
    assert (await tiered.stats())["unflushed_messages"] == 2
    assert await tiered.flusher.flush_once() == 2
    rows = await postgres_messages(tiered, s)
    assert [seq for seq, _ in rows] == [1, 2]
    assert (await tiered.stats())["unflushed_messages"] == 0


async def test_many_sessions_flush_in_one_transaction(tiered: TieredStore) -> None:
    ids = [sid() for _ in range(30)]
    for s in ids:
        await tiered.append(s, [msg(1), msg(2, "assistant")])
    await tiered.flusher.flush_once()
    stats = await tiered.stats()
    assert stats["flushed_messages"] == 60
    # 30 sessions fall in at most 16 buckets: one Postgres transaction per bucket.
    assert stats["flush_batches_ok"] <= tiered.hot.keys.buckets


async def test_dirty_session_has_no_ttl_and_gets_it_back_when_clean(tiered: TieredStore) -> None:
    s = sid()
    await tiered.append(s, [msg(1)])
    r = await redis_client(tiered)
    keys = tiered.hot.keys.session(s)
    assert await r.pttl(keys.meta) == -1 and await r.pttl(keys.messages) == -1
    await tiered.flusher.flush_once()
    assert 0 < await r.pttl(keys.meta) <= 60_000
    assert 0 < await r.pttl(keys.messages) <= 60_000


async def test_reads_of_a_dirty_session_never_give_it_a_ttl(tiered: TieredStore) -> None:
    s = sid()
    await tiered.append(s, [msg(1)])
    await tiered.load(s)
    r = await redis_client(tiered)
    assert await r.pttl(tiered.hot.keys.session(s).meta) == -1


async def test_hot_ttl_expires_only_clean_sessions_and_the_next_read_warms(
    make_tiered: MakeTiered,
) -> None:
    store = make_tiered(hot_ttl=1)
    s = sid()
    await store.append(s, [msg(1), msg(2)])
    await asyncio.sleep(1.5)
    assert await store.hot.exists(s), "a dirty session expired before it was flushed"
    await store.flusher.flush_once()
    await asyncio.sleep(1.5)
    assert not await store.hot.exists(s), "a clean session kept living past its TTL"
    loads = (await store.stats())["postgres_loads"]
    assert await store.load(s) == [msg(1), msg(2)]
    assert (await store.stats())["postgres_loads"] == loads + 1


async def test_session_lost_by_redis_comes_back_and_seqs_continue(tiered: TieredStore) -> None:
    s = sid()
    await tiered.append(s, [msg(1), msg(2)])
    await tiered.flusher.flush_once()
    r = await redis_client(tiered)
    await r.delete(*tiered.hot.keys.session(s).data)
    assert await tiered.load(s, limit=1) == [msg(2)]
    assert (await tiered.stats())["evictions_seen"] == 1
    assert await tiered.append(s, [msg(3)]) == 3
    await tiered.flusher.flush_once()
    assert [seq for seq, _ in await postgres_messages(tiered, s)] == [1, 2, 3]


async def test_list_evicted_without_its_meta_is_rewarmed(tiered: TieredStore) -> None:
    s = sid()
    await tiered.append(s, [msg(1), msg(2)])
    await tiered.flusher.flush_once()
    r = await redis_client(tiered)
    await r.delete(tiered.hot.keys.session(s).messages)  # what volatile-lru may do
    assert await tiered.load(s) == [msg(1), msg(2)]


async def test_append_to_an_expired_session_rewarms_then_appends(tiered: TieredStore) -> None:
    s = sid()
    await tiered.append(s, [msg(1)])
    await tiered.flusher.flush_once()
    r = await redis_client(tiered)
    await r.delete(*tiered.hot.keys.session(s).data)
    assert await tiered.append(s, [msg(2)]) == 2
    assert await tiered.load(s) == [msg(1), msg(2)]


async def test_concurrent_cold_readers_load_from_postgres_once(tiered: TieredStore) -> None:
    s = sid()
    await tiered.append(s, [msg(i) for i in range(20)])
    await tiered.flusher.flush_once()
    r = await redis_client(tiered)
    await r.delete(*tiered.hot.keys.session(s).data)
    before = (await tiered.stats())["postgres_loads"]
    results = await asyncio.gather(*(tiered.load(s, limit=5) for _ in range(200)))
    assert all(res == [msg(i) for i in range(15, 20)] for res in results)
    assert (await tiered.stats())["postgres_loads"] - before == 1


async def test_clear_reaches_postgres_and_an_inflight_flush_cannot_undo_it(
    tiered: TieredStore,
) -> None:
    s = sid()
    await tiered.append(s, [msg(1), msg(2)])
    # A flusher read the batch, then stalled; meanwhile the session was cleared.
    (stale,) = await tiered.hot.pending([s], 100)
    assert stale is not None
    await tiered.clear(s)
    await tiered.flusher.flush_once()
    assert await postgres_messages(tiered, s) == []
    late = await tiered.cold.apply_flushes([(s, stale.gen, stale.rows)])
    assert late[0].stale
    assert await postgres_messages(tiered, s) == []
    await tiered.hot.ack([(s, stale.gen, stale.rows[-1][0])])
    assert await tiered.load(s) == []
    await tiered.append(s, [msg(3)])
    await tiered.flusher.flush_once()
    rows = await postgres_messages(tiered, s)
    assert [(seq, json.loads(text)) for seq, text in rows] == [(1, msg(3))]


async def test_replace_reaches_postgres_and_replaces_old_rows(tiered: TieredStore) -> None:
    s = sid()
    await tiered.append(s, [msg(1), msg(2), msg(3)])
    await tiered.flusher.flush_once()
    await tiered.replace(s, [msg(9, "assistant")])
    await tiered.flusher.flush_once()
    snapshot = await tiered.cold.load_snapshot(s)
    assert snapshot is not None and [seq for seq, _, _ in snapshot.rows] == [1]
    r = await redis_client(tiered)
    await r.delete(*tiered.hot.keys.session(s).data)
    assert await tiered.load(s) == [msg(9, "assistant")]


async def test_a_late_ack_never_lowers_flushed_or_cleans_newer_data(tiered: TieredStore) -> None:
    s = sid()
    await tiered.append(s, [msg(1)])
    (first,) = await tiered.hot.pending([s], 100)
    assert first is not None
    await tiered.flusher.flush_once()
    await tiered.append(s, [msg(2)])
    await tiered.hot.ack([(s, first.gen, 1)])  # the late ack of the first flusher
    stats = await tiered.stats()
    assert stats["unflushed_messages"] == 1
    await tiered.flusher.flush_once()
    assert [seq for seq, _ in await postgres_messages(tiered, s)] == [1, 2]


async def test_backpressure_rejects_when_the_backlog_is_full(make_tiered: MakeTiered) -> None:
    store = make_tiered(buckets=1, max_unflushed=4, backpressure_wait=0)
    s = sid()
    await store.append(s, [msg(1), msg(2), msg(3)])
    with pytest.raises(BackpressureError):
        await store.append(s, [msg(4), msg(5)])
    assert await store.load(s) == [msg(1), msg(2), msg(3)]
    assert (await store.stats())["backpressure_rejections"] == 1
    await store.flusher.flush_once()
    assert await store.append(s, [msg(4), msg(5)]) == 5


async def test_backpressure_waits_for_the_flusher_when_configured(
    make_tiered: MakeTiered,
) -> None:
    store = make_tiered(flusher=True, buckets=1, max_unflushed=4, backpressure_wait=5)
    s = sid()
    for i in range(10):
        await store.append(s, [msg(i), msg(i, "assistant")])
    assert len(await store.load(s)) == 20


async def test_embedded_flusher_drains_on_close(
    pg_dsn: str, migrated_schema: str, redis_url: str, key_prefix: str
) -> None:
    cold = PostgresStore(pg_dsn, schema=migrated_schema)
    store = TieredStore(
        RedisStore(redis_url, key_prefix=key_prefix, write_behind=True, flush_delay=5),
        PostgresStore(pg_dsn, schema=migrated_schema),
    )
    s = sid()
    await store.append(s, [msg(1), msg(2)])
    await store.aclose()
    try:
        snapshot = await cold.load_snapshot(s)
        assert snapshot is not None and snapshot.last_seq == 2
    finally:
        await cold.aclose()


async def test_redis_out_of_memory_is_a_typed_error_and_stores_nothing() -> None:
    with RedisServer("--maxmemory", "2mb", "--maxmemory-policy", "noeviction") as server:
        store = RedisStore(server.url, write_behind=False, hot_ttl=600)
        try:
            s = sid()
            big = {"role": "user", "content": "x" * 200_000}
            stored = 0
            with pytest.raises(StoreFullError):
                for _ in range(100):
                    await store.append(s, [big])
                    stored += 1
            assert len(await store.load(s)) == stored
        finally:
            await store.aclose()


async def test_stats_carry_every_figure_the_design_lists(tiered: TieredStore) -> None:
    s = sid()
    await tiered.append(s, [msg(1)])
    await asyncio.sleep(0.05)
    stats = await tiered.stats()
    for name in (
        "unflushed_messages",
        "oldest_dirty_age",
        "flush_batches_ok",
        "flush_batches_failed",
        "flush_retries",
        "duplicates_suppressed",
        "flush_duplicates_suppressed",
        "warm_loads_ok",
        "warm_loads_exists",
        "warm_loads_stale",
        "evictions_seen",
        "backpressure_rejections",
        "lock_waits",
    ):
        assert name in stats, name
    assert stats["unflushed_messages"] == 1 and stats["oldest_dirty_age"] > 0
    assert stats["warm_loads_ok"] == 1


async def test_a_drifted_backlog_counter_never_goes_negative_or_blocks_a_drain(
    tiered: TieredStore,
) -> None:
    """The per-bucket backlog counter is an estimate (keys lost while dirty make it drift);
    an ack clamps it at zero and a drain is decided by the dirty sets alone."""
    session = sid()
    await tiered.append(session, [msg(1), msg(2)])
    backlog_key = tiered.hot.keys.session(session).backlog
    r = await redis_client(tiered)
    await r.set(backlog_key, 0)  # as if the counter had lost these two messages
    assert await tiered.flush(5)
    assert int(await r.get(backlog_key)) == 0
    await tiered.append(session, [msg(3)])
    assert await tiered.flush(5)
    await r.set(backlog_key, -5)  # drifted the other way: nothing is dirty
    started = time.monotonic()
    assert await tiered.flush(5)
    assert time.monotonic() - started < 2
    assert await tiered.load(session) == [msg(1), msg(2), msg(3)]


async def test_a_locked_turn_counts_its_window_read_as_a_hit_or_a_miss(
    tiered: TieredStore,
) -> None:
    """The Agent reads through ``turn()``: `vel stats` must see those reads too."""
    session = sid()
    async with tiered.turn(session, 20) as turn:  # new session: warmed, then served
        await turn.commit([msg(1)])
    async with tiered.turn(session, 20) as turn:
        assert turn.window == [msg(1)]
        await turn.commit([msg(2)])
    assert (tiered.counters["redis_misses"], tiered.counters["redis_hits"]) == (1, 2)


async def test_the_flusher_pipelines_scripts_without_asking_redis_whether_it_has_them(
    pg_dsn: str, migrated_schema: str
) -> None:
    """The flusher's pipelined scripts (READ, ACK) go as plain EVALSHA: redis-py's script
    objects made every pipeline ask SCRIPT EXISTS first (a round trip of its own, and a
    cancellation during it left the pipeline holding its connection: the "Unclosed Pipeline
    client" of loop ends on a loaded machine). A server that lost its scripts is answered
    by loading them and running the pipeline again."""
    with RedisServer() as server:
        store = TieredStore(
            RedisStore(server.url, key_prefix="p", write_behind=True, flush_delay=0),
            PostgresStore(pg_dsn, schema=migrated_schema),
            flusher=False,
        )
        client = aioredis.Redis.from_url(server.url)
        try:
            s = sid()
            await store.append(s, [msg(1)])
            await store.hot.pending([s], 10)  # the fresh server learns the scripts
            await client.config_resetstat()
            # What a loop's end drain asks of each session it wrote (pipelined READ).
            (item,) = await store.hot.pending([s], 10)
            assert item is not None and len(item.rows) == 1
            stats = await client.info("commandstats")
            assert "cmdstat_script|exists" not in stats, stats
            assert stats["cmdstat_evalsha"]["calls"] == 1, stats
            await client.script_flush()
            (item,) = await store.hot.pending([s], 10)
            assert item is not None and len(item.rows) == 1
            assert await store.flush(10)
            assert (await store.hot.backlog())[0] == 0
        finally:
            await client.aclose()
            await store.aclose()
