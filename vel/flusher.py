"""Flusher: copies dirty sessions from Redis to Postgres (write-behind).

Each sweep walks the buckets; in each it claims due sessions with a lease (a visibility
timeout: a crashed or frozen flusher's claim simply runs out and another flusher redoes the
batch), reads what they still have to copy, writes all of them to Postgres in **one**
transaction (idempotent on ``(session_id, seq)``, verified by message id), then acknowledges.
An acknowledgement only ever raises ``flushed``, and the session gets its TTL back only when
clean, so a late or repeated flush is harmless. Any number of flushers may run at once.

Runs embedded in every worker (a background task of the TieredStore) or standalone
(``vel flusher``); tests drive :meth:`Flusher.flush_once`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from typing import TYPE_CHECKING

from vel import failpoints
from vel.errors import FlushConflictError, StoreError
from vel.settings import load_settings
from vel.totals import Totals

if TYPE_CHECKING:
    from vel.stores.postgres import PostgresStore
    from vel.stores.redis import RedisStore

log = logging.getLogger("vel.flusher")


class Flusher:
    """Moves unflushed messages from a write-behind RedisStore into a PostgresStore.

    Args:
        hot: the Redis tier (``write_behind=True``).
        cold: the Postgres tier.
        batch_sessions: sessions claimed per bucket per transaction.
        max_rows: messages copied per session per transaction.
        lease: seconds a claim stays exclusive before another flusher may redo it.
        idle_interval: sleep between sweeps that found nothing to do.
        max_backoff: cap of the retry delay while Postgres or Redis fails.
        sweep_interval: seconds between two claims in one bucket by all flushers together
            (a short per-bucket lease in Redis; default ``VEL_FLUSH_INTERVAL``, 0: none). It
            bounds Postgres transactions per second however many flushers run.
    """

    def __init__(
        self,
        hot: RedisStore,
        cold: PostgresStore,
        *,
        batch_sessions: int = 200,
        max_rows: int = 1000,
        lease: float = 30.0,
        idle_interval: float = 0.05,
        max_backoff: float = 5.0,
        sweep_interval: float | None = None,
    ) -> None:
        self.hot = hot
        self.cold = cold
        self.batch_sessions = batch_sessions
        self.max_rows = max_rows
        self.lease = lease
        self.idle_interval = idle_interval
        self.max_backoff = max_backoff
        self.sweep_interval = (
            load_settings().flush_interval if sweep_interval is None else sweep_interval
        )
        self._stop = asyncio.Event()
        self._offset = random.randrange(hot.keys.buckets)
        self._failures = 0
        self.counters: dict[str, float] = {
            "flush_batches_ok": 0,
            "flush_batches_failed": 0,
            "flush_retries": 0,
            "flushed_messages": 0,
            "flush_duplicates_suppressed": 0,
            "flush_stale_generations": 0,
            "flush_conflicts": 0,
            "flush_sweeps_skipped": 0,
        }
        # Shared through Redis so `vel stats` sees every flusher's work.
        self.totals = Totals(hot, [self.counters])

    async def flush_once(self) -> int:
        """One sweep over every bucket; returns the number of messages written."""
        written = 0
        buckets = self.hot.keys.buckets
        self._offset = (self._offset + 1) % buckets
        for i in range(buckets):
            written += await self._flush_bucket((self._offset + i) % buckets)
        return written

    async def _flush_bucket(self, bucket: int) -> int:
        if self.sweep_interval > 0 and not await self.hot.try_sweep(bucket, self.sweep_interval):
            self.counters["flush_sweeps_skipped"] += 1  # another flusher swept it just now
            return 0
        session_ids = await self.hot.claim(bucket, self.lease, self.batch_sessions)
        if not session_ids:
            return 0
        try:
            return await self._flush_claimed(bucket, session_ids)
        except Exception:
            self.counters["flush_batches_failed"] += 1
            # Hand the claim back early so a short outage does not wait out the whole lease.
            with contextlib.suppress(StoreError):
                await self.hot.reschedule(bucket, session_ids, delay=self._retry_delay())
            raise

    async def _flush_claimed(self, bucket: int, session_ids: list[str]) -> int:
        await failpoints.hit("flush_after_claim")
        pending = await self.hot.pending(session_ids, self.max_rows)
        acks: list[tuple[str, int, int]] = []
        work = []
        for sid, item in zip(session_ids, pending, strict=True):
            if item is None:
                acks.append((sid, 0, 0))  # gone from Redis: just drop the dirty mark
            elif not item.rows and item.fgen == item.gen:
                acks.append((sid, item.gen, item.flushed))
            else:
                work.append(item)
        written = 0
        while work:
            try:
                results = await self.cold.apply_flushes(
                    [(p.session_id, p.gen, p.rows) for p in work]
                )
                break
            except FlushConflictError as exc:
                # One divergent session must not block the others: set it aside (it stays
                # dirty, so it is never expired) and write the rest.
                self.counters["flush_conflicts"] += 1
                log.error(
                    "session %r not flushed: %s",
                    exc.session_id,
                    exc,
                    extra={"session_id": exc.session_id},
                )
                work = [p for p in work if p.session_id != exc.session_id]
                await self.hot.reschedule(bucket, [exc.session_id], delay=60.0)
        if work:
            await failpoints.hit("flush_after_commit")
            for item, result in zip(work, results, strict=True):
                if result.stale:
                    # Postgres holds a newer generation than this Redis copy (Redis lost a
                    # clear/replace): never write it back; mark it clean so it expires.
                    self.counters["flush_stale_generations"] += 1
                    log.error(
                        "session %r: Redis copy is older than Postgres; not flushed",
                        item.session_id,
                        extra={"session_id": item.session_id},
                    )
                upto = item.rows[-1][0] if item.rows else item.flushed
                acks.append((item.session_id, item.gen, upto))
                written += result.inserted
                self.counters["flush_duplicates_suppressed"] += result.duplicates
        await self.hot.ack(acks)
        self.counters["flush_batches_ok"] += 1
        self.counters["flushed_messages"] += written
        return written

    def _retry_delay(self) -> float:
        """Capped exponential backoff with jitter, by consecutive failed batches."""
        base: float = min(0.1 * 2.0 ** min(self._failures, 16), self.max_backoff)
        return base * (0.5 + random.random() / 2)

    async def run(self) -> None:
        """Flush until :meth:`stop`; failures are logged and retried with capped backoff."""
        self._stop.clear()
        while not self._stop.is_set():
            if self.totals.due():
                await self.totals.publish()
            try:
                written = await self.flush_once()
            except Exception as exc:
                self._failures += 1
                self.counters["flush_retries"] += 1
                delay = self._retry_delay()
                if isinstance(exc, (StoreError, OSError)):
                    log.warning("flush failed (retrying in %.2f s): %s", delay, exc)
                else:
                    log.exception("flush failed unexpectedly (retrying in %.2f s)", delay)
                await self._sleep(delay)
                continue
            if written:
                self._failures = 0
            else:
                await self._sleep(self.idle_interval * (0.5 + random.random()))

    async def _sleep(self, seconds: float) -> None:
        try:
            async with asyncio.timeout(seconds):
                await self._stop.wait()
        except TimeoutError:
            pass

    def stop(self) -> None:
        self._stop.set()

    async def drain(self, timeout: float = 10.0) -> bool:
        """Flush until nothing is unflushed or ``timeout`` passes; True when drained."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                await self.flush_once()
                unflushed, _, dirty = await self.hot.backlog()
                if unflushed == 0 and dirty == 0:
                    return True
            except StoreError as exc:
                log.warning("drain: flush failed: %s", exc)
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.02)
