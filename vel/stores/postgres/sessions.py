"""Write-through session reads and writes (``session_storage='database'``): append, load,
pop, replace, clear, and the ``(generation, last_seq)`` read.

Every writer first takes the session row's lock (an upsert), which is what serialises
concurrent appends, replaces and clears of one session across processes (DESIGN.md 3.1,
atomic appends; 3.5, a clear or replace bumps the generation). Retention is counted from the
last write: an expired session is deleted before an append starts it afresh.
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from vel.bounds import limit_arg
from vel.errors import InvalidInputError, StoreError
from vel.messages import (
    Message,
    check_message_ids,
    decode_message,
    encode_messages,
    validate_session_id,
)
from vel.stores.postgres.connector import MESSAGE_ID_KEY, Conn, Connector, transaction

# Retention is passed as float8 seconds or NULL; now() + NULL * interval is NULL (never expires).

# One round trip: the upsert takes the session row lock (serialising concurrent appends), bumps
# last_seq by k and hands the new value to the insert, which numbers the batch last_seq-k+1 ..
# last_seq. An expired session matches the upsert's WHERE nowhere and returns no row: the caller
# then deletes it and retries, so it starts a fresh history. A session with last_seq = 0 (new or
# cleared) restarts created_at.
_APPEND_CTES = """
sess AS (
    INSERT INTO vel_sessions AS s (id, last_seq, expires_at)
    VALUES ($1, cardinality($2::text[]), now() + $4::float8 * interval '1 second')
    ON CONFLICT (id) DO UPDATE
       SET last_seq = s.last_seq + EXCLUDED.last_seq,
           updated_at = now(),
           expires_at = EXCLUDED.expires_at,
           created_at = CASE WHEN s.last_seq = 0 THEN now() ELSE s.created_at END
     WHERE s.expires_at IS NULL OR s.expires_at > now()
    RETURNING s.last_seq
), ins AS (
    INSERT INTO vel_messages (session_id, seq, message_id, message)
    SELECT $1, sess.last_seq - cardinality($2::text[]) + m.ord, m.message_id, m.message::jsonb
      FROM sess, unnest($2::text[], $3::text[]) WITH ORDINALITY AS m (message_id, message, ord)
)"""
_APPEND = f"WITH {_APPEND_CTES}\nSELECT last_seq FROM sess"
# A locked turn's commit: the append, and the release of its turn lock ($5 = the lock's token)
# in the same transaction, so the next holder's window read (vel_turn_begin) sees the turn.
# Only once the messages are stored: an expired session (no row from sess) keeps the lock for
# the retry. The lease row is UNLOGGED, so the release adds no WAL to the commit.
_APPEND_UNLOCK = f"""WITH {_APPEND_CTES}, unlock AS (
    DELETE FROM vel_locks
     WHERE session_id = $1 AND token = $5 AND EXISTS (SELECT 1 FROM sess)
)
SELECT last_seq FROM sess"""
_DELETE_EXPIRED = "DELETE FROM vel_sessions WHERE id = $1 AND expires_at <= now()"
_REPLAYED = """
SELECT count(*) AS found, coalesce(max(seq), 0) AS last_seq
  FROM vel_messages
 WHERE session_id = $1 AND message_id = ANY($2::text[])
"""
_LAST_SEQ = """
SELECT generation, last_seq
  FROM vel_sessions
 WHERE id = $1 AND (expires_at IS NULL OR expires_at > now())
"""
# The EXISTS is uncorrelated, so it runs once as a one-time filter; the window is a backward
# scan of the primary key that stops after $2 rows (LIMIT NULL = all).
_LOAD = """
SELECT m.message::text
  FROM vel_messages m
 WHERE m.session_id = $1
   AND EXISTS (SELECT 1 FROM vel_sessions s
                WHERE s.id = $1 AND s.last_seq > 0
                  AND (s.expires_at IS NULL OR s.expires_at > now()))
 ORDER BY m.seq DESC
 LIMIT $2::bigint
"""
_REPLACE_SESSION = """
INSERT INTO vel_sessions AS s (id, last_seq, expires_at)
VALUES ($1, $2::bigint, now() + $3::float8 * interval '1 second')
ON CONFLICT (id) DO UPDATE
   SET generation = s.generation + 1,
       last_seq = EXCLUDED.last_seq,
       updated_at = now(),
       expires_at = EXCLUDED.expires_at,
       created_at = CASE WHEN s.last_seq = 0 OR s.expires_at <= now()
                         THEN now() ELSE s.created_at END
"""
# Deletes run as statements of their own, after the row lock is held: a DELETE sharing a
# statement with the lock would use a snapshot from before the wait and miss rows committed
# meanwhile by the writer it waited for.
_DELETE_MESSAGES = "DELETE FROM vel_messages WHERE session_id = $1"
_INSERT_FROM_ONE = """
INSERT INTO vel_messages (session_id, seq, message_id, message)
SELECT $1, m.ord, m.message_id, m.message::jsonb
  FROM unnest($2::text[], $3::text[]) WITH ORDINALITY AS m (message_id, message, ord)
"""
# The row stays behind as a tombstone carrying the generation (purged an hour later).
_CLEAR_SESSION = """
UPDATE vel_sessions
   SET generation = generation + 1, last_seq = 0, updated_at = now()
 WHERE id = $1
