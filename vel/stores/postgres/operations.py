"""The operator-facing calls of :class:`~vel.stores.postgres.PostgresStore`: listing,
purge, counters and database gauges. A mixin, as :mod:`.tier` is; the SQL is
:mod:`.maintenance`'s."""

from __future__ import annotations

from vel.stores.base import SessionInfo
from vel.stores.postgres.connector import Connector
from vel.stores.postgres.locks import TurnLocks
from vel.stores.postgres.maintenance import Maintenance
from vel.stores.postgres.sessions import Sessions
from vel.stores.postgres.sink import Sink


class Operations:
    """Listing, purge and stats (see each method)."""

    _db: Connector
    _sessions: Sessions
    _locks: TurnLocks
    _sink: Sink
    _maintenance: Maintenance

    async def list_sessions(
        self, inactive_for: float | None = None, limit: int = 1000
    ) -> list[SessionInfo]:
        """Sessions that have messages and have not expired, least recently updated first.

        Args:
            inactive_for: only sessions not updated for at least this many seconds.
            limit: at most this many.

        Returns:
            One :class:`SessionInfo` per session (``message_count`` is its last seq).

        Raises:
            InvalidInputError: a negative argument.
            StoreError: Postgres failed.
        """
        return await self._maintenance.list_sessions(inactive_for, limit)

    async def purge_expired(self) -> int:
        """Delete expired sessions (messages included) and cleared sessions idle for an hour.

        Works in batches of 500 sessions, each within its own ``op_timeout``.

        Returns:
            How many sessions that still had messages were deleted.

        Raises:
            StoreError: Postgres failed (batches already done stay done).
        """
        return await self._maintenance.purge_expired()

    async def stats(self) -> dict[str, float]:
        """Counters of this store object and gauges of the database.

        Returns:
            ``sessions`` and ``messages`` (live, database-wide), ``pool_size`` and
            ``pool_idle`` (this event loop's pool), and this object's counters: ``appends``,
            ``append_retries_deduplicated``, ``lock_waits``, ``flushes``,
            ``flush_duplicates``, ``flush_stale``, ``failures``.

        Raises:
            StoreError: Postgres failed.
        """
        result = await self._maintenance.gauges()
        result.update(store_counters(self._sessions, self._locks, self._sink, self._db))
        return result


def store_counters(
    sessions: Sessions, locks: TurnLocks, sink: Sink, db: Connector
) -> dict[str, float]:
    """This store's counters, from its parts (not from the store: tracking them must not
    keep it alive)."""
    return {
        **sessions.counters(),
        "lock_waits": float(locks.waits),
        **sink.counters(),
        "failures": float(db.failures),
    }
