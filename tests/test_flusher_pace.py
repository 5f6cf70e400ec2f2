"""The embedded flusher's pace: a busy session's turns coalesce into few flushes, within the
lag budget, and flushers sharing a Redis server space their sweeps between them."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from vel.stores.postgres import PostgresStore
from vel.stores.redis import RedisStore
from vel.stores.tiered import Flusher, TieredStore


@pytest.fixture
async def store(
    pg_dsn: str, migrated_schema: str, redis_url: str, key_prefix: str
) -> AsyncIterator[TieredStore]:
    tiered = TieredStore(
        RedisStore(redis_url, key_prefix=key_prefix, write_behind=True, hot_ttl=60),
        PostgresStore(pg_dsn, schema=migrated_schema),
        flusher=False,
    )
    yield tiered
    await tiered.aclose()


def count_flushes(cold: PostgresStore) -> list[tuple[float, int]]:
    """Record (time, rows) of every flush transaction ``cold`` runs."""
    flushes: list[tuple[float, int]] = []
    apply = cold.apply_flushes

    async def counted(batches: Any, truncations: Any = None, lease: Any = None) -> Any:
        result = await apply(batches, truncations, lease)
        flushes.append((time.monotonic(), sum(len(b.rows) for b in batches)))
        return result

    cold.apply_flushes = counted  # type: ignore[method-assign]
    return flushes


async def test_a_busy_sessions_turns_coalesce_within_the_lag_budget(store: TieredStore) -> None:
    """A turn every 50 ms for 2 s: a flush carries several turns (not one flush per turn),
    and every message reaches Postgres within the lag budget (plus slack for a busy host)."""
    flushes = count_flushes(store.cold)
    flusher = Flusher(store.hot, store.cold, lease=3)
    running = asyncio.create_task(flusher.run())
    sid = f"pace-{uuid.uuid4().hex[:8]}"
    acked: list[tuple[int, float]] = []
    try:
        for n in range(40):
            seq = await store.append(sid, [{"role": "user", "content": f"turn {n}"}])
            acked.append((seq, time.monotonic()))
            await asyncio.sleep(0.05)
        deadline = time.monotonic() + 10
        while await store.hot.last_seq(sid) != sum(rows for _, rows in flushes):
            assert time.monotonic() < deadline, flushes
            await asyncio.sleep(0.05)
    finally:
        flusher.stop()
        await running
    assert sum(rows for _, rows in flushes) == 40
    # About one flush per lag budget (0.3 s) of a 2 s run, not 40.
    assert len(flushes) <= 12, flushes
    commits = []
    done = 0
    for at, rows in flushes:
        done += rows
        commits.append((done, at))
    lags = [next(at for upto, at in commits if upto >= seq) - when for seq, when in acked]
    assert max(lags) < 2.0, lags


async def test_flushers_sharing_a_server_space_their_sweeps(store: TieredStore) -> None:
    """Three idle flushers on one server: the sweeps that run (not skipped) come about a
    pause apart between them all, not three times as often."""
    swept: list[float] = []
    sweep = store.hot.sweep

    async def recorded(*args: Any, **kwargs: Any) -> Any:
        claimed, last = await sweep(*args, **kwargs)
        if claimed is not None:
            swept.append(time.monotonic())
        return claimed, last

    store.hot.sweep = recorded  # type: ignore[method-assign]
    flushers = [Flusher(store.hot, store.cold, idle_interval=0.3) for _ in range(3)]
    runs = [asyncio.create_task(f.run()) for f in flushers]
    await asyncio.sleep(2.0)
    for f in flushers:
        f.stop()
    await asyncio.gather(*runs)
    gaps = [b - a for a, b in itertools.pairwise(swept)]
    # 3 flushers x 2 s / 0.3 s would be ~20 sweeps unspaced; spaced, about 7.
    assert 3 <= len(swept) <= 10, swept
    assert min(gaps) >= 0.2, gaps  # 0.9 x the pause, less timer slack


async def test_one_ack_settles_sessions_of_many_buckets_each_by_its_own_state(
    store: TieredStore,
) -> None:
    """Sessions of several buckets read and acknowledged in one call each: every session gets
    the code its own state calls for, and each bucket's dirty set and backlog follow."""
    hot = store.hot
    sids: list[str] = []
    buckets: set[int] = set()
    while len(buckets) < 4 or len(sids) < 6:
        sid = f"batch-{uuid.uuid4().hex[:8]}"
        if hot.keys.bucket_of(sid) not in buckets or len(buckets) >= 4:
            buckets.add(hot.keys.bucket_of(sid))
            sids.append(sid)
    for sid in sids:
        await store.append(sid, [{"role": "user", "content": f"{sid} 1"}])
    read = await hot.pending(sids, 100)
    assert [p.rows[-1][0] if p else None for p in read] == [1] * len(sids)
    await store.append(sids[1], [{"role": "user", "content": "after the read"}])
    await store.clear(sids[2])  # a new generation: the read one is stale
    gone = hot.keys.session(sids[3])
    await hot.call("del", lambda c: c.redis.delete(*gone.data))
    acks = [(p.session_id, p.gen, p.rows[-1][0]) for p in read if p is not None]
    assert await hot.ack(acks) == [1, 2, -1, 0, 1, 1]
    unflushed, _, dirty = await hot.backlog()
    # Dirty: sids[1] (its second message) and sids[2] (cleared: dirty until Postgres has the
    # new generation); sids[3] left the dirty set. The backlog counter is an estimate: it
    # still counts the message of sids[3], whose keys were deleted behind the tier's back.
    assert (unflushed, dirty) == (2, 2)
    for sid in (sids[0], sids[4], sids[5]):
        pttl = await hot.call("pttl", lambda c, s=sid: c.redis.pttl(hot.keys.session(s).meta))
        assert pttl > 0  # clean again: its TTL is back


