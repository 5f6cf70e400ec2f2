"""Operator-facing reads and clean-up of the Postgres tier: listing, purge, database gauges.

Retention is enforced here for rows nobody touches again: :meth:`Maintenance.purge_expired`
deletes expired sessions and, after :data:`TOMBSTONE_TTL`, the empty rows that clears leave
behind to carry their generation (DESIGN.md 3.5 and 3.9), except under a live tier lease
(3.8: the Redis tier may hold newer writes of them).
"""

from __future__ import annotations

from vel.bounds import COUNT, age_arg
from vel.errors import InvalidInputError
from vel.stores.base import SessionInfo
from vel.stores.postgres.connector import Connector

# Cleared sessions keep their row (a tombstone carrying the generation) this long, so a flush
# that was in flight when the session was cleared still finds the newer generation.
TOMBSTONE_TTL = "1 hour"
PURGE_BATCH = 500

_LIST = """
SELECT id, last_seq, created_at, updated_at, expires_at
  FROM vel_session_rows
 WHERE last_seq > 0
   AND (expires_at IS NULL OR expires_at > now())
   AND ($1::float8 IS NULL OR updated_at <= now() - $1::float8 * interval '1 second')
 ORDER BY updated_at, id
 LIMIT $2
"""
# FOR UPDATE re-checks the condition on the newest row version, so a session renewed by a
# concurrent append is spared; SKIP LOCKED keeps purging from queueing behind live writers.
# A row under a live tier lease is spared too: Redis may hold writes Postgres has not seen yet
# (the two-tier store releases the lease of an expired session once its Redis copy is gone).
_PURGE = f"""
WITH doomed AS (
    SELECT id FROM vel_session_rows
     WHERE (expires_at <= now()
            OR (last_seq = 0 AND updated_at < now() - interval '{TOMBSTONE_TTL}'))
       AND (hot_until IS NULL OR hot_until <= now())
     LIMIT $1
       FOR UPDATE SKIP LOCKED
), gone AS (
    DELETE FROM vel_session_rows s USING doomed d WHERE s.id = d.id RETURNING s.last_seq
)
SELECT count(*) AS deleted, count(*) FILTER (WHERE last_seq > 0) AS with_messages FROM gone
"""
_PURGE_LOCKS = "DELETE FROM vel_locks WHERE expires_at < now() - interval '1 hour'"
# sum(last_seq) counts live messages without scanning vel_messages (seqs are gap-free).
_STATS = """
SELECT count(*) AS sessions, coalesce(sum(last_seq), 0) AS messages
  FROM vel_session_rows
 WHERE last_seq > 0 AND (expires_at IS NULL OR expires_at > now())
"""


class Maintenance:
    """Listing, purge and gauges of :class:`~vel.stores.postgres.PostgresStore` (documented
    there)."""

    def __init__(self, db: Connector) -> None:
        self._db = db

    async def list_sessions(
        self, inactive_for: float | None = None, limit: int = 1000
    ) -> list[SessionInfo]:
        inactive_for = age_arg(inactive_for)
        limit = COUNT.check_int("limit", limit, InvalidInputError)
        rows = await self._db.run("list_sessions", lambda c: c.fetch(_LIST, inactive_for, limit))
        return [
            SessionInfo(
                session_id=row["id"],
                message_count=row["last_seq"],
                created_at=row["created_at"],
                updated_at=row["updated_at"],
                expires_at=row["expires_at"],
            )
            for row in rows
        ]

    async def purge_expired(self) -> int:
        purged = 0
        while True:
            row = await self._db.run("purge_expired", lambda c: c.fetchrow(_PURGE, PURGE_BATCH))
            assert row is not None
            purged += int(row["with_messages"])
            if row["deleted"] < PURGE_BATCH:
                break
        await self._db.run("purge_expired", lambda c: c.execute(_PURGE_LOCKS))
        return purged

    async def gauges(self) -> dict[str, float]:
        """Live ``sessions`` and ``messages`` (database-wide), ``pool_size`` and ``pool_idle``
        (this event loop's pool; 0 when none is open)."""
        row = await self._db.run("stats", lambda c: c.fetchrow(_STATS))
        assert row is not None
        pool = self._db.current_pool()
        return {
            "sessions": float(row["sessions"]),
            "messages": float(row["messages"]),
            "pool_size": float(pool.get_size()) if pool is not None else 0.0,
            "pool_idle": float(pool.get_idle_size()) if pool is not None else 0.0,
        }
