"""The two tiers' side of organising sessions ('redis' mode): listing lag of one flush
interval, history pages across Redis and Postgres without a warm, and deletion by owner that
no late flush can undo."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from vel import ContextManager
from vel.stores.postgres import PostgresStore
from vel.stores.redis import RedisStore
from vel.stores.tiered import TieredStore

MakeTiered = Callable[..., TieredStore]


def msg(i: int, role: str = "user") -> dict[str, Any]:
    return {"role": role, "content": f"message {i}"}


def uid(kind: str = "t") -> str:
    return f"{kind}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def make_tiered(
    pg_dsn: str, migrated_schema: str, redis_url: str, key_prefix: str
) -> AsyncIterator[MakeTiered]:
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


def manager(store: TieredStore) -> ContextManager:
    cm = ContextManager()
    cm.bind(store)
    return cm


async def drop_redis_copy(store: TieredStore, session_id: str) -> None:
    redis = (await store.hot.client()).redis
    await redis.delete(*store.hot.keys.session(session_id).data)


async def test_a_session_is_listed_within_one_flush_interval_of_its_first_turn(
    make_tiered: MakeTiered,
) -> None:
    delay = 0.4
    store = make_tiered(flusher=True, flush_delay=delay)
    cm = manager(store)
    owner, s = uid("u"), uid()
    await cm.aset_session_details(s, owner=owner)
    started = time.monotonic()
    await store.append(s, [msg(1)])
    assert (await cm.afind_sessions(owner)).sessions == []  # not flushed yet
    while not (page := await cm.afind_sessions(owner)).sessions:
        await asyncio.sleep(0.02)
    elapsed = time.monotonic() - started
    # flush_delay, then one sweep of the idle flusher (50 ms) and one flush transaction.
    assert delay <= elapsed < delay + 1.0
    listed = page.sessions[0]
    assert listed.session_id == s and listed.message_count == 1
    # Its activity time is the write's, not the flush's.
    assert time.time() - listed.updated_at.timestamp() >= delay - 0.05


async def test_a_page_of_a_session_redis_does_not_hold_is_read_without_a_warm(
    tiered_store: TieredStore,
) -> None:
    store = tiered_store
    s = uid()
    await store.append(s, [msg(i) for i in range(1, 31)])
    assert await store.flush(10)
    await drop_redis_copy(store, s)
    page = await manager(store).aget_session_messages(s, before=11, limit=5)
    assert page.messages == [msg(i) for i in range(6, 11)] and page.last_seq == 30
    assert not await store.hot.exists(s)  # nothing was warmed


async def test_a_page_spanning_a_partial_copy_joins_postgres_and_redis(
    tiered_store: TieredStore,
) -> None:
    store = tiered_store
    s = uid()
    await store.append(s, [msg(i) for i in range(1, 31)])
    assert await store.flush(10)
    await drop_redis_copy(store, s)
    await store.warm(s, 5)  # Redis holds seqs 26..30 only
    await store.append(s, [msg(31), msg(32)])  # unflushed: in Redis only
    cm = manager(store)
    page = await cm.aget_session_messages(s, before=29, limit=6)
    assert page.seqs == [23, 24, 25, 26, 27, 28]
    assert page.messages == [msg(i) for i in page.seqs]
    newest = await cm.aget_session_messages(s, limit=3)
    assert newest.messages == [msg(30), msg(31), msg(32)] and newest.last_seq == 32
    info = await cm.aget_session_info(s)
    assert info is not None and info.message_count == 32


async def test_deleting_an_owner_cannot_be_undone_by_a_late_flush(
    tiered_store: TieredStore,
) -> None:
    store = tiered_store
    cm = manager(store)
    owner, s = uid("u"), uid()
    await cm.aset_session_details(s, owner=owner, metadata={"title": "secret"})
    await store.append(s, [msg(1)])
    assert await store.flush(10)
    await store.append(s, [msg(2), msg(3)])
    # A flusher read the batch, then stalled; meanwhile the owner asked to be forgotten.
    (late,) = await store.hot.pending([s], 100)
    assert late is not None and late.rows
    assert await cm.adelete_owner_sessions(owner) == 1
    assert (await store.cold.load_snapshot(s) or None) is not None
    assert await store.cold.load(s) == []  # Postgres forgot at once, before any flush
    outcome = await store.cold.apply_flushes([(s, late.gen, late.rows)])
    assert outcome[0].stale
    await store.hot.ack([(s, late.gen, late.rows[-1][0])])
    assert await store.flush(10)
    assert await store.cold.load(s) == []
    assert await store.load(s) == []
    await drop_redis_copy(store, s)
    assert await store.load(s) == []
    row = await store.cold.catalog.session_row(s)
    assert row is not None and (row.owner, row.metadata) == (None, {})


async def test_deleting_an_owner_under_running_writers_leaves_nothing_older(
    make_tiered: MakeTiered,
) -> None:
    """Writers keep appending to the owner's sessions while it is deleted: afterwards each
    session holds only messages written after its deletion, and nothing older comes back
    from Postgres once Redis has forgotten it."""
    workers = [make_tiered(flusher=True, flush_delay=0.01) for _ in range(2)]
    cm = manager(workers[0])
    owner = uid("u")
    ids = [uid() for _ in range(6)]
    for s in ids:
        await cm.aset_session_details(s, owner=owner)
    stop = asyncio.Event()
    phase = {"n": 0}

    async def write(store: TieredStore, s: str) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            await store.append(s, [{"role": "user", "content": f"{phase['n']}:{i}"}])
            await asyncio.sleep(0.005)

    tasks = [asyncio.create_task(write(workers[i % 2], s)) for i, s in enumerate(ids)]
    await asyncio.sleep(0.3)
    phase["n"] = 1  # later writes may race with the delete: either may come first
    await asyncio.sleep(0.1)  # every write begun in phase 0 has been acknowledged
    await cm.adelete_owner_sessions(owner)
    phase["n"] = 2
    await asyncio.sleep(0.2)
    stop.set()
    await asyncio.gather(*tasks)
    for store in workers:
        assert await store.flush(10)
    for s in ids:
        for source in (workers[0].cold, workers[1]):
            contents = [m["content"] for m in await source.load(s)]
            assert contents and not any(c.startswith("0:") for c in contents), (s, contents)


@pytest.fixture
def tiered_store(make_tiered: MakeTiered) -> TieredStore:
    return make_tiered()