async def dirty_score(store: TieredStore, sid: str) -> float | None:
    dirty = store.hot.keys.session(sid).dirty
    score = await store.hot.call("zscore", lambda c: c.redis.zscore(dirty, sid))
    return None if score is None else float(score)


async def test_a_cancelled_sweep_hands_its_claims_back_at_once(store: TieredStore) -> None:
    """A flusher cancelled after claiming (its event loop ending without aclose(), a
    deadline) hands the sessions back: another flusher writes them at once, not after the
    claim's lease (a worker exiting used to hold a session back from every other flusher,
    and from its own loop-end drain, for the whole lease)."""
    from vel import failpoints

    sid = f"handback-{uuid.uuid4().hex[:8]}"
    await store.append(sid, [{"role": "user", "content": "hello"}])
    while (score := await dirty_score(store, sid)) is None or score > time.time() * 1000:
        await asyncio.sleep(0.02)  # due once the store's flush delay has passed
    failpoints.configure("flush_after_claim=sleep:30@1")
    try:
        sweep = asyncio.create_task(Flusher(store.hot, store.cold, lease=30).flush_once())
        deadline = time.monotonic() + 5
        # Claimed: due again only a lease from now.
        while (score := await dirty_score(store, sid)) is None or score < (time.time() + 10) * 1000:
            assert time.monotonic() < deadline and not sweep.done(), "never claimed"
            await asyncio.sleep(0.02)
        sweep.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sweep
    finally:
        failpoints.configure("")
    began = time.monotonic()
    written = await Flusher(store.hot, store.cold, lease=30).flush_once()
    assert written == 1, "the cancelled sweep's claim kept the session from the next flusher"
    assert time.monotonic() - began < 2
    assert (await store.cold.load(sid)) == [{"role": "user", "content": "hello"}]


async def test_sessions_flushed_together_keep_their_own_write_times(store: TieredStore) -> None:
    """Sessions replaced (or cleared, or popped) apart and flushed in one transaction keep
    the times of their writes as `updated_at`, not the flush's one time: listings order them
    by when they were written (they came out in id order when coalesced flushes tied)."""
    b, a = f"b-{uuid.uuid4().hex[:6]}", f"a-{uuid.uuid4().hex[:6]}"
    await store.replace(b, [{"role": "user", "content": "first"}])
    await asyncio.sleep(0.05)
    await store.replace(a, [{"role": "user", "content": "second"}])
    await store.append(a, [{"role": "assistant", "content": "third"}])
    await store.pop(a)
    await asyncio.sleep(0.2)
    flushed_from = time.time()
    assert await store.flush(10)
    rows = {d.session_id: d for d in [await store.session_details(s) for s in (a, b)] if d}
    assert rows[b].updated_at < rows[a].updated_at
    assert rows[a].updated_at.timestamp() < flushed_from


async def test_one_sweep_reads_a_bounded_number_of_messages(store: TieredStore) -> None:
    """A backlog (after an outage, say) is read a bounded amount per call (a script blocks
    Redis while it runs and its reply is held whole): with max_rows 5, a sweep reads about
    4 x 5 messages, claims only the sessions it read, and the next sweeps take the rest."""
    from vel.stores.redis.wbscripts import READ_BUDGET

    ids = [f"bud-{i}-{uuid.uuid4().hex[:6]}" for i in range(12)]
    for sid in ids:
        await store.append(sid, [{"role": "user", "content": f"{sid} {n}"} for n in range(5)])
    await asyncio.sleep(0.2)  # every session due
    buckets = list(range(store.hot.keys.buckets))
    swept, _ = await store.hot.sweep(buckets, 0.0, 30.0, 200, 5)
    assert swept is not None
    read = sum(len(p.rows) for _, pending in swept for p in pending if p is not None)
    assert READ_BUDGET * 5 <= read < READ_BUDGET * 5 + 5, read  # stops once over the budget
    claimed = {sid for claim, _ in swept for sid in claim.session_ids}
    assert len(claimed) == read // 5
    flusher = Flusher(store.hot, store.cold, lease=30, max_rows=5)
    written = 0
    for _ in range(10):
        written += await flusher.flush_once()
    assert written == 5 * (len(ids) - len(claimed)), "the unclaimed rest is flushed next"
