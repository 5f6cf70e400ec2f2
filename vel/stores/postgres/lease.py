"""The tier lease and the warm's reads: the durable side of DESIGN.md 3.4, 3.8 and 3.10.

:meth:`TierLease.take_lease` is what a warm reads: it records that the Redis tier may hold the
session (``hot_until``, which 'database'-mode writers honour) and returns the header plus the
window the caller needs, never the whole history; an expired session starts afresh in place.
:meth:`TierLease.load_range` serves older messages on demand, only from the history a Redis
copy was loaded from. :meth:`TierLease.release` and :meth:`TierLease.release_expired` end the
lease once the Redis copy is gone (``vel sessions release``, the two-tier purge).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vel.bounds import COUNT
from vel.errors import InvalidInputError, StoreError
from vel.messages import validate_session_id
from vel.stores.postgres.connector import Conn, Connector, transaction
from vel.stores.postgres.sql import AT as _AT
from vel.stores.postgres.sql import INSERT_CHUNK, Row, chunks
from vel.stores.postgres.sql import MS as _MS

_DELETE_MESSAGES = "DELETE FROM vel_messages WHERE session_id = $1"

# One statement, hence one snapshot: the header and the rows always agree.
_SNAPSHOT = f"""
SELECT s.generation, s.last_seq, s.revision,
       {_MS.format("s.created_at")} AS created_ms,
       {_MS.format("s.updated_at")} AS updated_ms,
       {_MS.format("s.expires_at")} AS expires_ms,
       m.seq, m.message_id, m.message::text AS message
  FROM vel_session_rows s
  LEFT JOIN vel_messages m ON m.session_id = s.id
 WHERE s.id = $1 AND (s.expires_at IS NULL OR s.expires_at > now())
 ORDER BY m.seq
"""
# The warm's first statement: create or lock the row and take (or extend) the tier lease.
# $2 lease seconds, $3 the caller's clock in ms (expiry is judged on the clock that wrote it).
_TAKE_LEASE = f"""
INSERT INTO vel_session_rows AS s (id, hot_until)
VALUES ($1, now() + $2::float8 * interval '1 second')
ON CONFLICT (id) DO UPDATE
   SET hot_until = greatest(coalesce(s.hot_until, now()), EXCLUDED.hot_until)
RETURNING s.generation, s.revision, s.last_seq,
          {_MS.format("s.created_at")} AS created_ms,
          {_MS.format("s.updated_at")} AS updated_ms,
          {_MS.format("s.expires_at")} AS expires_ms,
          coalesce(s.expires_at <= {_AT.format("$3::float8")}, false) AS expired,
          {_MS.format("s.hot_until - now()")} AS lease_ms
"""
# An expired session met by a warm starts afresh in place (see sessions._RESTART_EXPIRED),
# if it still is expired once its row is locked ($2: the caller's clock, ms).
_RESTART_FOR_TIER = f"""
UPDATE vel_session_rows
   SET last_seq = 0, generation = generation + 1, revision = revision + 1,
       created_at = now(), updated_at = now(), expires_at = NULL
 WHERE id = $1 AND expires_at <= {_AT.format("$2::float8")}
RETURNING id
"""
# The window: seqs $2..$3 by a range scan of the primary key, if the session still has the
# generation the header was read at ($4): rows up to a seq never change within a generation,
# so the header and the rows agree although they are two statements.
_TAIL = """
SELECT m.seq, m.message_id, m.message::text AS message
  FROM vel_messages m
 WHERE m.session_id = $1 AND m.seq BETWEEN $2 AND $3
   AND EXISTS (SELECT 1 FROM vel_session_rows s WHERE s.id = $1 AND s.generation = $4)
 ORDER BY m.seq
"""
# Older rows on demand, only if the row still holds the history the Redis copy was loaded
# from ($4 generation, $5 revision, -1: not checked; $6 the caller's clock, ms).
_RANGE = f"""
SELECT m.seq, m.message_id, m.message::text AS message
  FROM vel_messages m
 WHERE m.session_id = $1 AND m.seq BETWEEN $2 AND $3
   AND EXISTS (SELECT 1 FROM vel_session_rows s
                WHERE s.id = $1 AND s.generation = $4 AND ($5 < 0 OR s.revision = $5)
                  AND (s.expires_at IS NULL OR s.expires_at > {_AT.format("$6::float8")}))
 ORDER BY m.seq
"""
# Give the tier lease back (the Redis copy is gone), unless a warm took it again since.
_RELEASE_EXPIRED = """
UPDATE vel_session_rows SET hot_until = NULL
 WHERE id = ANY($1::text[]) AND expires_at <= now()
"""
_RELEASE = "UPDATE vel_session_rows SET hot_until = NULL WHERE id = ANY($1::text[])"
_EXPIRED_LEASED = """
SELECT id FROM vel_session_rows
 WHERE expires_at <= now() AND hot_until > now() AND id > $2
 ORDER BY id
 LIMIT $1
