"""Warm on miss: loading a session absent from Redis from Postgres, once, never stale.

Single-flight within a process (concurrent misses of one session share one load) and across
processes (the warmer holds a lease in Redis; the others wait for the session to appear). The
seed script installs the snapshot only if the session is still absent *and* the lease is still
ours, so a slow warm can never overwrite newer data (DESIGN.md 3.4).
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid

from vel import failpoints
from vel.errors import StoreTimeoutError
from vel.instrument import observed
from vel.metrics.histograms import WARM
from vel.stores.postgres import PostgresStore
from vel.stores.redis import RedisStore


class Warmer:
    """Warms sessions from ``cold`` into ``hot``.

    Args:
        hot: the Redis tier.
        cold: the Postgres tier.
        lease: seconds one process may spend loading a session before another may take over.
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

    async def warm(self, session_id: str) -> None:
        """Make sure ``session_id`` is in Redis (single-flight per process and across them)."""
        running = self._warming.get(session_id)
        if running is not None:
            self.counters["warm_waits"] += 1
            await asyncio.shield(running)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._warming[session_id] = future
        try:
            with observed(WARM, "warm", session_id):
                await self._warm(session_id)
            future.set_result(None)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it, nobody else must log it
            raise
        finally:
            del self._warming[session_id]

    async def _warm(self, session_id: str) -> None:
        keys = self.hot.keys.session(session_id)
        deadline = time.monotonic() + self.lease + self.cold.op_timeout
        delay = 0.002
        while True:
            token = uuid.uuid4().hex
            if await self.hot.try_lock(keys.warm_lock, token, self.lease):
                try:
                    if await self._load_and_seed(session_id, token):
                        return
                finally:
                    await self.hot.release_lock(keys.warm_lock, token)
            elif await self.hot.exists(session_id):
                return  # another process finished warming it
            if time.monotonic() >= deadline:
                raise StoreTimeoutError(f"warming session {session_id!r} did not finish")
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 0.05)

    async def _load_and_seed(self, session_id: str, token: str) -> bool:
        if await self.hot.exists(session_id):
            self.counters["warm_loads_exists"] += 1
            return True
        self.counters["postgres_loads"] += 1
        snapshot = await self.cold.load_snapshot(session_id)
        await failpoints.hit("during_warm")
        if snapshot is None:
            now = int(time.time() * 1000)
            result = await self.hot.seed(session_id, token, 0, 0, [], now, now)
        else:
            if snapshot.rows:
                self.counters["evictions_seen"] += 1
            result = await self.hot.seed(
                session_id,
                token,
                snapshot.generation,
                snapshot.last_seq,
                snapshot.rows,
                snapshot.created_ms,
                snapshot.updated_ms,
            )
        if result == 1:
            self.counters["warm_loads_ok"] += 1
        elif result == 0:
            self.counters["warm_loads_exists"] += 1
        else:
            self.counters["warm_loads_stale"] += 1
            return False
        return True