RETURNING id
"""

# Pop, step one: take the row lock and claim the newest seq. The generation moves on, as with a
# clear or replace, so a Redis copy of this session made before the pop can no longer be
# flushed back over it (DESIGN.md 3.5 and 3.8).
_POP_SESSION = """
UPDATE vel_sessions
   SET last_seq = last_seq - 1,
       generation = generation + 1,
       updated_at = now(),
       expires_at = now() + $2::float8 * interval '1 second'
 WHERE id = $1 AND last_seq > 0 AND (expires_at IS NULL OR expires_at > now())
RETURNING last_seq + 1 AS seq
"""
# Step two, a statement of its own after the lock is held (see _DELETE_MESSAGES).
_POP_MESSAGE = """
DELETE FROM vel_messages
 WHERE session_id = $1 AND seq = $2
RETURNING message::text
"""


class Sessions:
    """The write-through reads and writes of :class:`~vel.stores.postgres.PostgresStore`
    (documented there); ``retention`` in seconds, None for never."""

    def __init__(self, db: Connector, retention: float | None) -> None:
        self._db = db
        self._retention = retention
        self._appends = 0
        self._deduplicated = 0

    def counters(self) -> dict[str, float]:
        return {
            "appends": float(self._appends),
            "append_retries_deduplicated": float(self._deduplicated),
        }

    async def append(
        self,
        session_id: str,
        messages: Sequence[Message],
        message_ids: Sequence[str] | None = None,
    ) -> int:
        seq, _ = await self.append_unlocking(session_id, messages, message_ids, None)
        return seq

    async def append_unlocking(
        self,
        session_id: str,
        messages: Sequence[Message],
        message_ids: Sequence[str] | None,
        token: str | None,
    ) -> tuple[int, bool]:
        """Append; with ``token``, release that turn lock in the same statement.

        Returns:
            The session's last seq, and whether the lock was released (not for an empty
            append or a replay, which store nothing: the caller releases then).
        """
        session_id = validate_session_id(session_id)
        encoded = encode_messages(messages)
        ids = check_message_ids(message_ids, len(encoded))
        if not encoded:
            current = await self._db.run("append", lambda c: c.fetchrow(_LAST_SEQ, session_id))
            return (0 if current is None else int(current["last_seq"])), False
        statement, args = (
            (_APPEND, (session_id, ids, encoded, self._retention))
            if token is None
            else (_APPEND_UNLOCK, (session_id, ids, encoded, self._retention, token))
        )

        async def op(conn: Conn) -> tuple[int, bool]:
            # A replay can race with a clear that deletes the rows it collided with; then the
            # append is simply new again and the next round stores it.
            for _ in range(3):
                try:
                    last = await conn.fetchval(statement, *args)
                    if last is None:
                        async with transaction(conn):
                            await conn.execute(_DELETE_EXPIRED, session_id)
                            last = await conn.fetchval(statement, *args)
                    if last is None:
                        raise StoreError(f"session {session_id!r}: append found no session row")
                    self._appends += 1
                    return int(last), token is not None
                except asyncpg.UniqueViolationError as exc:
                    if exc.constraint_name != MESSAGE_ID_KEY:
                        raise
                replayed = await conn.fetchrow(_REPLAYED, session_id, ids)
                assert replayed is not None
                found = int(replayed["found"])
                if found == len(ids):
                    self._deduplicated += 1
                    return int(replayed["last_seq"]), False
                if found:
                    raise InvalidInputError(
                        f"session {session_id!r}: {found} of {len(ids)} message_ids already "
                        "belong to other stored messages"
                    )
            raise StoreError(f"session {session_id!r}: append kept colliding with clears")

        return await self._db.run("append", op)

    async def load(self, session_id: str, limit: int | None = None) -> list[Message]:
        session_id = validate_session_id(session_id)
        limit = limit_arg(limit)
        if limit == 0:
            return []
        rows = await self._db.run("load", lambda c: c.fetch(_LOAD, session_id, limit))
        return [decode_message(row[0]) for row in reversed(rows)]

    async def replace(self, session_id: str, messages: Sequence[Message]) -> None:
        session_id = validate_session_id(session_id)
        encoded = encode_messages(messages)
        ids = check_message_ids(None, len(encoded))

        async def op(conn: Conn) -> None:
            async with transaction(conn):
                await conn.execute(_REPLACE_SESSION, session_id, len(encoded), self._retention)
                await conn.execute(_DELETE_MESSAGES, session_id)
                if encoded:
                    await conn.execute(_INSERT_FROM_ONE, session_id, ids, encoded)

        await self._db.run("replace", op)

    async def clear(self, session_id: str) -> None:
        session_id = validate_session_id(session_id)

        async def op(conn: Conn) -> None:
            async with transaction(conn):
                if await conn.fetchval(_CLEAR_SESSION, session_id) is not None:
                    await conn.execute(_DELETE_MESSAGES, session_id)

        await self._db.run("clear", op)

    async def pop(self, session_id: str) -> Message | None:
        session_id = validate_session_id(session_id)

        async def op(conn: Conn) -> str | None:
            async with transaction(conn):
                seq = await conn.fetchval(_POP_SESSION, session_id, self._retention)
                if seq is None:
                    return None
                text: str | None = await conn.fetchval(_POP_MESSAGE, session_id, seq)
                if text is None:
                    raise StoreError(f"session {session_id!r} has no message at seq {seq}")
                return text

        text = await self._db.run("pop", op)
        return None if text is None else decode_message(text)

    async def last_seq(self, session_id: str) -> tuple[int, int]:
        session_id = validate_session_id(session_id)
        row = await self._db.run("last_seq", lambda c: c.fetchrow(_LAST_SEQ, session_id))
        return (0, 0) if row is None else (int(row["generation"]), int(row["last_seq"]))
