"""Warm on miss: loading a session absent from Redis from Postgres, once, never stale.

Single-flight within a process (concurrent misses of one session share one load) and across
processes (the warmer holds a lease in Redis; the others wait for the session to appear). The
seed script installs the snapshot only if the session is still absent *and* the lease is still
ours, so a slow warm can never overwrite newer data (DESIGN.md 3.4). The lease is short and
renewed while the warm runs: a warmer that dies (or freezes) holds the session back for one
lease at most.
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
from vel.stores.postgres import PostgresStore
from vel.stores.redis import RedisStore
from vel.stores.redis.keys import SessionKeys

log = logging.getLogger("vel.tiered")


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
                        if await self._load_and_seed(session_id, token):
                            return
                finally:
                    await self._end_lease(keys, token)
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
            await self._end_lease(keys, token, abandon=True)
            raise

    async def _end_lease(self, keys: SessionKeys, token: str, *, abandon: bool = False) -> None:
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