"""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A session as Postgres holds it (what the two-tier store warms Redis from).

    Attributes:
        generation: bumped by every clear/replace.
        last_seq: seq of the newest message (0 for a cleared session).
        rows: ``(seq, message_id, message JSON text)``, oldest first, text as stored: the
            whole history (:meth:`PostgresStore.load_snapshot`) or its last rows
            (:meth:`PostgresStore.take_lease`); they hold seqs ``base + 1 .. last_seq``.
        created_ms, updated_ms, expires_ms: Unix times in milliseconds (``expires_ms`` None
            when the session never expires).
        revision: changes made outside the tier's flushes (DESIGN.md 3.8).
        lease_ms: milliseconds left on the tier lease when it was read (take_lease only).
    """

    generation: int
    last_seq: int
    rows: list[Row]
    created_ms: int
    updated_ms: int
    expires_ms: int | None
    revision: int = 0
    lease_ms: int | None = None

    @property
    def base(self) -> int:
        """The seq before the first row held (0: the whole history)."""
        return self.last_seq - len(self.rows)


class TierLease:
    """The lease calls of :class:`~vel.stores.postgres.PostgresStore` (documented there)."""

    def __init__(self, db: Connector) -> None:
        self._db = db

    async def load_snapshot(self, session_id: str) -> Snapshot | None:
        session_id = validate_session_id(session_id)
        records = await self._db.run("load_snapshot", lambda c: c.fetch(_SNAPSHOT, session_id))
        if not records:
            return None
        head = records[0]
        return Snapshot(
            generation=int(head["generation"]),
            last_seq=int(head["last_seq"]),
            rows=[
                (int(r["seq"]), r["message_id"], r["message"])
                for r in records
                if r["seq"] is not None
            ],
            created_ms=int(head["created_ms"]),
            updated_ms=int(head["updated_ms"]),
            expires_ms=None if head["expires_ms"] is None else int(head["expires_ms"]),
            revision=int(head["revision"]),
        )

    async def take_lease(self, session_id: str, window: int, lease: float, now_ms: int) -> Snapshot:
        session_id = validate_session_id(session_id)
        COUNT.check_int("window", window, InvalidInputError)

        async def op(conn: Conn) -> Snapshot:
            for _ in range(5):
                head = await conn.fetchrow(_TAKE_LEASE, session_id, lease, now_ms)
                assert head is not None
                if head["expired"]:
                    # Rare: started afresh in place, then read again (a new generation).
                    async with transaction(conn):
                        if await conn.fetchval(_RESTART_FOR_TIER, session_id, now_ms):
                            await conn.execute(_DELETE_MESSAGES, session_id)
                    continue
                last_seq, generation = int(head["last_seq"]), int(head["generation"])
                rows: list[Row] = []
                if last_seq and window:
                    first = max(1, last_seq - window + 1)
                    records = await conn.fetch(_TAIL, session_id, first, last_seq, generation)
                    if len(records) != last_seq - first + 1:
                        continue  # reset meanwhile (a clear flushed, an expired restart)
                    rows = [(int(r["seq"]), r["message_id"], r["message"]) for r in records]
                return Snapshot(
                    generation=generation,
                    last_seq=last_seq,
                    rows=rows,
                    created_ms=int(head["created_ms"]),
                    updated_ms=int(head["updated_ms"]),
                    expires_ms=None if head["expires_ms"] is None else int(head["expires_ms"]),
                    revision=int(head["revision"]),
                    lease_ms=int(head["lease_ms"]),
                )
            raise StoreError(
                f"session {session_id!r}: its Postgres rows do not match its last seq "
                "(changed by hand?)"
            )

        return await self._db.run("take_lease", op, statements=chunks(window) + 1)

    async def load_range(
        self,
        session_id: str,
        first: int,
        last: int,
        generation: int,
        revision: int | None,
        now_ms: int,
    ) -> list[Row] | None:
        session_id = validate_session_id(session_id)
        if last < first:
            return []
        size = last - first + 1

        async def op(conn: Conn) -> list[Row] | None:
            # One snapshot for every chunk; each statement stays bounded (statement_timeout).
            rows: list[Row] = []
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                for start in range(first, last + 1, INSERT_CHUNK):
                    end = min(last, start + INSERT_CHUNK - 1)
                    records = await conn.fetch(
                        _RANGE,
                        session_id,
                        start,
                        end,
                        generation,
                        -1 if revision is None else revision,
                        now_ms,
                    )
                    if len(records) != end - start + 1:
                        return None
                    rows += [(int(r["seq"]), r["message_id"], r["message"]) for r in records]
            return rows

        return await self._db.run("load_range", op, statements=chunks(size))

    async def release_expired(self, session_ids: Sequence[str]) -> None:
        ids = [validate_session_id(sid) for sid in session_ids]
        await self._db.run("release", lambda c: c.execute(_RELEASE_EXPIRED, ids))

    async def release(self, session_ids: Sequence[str]) -> None:
        ids = [validate_session_id(sid) for sid in session_ids]
        await self._db.run("release", lambda c: c.execute(_RELEASE, ids))

    async def expired_leased(self, limit: int, after: str) -> list[str]:
        rows = await self._db.run("expired", lambda c: c.fetch(_EXPIRED_LEASED, limit, after))
        return [r["id"] for r in rows]
