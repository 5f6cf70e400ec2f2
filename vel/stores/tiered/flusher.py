"""Flusher: copies dirty sessions from Redis to Postgres (write-behind).

Each sweep walks the buckets claiming due sessions with a lease (a visibility timeout: a
crashed or frozen flusher's claim simply runs out and another flusher redoes the batch), reads
what they still have to copy, writes all of them, whatever their bucket, to Postgres in **one**
transaction (idempotent on ``(session_id, seq)``, verified by message id), then acknowledges.
An acknowledgement only ever raises ``flushed``, and the session gets its TTL back only when
clean, so a late or repeated flush is harmless. Any number of flushers may run at once.

Every applied flush extends the session's tier lease in Postgres, and the acknowledgement
carries it back to Redis, whose copy never outlives it. A flush Postgres cannot apply (its
history changed behind the tier, or holds other messages at the same seqs) is never
acknowledged: the session becomes a flush conflict, kept without TTL and visible in
``vel stats`` and ``vel doctor`` until ``vel sessions resolve`` (DESIGN.md 3.8).

Runs embedded in every worker (a background task of the TieredStore) or standalone
(``vel flusher``); tests drive :meth:`Flusher.flush_once`. Lives with the two-tier store it
serves: it reads through :mod:`vel.stores.redis.writebehind` and writes through
:mod:`vel.stores.postgres.sink` (DESIGN.md 3.3, write-behind is idempotent and lease-based).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from typing import TYPE_CHECKING

from vel import failpoints, metrics
from vel._lease import renewed
from vel._outage import PERMANENT_RETRY, Outage, permanent
from vel._shield import CancelWatch, settle
from vel.bounds import BATCH, DELAY, INTERVAL, LEASE, WAIT
from vel.errors import FlushConflictError, InvalidInputError, VelError
from vel.instrument import observed
from vel.logs import get_logger
from vel.metrics.histograms import FLUSH
from vel.settings import load_settings
from vel.stores.postgres import FlushBatch
from vel.stores.redis.client import now_ms
from vel.stores.redis.wbscripts import READ_BUDGET
from vel.stores.tiered.warm import lease_end
from vel.totals import Totals

if TYPE_CHECKING:
    from vel.stores.postgres import PostgresStore
    from vel.stores.redis import Claim, Pending, RedisStore

# Messages a Postgres transaction aims to carry: run() paces its sweeps by the rate it
# writes at, so transactions per message stay bounded whatever the load (below the rate at
# which the longest pause is reached, each sweep just carries less).
TARGET_ROWS = 400
# Seconds a cancelled sweep spends handing its claims back (one Redis call per bucket).
HAND_BACK = 0.25
# The shortest pause between two sweeps of run() (a sweep that found more than its limit
# sweeps again at once).
MIN_PAUSE = 0.02

# The logger keeps its name from before the flusher moved here: log filters select on it.
log = get_logger("vel.flusher")


class Flusher:
    """Moves unflushed messages from a write-behind RedisStore into a PostgresStore.

    Args:
        hot: the Redis tier (``write_behind=True``).
        cold: the Postgres tier.
        batch_sessions: sessions claimed per bucket per sweep, and written per transaction.
        max_rows: messages copied per session per transaction.
        lease: seconds a claim stays exclusive before another flusher may redo it, unless
            renewed (the default is ``VEL_FLUSH_LEASE``).
        idle_interval: the longest pause between two sweeps of :meth:`run` (seconds; the
            pause is shorter while the flusher writes more than ``TARGET_ROWS`` messages in
            that time).
        coalesce: the flush lag :meth:`run` aims to stay within (seconds, from a session's
            first unflushed write to the sweep that claims it; the Postgres write comes on
            top). What the store's flush delay and the pause between sweeps leave of it is
            the hold: a due session waits that long more, so one flush carries every turn
            of a busy session in that time. :meth:`flush_once` and :meth:`drain` hold
            nothing.
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
        lease: float | None = None,
        idle_interval: float = 0.2,
        coalesce: float = 0.3,
        max_backoff: float = 5.0,
        sweep_interval: float | None = None,
    ) -> None:
        self.hot = hot
        self.cold = cold
        self.batch_sessions = BATCH.check_int("batch_sessions", batch_sessions)
        self.max_rows = BATCH.check_int("max_rows", max_rows)
        self.lease = load_settings().flush_lease if lease is None else LEASE.check("lease", lease)
        self.idle_interval = INTERVAL.check("idle_interval", idle_interval)
        self.coalesce = DELAY.check("coalesce", coalesce)
        # The last sweep: it claimed its limit in some bucket; it was skipped (another
        # flusher had just swept); when the sweep before it was (ms, -1: unknown).
        self._full = self._skipped = False
        self._last_sweep = -1
        self.max_backoff = INTERVAL.check("max_backoff", max_backoff)
        self.sweep_interval = (
            load_settings().flush_interval
            if sweep_interval is None
            else DELAY.check("sweep_interval", sweep_interval)
        )
        # One wake-up event per running run() (an asyncio.Event belongs to the loop that first
        # waits on it, and a store may be driven by several loops), with that run's loop.
        self._runs: dict[asyncio.Event, asyncio.AbstractEventLoop] = {}
        self._failures = 0
        self.outage = Outage(log, "flush")
        # What ended the last drain early, if anything (for the closing store's log line).
        self.last_error: VelError | None = None
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
        metrics.track(self, self.counters, None)

    async def flush_once(self, hold: float = 0.0, gap: float = 0.0) -> int:
        """One sweep over every bucket; returns the number of messages written.

        Sessions due ``hold`` seconds ago or earlier are claimed and read bucket by bucket
        (up to ``batch_sessions`` per bucket; on one server every bucket in one call, and
        none when another flusher swept less than ``gap`` seconds ago), and
        written together, ``batch_sessions`` sessions per Postgres transaction, not one
        transaction per bucket: at a steady rate a sweep finds a few sessions in many
        buckets, and a transaction each would cost Postgres a commit per handful of messages.
        """
        buckets = self.hot.keys.buckets
        claimed: list[tuple[Claim, list[Pending | None]]] = []
        self._full = self._skipped = False
        self._last_sweep = -1
        try:
            # A fresh order each sweep: no bucket is always last, and flushers sweeping a
            # cluster bucket by bucket at once do not trail one another through the same
            # order (the one behind would find every bucket claimed).
            order = random.sample(range(buckets), buckets)
            if self.sweep_interval <= 0:
                swept, self._last_sweep = await self.hot.sweep(
                    order, hold, self.lease, self.batch_sessions, self.max_rows, gap
                )
                self._skipped = swept is None
                claimed = swept or []
            for bucket in order if self.sweep_interval > 0 else ():
                if not await self.hot.try_sweep(bucket, self.sweep_interval):
                    self.counters["flush_sweeps_skipped"] += 1  # another flusher swept it
                    continue
                swept, _ = await self.hot.sweep(
                    [bucket], hold, self.lease, self.batch_sessions, self.max_rows
                )
                claimed += swept or []
            if not claimed:
                return 0
            # A bucket that gave its whole limit, or a sweep that read its whole budget, may
            # leave more due sessions: no pause.
            rows = sum(len(p.rows) for _, read in claimed for p in read if p is not None)
            self._full = rows >= READ_BUDGET * self.max_rows or any(
                len(c.session_ids) >= self.batch_sessions for c, _ in claimed
            )
            claims = [claim for claim, _ in claimed]
            # Renewed while this flusher works on them, so the lease can be short: a
            # flusher that dies holds its sessions back for one lease at most.
            async with renewed(lambda: self._renew(claims), self.lease, "flush claims"):
                return await self._flush_claimed(claimed)
        except Exception:
            if claimed:
                self.counters["flush_batches_failed"] += 1
            # Hand the claims back early so a short outage does not wait out the whole lease
            # (those already written and acknowledged are clean: rescheduling skips them).
            await self._hand_back(claimed, self._retry_delay())
            raise
        except BaseException:
            # Cancelled (its loop ending, a deadline): the claims are handed back at once,
            # shielded and briefly, so the other flushers (or this process's loop-end drain)
            # need not wait out the lease for sessions nobody is writing any more.
            if claimed:
                await settle(lambda: self._hand_back_now(claimed), HAND_BACK, "flush hand-back")
            raise

    async def _hand_back_now(self, claimed: list[tuple[Claim, list[Pending | None]]]) -> None:
        # Bounded: a Redis that does not answer must not hold up the loop's shutdown (the
        # claims then run out with their lease, as a crashed flusher's do).
        async with asyncio.timeout(HAND_BACK):
            await self._hand_back(claimed, 0.0)

    async def _hand_back(
        self, claimed: list[tuple[Claim, list[Pending | None]]], delay: float
    ) -> None:
        with contextlib.suppress(VelError):
            for claim, _ in claimed:
                await self.hot.reschedule(claim.bucket, claim.session_ids, delay=delay)

    async def _renew(self, claims: list[Claim]) -> bool:
        # Sessions already acknowledged are no longer held: not a lost lease, so keep on.
        for claim in claims:
            await self.hot.renew_claim(claim, self.lease)
        return True

    async def _flush_claimed(self, claimed: list[tuple[Claim, list[Pending | None]]]) -> int:
        await failpoints.hit("flush_after_claim")
        settled: list[tuple[str, int, int]] = []
        work = []
        for claim, pending in claimed:
            for sid, item in zip(claim.session_ids, pending, strict=True):
                if item is None:
                    settled.append((sid, 0, 0))  # gone from Redis: just drop the dirty mark
                elif not item.rows and item.fgen == item.gen:
                    settled.append((sid, item.gen, item.flushed))
                else:
                    work.append(item)
        written = 0
        if settled:
            await self.hot.ack(settled)
            if not work:
                self.counters["flush_batches_ok"] += 1
        for start in range(0, len(work), self.batch_sessions):
            written += await self._write(work[start : start + self.batch_sessions])
        self.counters["flushed_messages"] += written
        return written

    async def _write(self, work: list[Pending]) -> int:
        """Copy ``work`` to Postgres in one transaction, then acknowledge it."""
        with observed(FLUSH, "flush", sessions=len(work)):
            return await self._write_batch(work)

    async def _write_batch(self, work: list[Pending]) -> int:
        while work:
            asked = now_ms()
            try:
                results = await self.cold.apply_flushes(
                    [
                        FlushBatch(
                            p.session_id,
                            p.gen,
                            p.rows,
                            revision=p.rev,
                            written_ms=p.updated_ms,
                            had_postgres_rows=p.had_postgres_rows,
                            truncate=p.truncate,
                        )
                        for p in work
                    ],
                    lease=self.hot.tier_lease,
                )
                break
            except FlushConflictError as exc:
                # One divergent session must not block the others: set it aside (it stays
                # in Redis without TTL, visible as a conflict) and write the rest.
                item = next(p for p in work if p.session_id == exc.session_id)
                await self._set_aside(item, "diverged", str(exc))
                work = [p for p in work if p.session_id != exc.session_id]
        acks: list[tuple[str, int, int, int]] = []
        written = 0
        if work:
            await failpoints.hit("flush_after_commit")
            for item, result in zip(work, results, strict=True):
                if result.stale:
                    # Postgres holds a newer generation, or a history changed behind the
                    # tier: never written back, never acknowledged.
                    why = (
                        "Postgres holds a newer generation"
                        if result.conflict is None
                        else f"its Postgres history was {result.conflict} outside the Redis tier"
                    )
                    await self._set_aside(item, result.conflict or "stale", why)
                    continue
                upto = item.rows[-1][0] if item.rows else item.flushed
                lease = 0 if result.lease_ms is None else lease_end(asked, result.lease_ms)
                acks.append((item.session_id, item.gen, upto, lease))
                written += result.inserted
                self.counters["flush_duplicates_suppressed"] += result.duplicates
        if acks:
            await self.hot.ack(acks)
        self.counters["flush_batches_ok"] += 1
        return written

    async def _set_aside(self, item: Pending, reason: str, why: str) -> None:
        """A batch Postgres did not take: the copy becomes a conflict, unless it moved on
        since it was read (a clear or replace), in which case the newer copy is flushed in
        its turn."""
        if await self.hot.conflict(item.session_id, item.gen, item.rev, reason):
            self.counters["flush_conflicts"] += 1
            log.error(
                "session %r not flushed: %s; its Redis copy is kept without TTL until "
                "`vel sessions resolve` (see `vel sessions conflicts`)",
                item.session_id,
                why,
                extra={"session_id": item.session_id},
            )
        else:
            self.counters["flush_stale_generations"] += 1

    def _retry_delay(self) -> float:
        """Capped exponential backoff with jitter, by consecutive failed batches."""
        base: float = min(0.1 * 2.0 ** min(self._failures, 16), self.max_backoff)
        return base * (0.5 + random.random() / 2)

    async def run(self) -> None:
        """Flush until :meth:`stop`; failures are retried with capped backoff.

        An outage is logged once when it starts (then at most once a minute while it lasts,
        and once when it ends), not at every retry. A permanent failure (ConfigurationError:
        refused credentials, a missing permission or table, an untrusted certificate) is
        retried only every :data:`PERMANENT_RETRY` seconds, until someone fixes it.
        """
        stop = asyncio.Event()
        self._runs[stop] = asyncio.get_running_loop()
        # Cancelled (its loop shutting down, or its owner) is final, even when a driver
        # swallowed the cancellation (Python 3.11's wait_for) or turned it into an error.
        watch = CancelWatch()
        pause, rate, last = self.idle_interval, 0.0, time.monotonic()
        try:
            while not stop.is_set():
                if self.totals.due():
                    await self.totals.publish()
                    watch.check()
                try:
                    # Sessions are claimed once due for the part of the lag budget that the
                    # pause leaves: a busy session's turns of that time go in one flush. Not
                    # while retrying: the sessions handed back are due after the backoff,
                    # and a sweep that finds none due would end the outage by mistake.
                    hold = self.coalesce - pause - self.hot.flush_delay
                    hold = 0.0 if self._failures else max(0.0, hold)
                    # Flushers sharing a server space their sweeps by about a pause between
                    # them all (a skipped sweep costs two commands), so the number of
                    # transactions does not grow with the number of workers.
                    gap = 0.0 if self._failures else 0.9 * pause
                    written = await self.flush_once(hold=hold, gap=gap)
                except Exception as exc:
                    watch.check()
                    self._failures += 1
                    self.counters["flush_retries"] += 1
                    delay = PERMANENT_RETRY if permanent(exc) else self._retry_delay()
                    self.outage.failed(exc, delay)
                    await self._sleep(stop, delay)
                    continue
                watch.check()
                self._failures = 0
                self.outage.recovered()
                if not self._skipped:
                    # Paced by the rate messages are written at (by every flusher: this
                    # sweep wrote what came due since the last one, whoever made it;
                    # smoothed over a few sweeps): the next sweep comes once about
                    # TARGET_ROWS messages are due, so a transaction carries many turns of
                    # many sessions however fast or slow the writes, and an idle flusher
                    # sweeps only every idle_interval.
                    now = time.monotonic()
                    since = now - last
                    if self._last_sweep > 0 and 0 < now_ms() - self._last_sweep < since * 1000:
                        since = (now_ms() - self._last_sweep) / 1000  # another's sweep
                    rate = 0.7 * rate + 0.3 * written / max(since, 1e-3)
                    last = now
                    pause = self.idle_interval if rate < 1 else TARGET_ROWS / rate
                    pause = min(self.idle_interval, max(MIN_PAUSE, pause))
                if not self._full:
                    await self._sleep(stop, pause * (0.9 + random.random() / 5))
        finally:
            del self._runs[stop]

    @staticmethod
    async def _sleep(stop: asyncio.Event, seconds: float) -> None:
        try:
            async with asyncio.timeout(seconds):
                await stop.wait()
        except TimeoutError:
            pass

    def stop(self) -> None:
        """Make every running :meth:`run` return after its current sweep (from any thread)."""
        for stop, loop in list(self._runs.items()):
            try:
                if asyncio.get_running_loop() is loop:
                    stop.set()
                    continue
            except RuntimeError:
                pass
            if not loop.is_closed():
                loop.call_soon_threadsafe(stop.set)

    async def drain(self, timeout: float = 10.0) -> bool:
        """Flush until nothing is unflushed or ``timeout`` passes; True when drained.

        Raises:
            InvalidInputError: a timeout out of range.
        """
        deadline = time.monotonic() + WAIT.check("timeout", timeout, InvalidInputError)
        delay = 0.02
        self.last_error = None
        while True:
            try:
                await self.flush_once()
                # No dirty session means nothing is unflushed; the backlog counter is only
                # an estimate (it can drift if keys are lost), so it does not decide.
                _, _, dirty = await self.hot.backlog()
                if dirty == 0:
                    self.outage.recovered()
                    return True
                delay = 0.02
            except VelError as exc:
                self.last_error = exc
                if permanent(exc):
                    self.outage.failed(exc, None)
                    return False  # retrying cannot help: stop draining at once
                self.outage.failed(exc, delay)
                delay = min(delay * 2, 1.0)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            await asyncio.sleep(min(delay, remaining))
