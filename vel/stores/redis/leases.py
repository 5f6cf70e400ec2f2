"""The lease calls of :class:`~vel.stores.redis.RedisStore`: plain leases (the warm's, ``vel
doctor``'s), turn locks and locked turns, all kept by :class:`~vel.stores.redis.locks.Locks`.
A mixin, so the store's facade stays one class while each group of calls is documented in one
place."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager

from vel.stores.redis.locks import Locks, RedisTurn


class LeaseCalls:
    """Take, renew, release and abandon a lease; a session's turn lock and locked turn."""

    _locks: Locks

    async def try_lock(self, key: str, token: str, lease: float) -> bool:
        return await self._locks.try_lock(key, token, lease)

    async def renew_lock(self, key: str, token: str, lease: float) -> bool:
        return await self._locks.renew_lock(key, token, lease)

    async def release_lock(self, key: str, token: str, wake: str | None = None) -> None:
        """Release lock ``key`` if ``token`` holds it (``wake``: a turn lock's wake list,
        ``SessionKeys.wake``, which then wakes a turn waiting for it)."""
        await self._locks.release_lock(key, token, wake)

    async def abandon_lock(
        self, key: str, token: str, lease: float, wake: str | None = None
    ) -> None:
        """Give up an attempt at lock ``key`` whose outcome is unknown (cancelled, its reply
        lost): the lock is free afterwards even if the attempt reaches Redis later."""
        await self._locks.abandon_lock(key, token, lease, wake)

    def turn_lock(
        self, session_id: str, timeout: float | None = None
    ) -> AbstractAsyncContextManager[None]:
        return self._locks.turn_lock(session_id, timeout)

    def turn(
        self,
        session_id: str,
        limit: int | None = None,
        timeout: float | None = None,
        on_miss: Callable[[], Awaitable[None]] | None = None,
    ) -> AbstractAsyncContextManager[RedisTurn]:
        """A turn of ``session_id``: its window, read under its turn lock; commit once.

        The lock is taken by the script that reads the window and released by the script
        that stores the turn's messages, so a locked turn costs two round trips, like an
        unlocked one. Leaving without a commit releases the lock (one more round trip).

        Args:
            session_id: the session.
            limit: the window (last ``limit`` messages; None: all).
            timeout: seconds to wait for the lock (default 30).
            on_miss: loads the session into Redis when it is missing (the TieredStore's
                warm); None: a missing session is empty (Redis-only mode).

        Raises:
            SessionLockedError: another turn held the lock for ``timeout`` seconds.
            StoreError: Redis failed, or the session's Redis copy is damaged.
        """
        return self._locks.turn(session_id, limit, timeout, on_miss)
