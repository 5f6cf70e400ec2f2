"""Operators' calls on the two-tier store: purging expired sessions from both tiers, handing a
session back to Postgres, resolving a flush conflict (DESIGN.md 3.8, 3.9). A mixin, so the
store's facade stays one class while these calls are documented in one place."""

from __future__ import annotations

import asyncio
import time
import uuid

from vel.errors import StoreTimeoutError
from vel.messages import validate_session_id
from vel.stores.postgres import PostgresStore
from vel.stores.redis import RedisStore
from vel.stores.tiered import catalog
from vel.stores.tiered.conflicts import Resolution, resolve
from vel.stores.tiered.warm import Warmer


class TierMaintenance:
    """Purge, release and resolve (see each method)."""

    hot: RedisStore
    cold: PostgresStore
    warm_lease: float
    _warmer: Warmer

    async def purge_expired(self) -> int:
        return (await self.purge_expired_tiers())[0]

    async def purge_expired_tiers(self) -> tuple[int, int]:
        """Delete expired sessions from both tiers: their Redis copies (unless they hold
        unflushed writes, which the flusher must bring to Postgres first), then, their tier
        leases released, their Postgres rows. Clean Redis copies of sessions deleted behind
        the tier (SQL through the spec's ``vel_sessions`` view) are dropped too. Returns
        (sessions purged from Postgres, Redis copies dropped)."""
        dropped = 0
        after = ""
        while True:
            ids = await self.cold.expired_leased(500, after)
            if not ids:
                break
            codes = await self.hot.drop_clean_each(ids)
            dropped += sum(code > 0 for code in codes)
            gone = [sid for sid, code in zip(ids, codes, strict=True) if code >= 0]
            await self.cold.release_expired(gone)
            after = ids[-1]
        dropped += await catalog.drop_deleted_copies(self.hot, self.cold)
        return await self.cold.purge_expired(), dropped

    async def release(self, session_id: str) -> bool:
        """Hand ``session_id`` back to Postgres: drop its Redis copy and end its tier lease,
        so 'database'-mode writers may write it (until a 'redis' worker uses it again).

        Returns False, changing nothing, when the copy holds writes not yet in Postgres
        (flush first) or is in conflict (resolve first).
        """
        validate_session_id(session_id)
        keys = self.hot.keys.session(session_id)
        token = uuid.uuid4().hex
        # Holding the warm lease, no warm can seed a copy between the drop and the release.
        deadline = time.monotonic() + self.warm_lease
        while not await self.hot.try_lock(keys.warm_lock, token, self.warm_lease):
            if time.monotonic() > deadline:
                raise StoreTimeoutError(f"session {session_id!r} is being warmed; try again")
            await asyncio.sleep(0.05)
        try:
            (code,) = await self.hot.drop_clean_each([session_id])
            if code < 0:
                return False
            await self.cold.release_lease([session_id])
            return True
        finally:
            # Shielded and bounded; a failure leaves the lease to run out rather than replace
            # the exception in flight.
            await self._warmer.end_lease(keys, token)

    async def resolve(self, session_id: str, keep: str) -> Resolution:
        """Resolve a flush conflict (see :func:`vel.stores.tiered.conflicts.resolve`)."""
        return await resolve(self.hot, self.cold, session_id, keep)
