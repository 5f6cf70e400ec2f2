"""Warm on miss: loading a session absent from Redis from Postgres, once, never stale, and
only as much of it as the caller needs.

Single-flight within a process (concurrent misses of one session share one load) and across
processes (the warmer holds a lease in Redis; the others wait for the session to appear). The
seed script installs the snapshot only if the session is still absent *and* the lease is still
ours, so a slow warm can never overwrite newer data (DESIGN.md 3.4). The lease is short and
renewed while the warm runs: a warmer that dies (or freezes) holds the session back for one
lease at most.

The Postgres read takes the session's tier lease (``hot_until``), which tells 'database'-mode
writers that Redis may hold the session; the copy's TTL never outlives it (3.8). It reads only
the window the caller needs (at least the last :data:`WARM_MIN` messages, whose ids rebuild the
replay record; a whole-history read loads up to :data:`FULL_WARM_MAX`), so a cold turn costs
what its window costs, not what the history costs (3.10). Older messages are read on demand
(:meth:`vel.stores.tiered.TieredStore.load`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
import uuid

from vel import failpoints
from vel._lease import renewed
from vel._shield import finish
from vel.errors import StoreError, StoreTimeoutError
from vel.instrument import observed
from vel.metrics.histograms import WARM
from vel.stores.postgres import PostgresStore, Snapshot
from vel.stores.redis import RedisStore
from vel.stores.redis.keys import SessionKeys

log = logging.getLogger("vel.tiered")

# The fewest messages a warm loads: the replay record is rebuilt from their ids, so a late
# retry of a flushed append is still recognised (the record covers the last 64 appends).
WARM_MIN = 64
# The most a warm (or a read beyond a partial copy) puts into Redis; longer reads take the
# rest from Postgres each time.
FULL_WARM_MAX = 10_000
# Rows per seed or extension script: each one a bounded step of Redis' single thread.
SEED_CHUNK = 1000


def warm_size(window: int | None) -> int:
    """How many of the newest messages a warm for a read of ``window`` loads."""
    if window is None:
        return FULL_WARM_MAX
    return min(max(window, WARM_MIN), FULL_WARM_MAX)


def lease_end(asked_ms: int, lease_ms: int) -> int:
    """When a Redis copy must be gone for its tier lease (``lease_ms`` left when Postgres
    answered a call made at ``asked_ms``, the caller's clock): measured from before the call,
    and a little short of it, so the copy dies first whatever the latency to Redis."""
    return asked_ms + lease_ms - min(1000, lease_ms // 10)


class Warmer:
    """Warms sessions from ``cold`` into ``hot``.

    Args:
        hot: the Redis tier.
        cold: the Postgres tier.
        lease: seconds a warmer that died keeps others from loading the session (renewed
            while it loads).
        counters: the TieredStore's counters dict (shared, updated in place).
    """

    def __init__(
        self, hot: RedisStore, cold: PostgresStore, *, lease: float, counters: dict[str, float]
    ) -> None:
        self.hot = hot
        self.cold = cold
        self.lease = lease
        self.counters = counters
        self._warming: dict[str, asyncio.Future[None]] = {}

    async def warm(self, session_id: str, window: int | None = None) -> None:
        """Make sure ``session_id`` is in Redis (single-flight per process and across them),
        with at least its last ``warm_size(window)`` messages."""
        running = self._warming.get(session_id)
        if running is not None:
            self.counters["warm_waits"] += 1
            await asyncio.shield(running)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._warming[session_id] = future
        try:
            with observed(WARM, "warm", session_id):
                await self._warm(session_id, warm_size(window))
            future.set_result(None)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it, nobody else must log it
            raise
        finally:
            del self._warming[session_id]

    async def _warm(self, session_id: str, size: int) -> None:
        keys = self.hot.keys.session(session_id)
        # A live warmer holds the lease for a load and a seed (each within op_timeout); a
        # dead one for one lease.
        deadline = time.monotonic() + self.lease + 2 * self.cold.op_timeout
        delay = 0.002
        while True:
            token = uuid.uuid4().hex
            if await self._take_lease(keys, token):
                try:
                    async with renewed(
                        functools.partial(self.hot.renew_lock, keys.warm_lock, token, self.lease),
                        self.lease,
                        f"warm lease of session {session_id!r}",
                        session_id,
                    ):
                        if await self._load_and_seed(session_id, token, size):
                            return
                finally:
                    await self.end_lease(keys, token)
            elif await self.hot.exists(session_id):
                return  # another process finished warming it
            if time.monotonic() >= deadline:
                raise StoreTimeoutError(f"warming session {session_id!r} did not finish")
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 0.05)

    async def _take_lease(self, keys: SessionKeys, token: str) -> bool:
        try:
            return await self.hot.try_lock(keys.warm_lock, token, self.lease)
        except BaseException:
            # Redis may have granted the lease with the reply lost, or may still receive the
            # attempt: abandon it.
            await self.end_lease(keys, token, abandon=True)
            raise

    async def end_lease(self, keys: SessionKeys, token: str, *, abandon: bool = False) -> None:
        """Release the warm lease, shielded and bounded (an anyio scope cancels every await
        of a plain ``finally``); a failure leaves it to run out."""
        await finish(
            lambda: self._release(keys, token, abandon),
            self.hot.op_timeout + 1.0,
            "warm release",
        )

    async def _release(self, keys: SessionKeys, token: str, abandon: bool) -> None:
        try:
            if abandon:
                await self.hot.abandon_lock(keys.warm_lock, token, self.lease)
            else:
                await self.hot.release_lock(keys.warm_lock, token)
        except StoreError as exc:
            log.warning("could not release warm lease %s: %s", keys.warm_lock, exc)

    async def _load_and_seed(self, session_id: str, token: str, size: int) -> bool:
        if await self.hot.exists(session_id):
            self.counters["warm_loads_exists"] += 1
            return True
        self.counters["postgres_loads"] += 1
        asked = int(time.time() * 1000)
        snapshot = await self.cold.take_lease(session_id, size, self.hot.tier_lease, asked)
        await failpoints.hit("during_warm")
        if snapshot.last_seq:
            self.counters["evictions_seen"] += 1
        # The newest rows first, in one script; older ones prepended chunk by chunk: every
        # step leaves a valid partial copy, and none blocks Redis for long.
        rows = snapshot.rows
        newest = rows[-SEED_CHUNK:] if len(rows) > SEED_CHUNK else rows
        result = await self.hot.seed(
            session_id,
            token,
            gen=snapshot.generation,
            rev=snapshot.revision,
            last_seq=snapshot.last_seq,
            rows=newest,
            created_ms=snapshot.created_ms,
            updated_ms=snapshot.updated_ms,
            expires_ms=snapshot.expires_ms,
            lease_until_ms=lease_end(asked, snapshot.lease_ms or 0),
        )
        if result == 1:
            self.counters["warm_loads_ok"] += 1
            await self._extend(session_id, snapshot, len(rows) - len(newest))
        elif result == 0:
            self.counters["warm_loads_exists"] += 1
        else:
            self.counters["warm_loads_stale"] += 1
            return False
        return True

    async def _extend(self, session_id: str, snapshot: Snapshot, older: int) -> None:
        base = snapshot.last_seq - (len(snapshot.rows) - older)
        while older > 0:
            start = max(0, older - SEED_CHUNK)
            base = await self.hot.extend(
                session_id,
                snapshot.generation,
                snapshot.revision,
                base,
                snapshot.rows[start:older],
            )
            if base < 0:
                return  # the copy changed meanwhile: what it holds is still valid
            older = start
