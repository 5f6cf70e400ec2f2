"""Write-through session reads and writes (``session_storage='database'``): append, load,
pop, replace, clear, whole-file imports, and the ``(generation, last_seq)`` read.

Every writer first takes the session row's lock (an upsert), which is what serialises
concurrent appends, replaces and clears of one session across processes (DESIGN.md 3.1,
atomic appends; 3.5, a clear or replace bumps the generation). Retention is counted from the
last write: an expired session is started afresh, in place, before an append.

These writes do not go through the Redis tier, so each one honours the tier lease and bumps
the revision (DESIGN.md 3.8): a session whose ``hot_until`` lies ahead may have a copy in
Redis, and is refused with :class:`~vel.errors.TierLeaseError`; the revision tells a Redis copy
loaded before this write that Postgres changed behind it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from vel.bounds import limit_arg
from vel.errors import InvalidInputError, StoreError, TierLeaseError
from vel.messages import (
    Message,
    check_message_ids,
    decode_message,
    decode_texts,
    encode_messages,
    validate_session_id,
)
from vel.stores.postgres.connector import MESSAGE_ID_KEY, Conn, Connector, transaction
from vel.stores.postgres.handoff import CHANNEL
from vel.stores.postgres.sql import chunks, insert_rows

# Retention is passed as float8 seconds or NULL; now() + NULL * interval is NULL (never expires).

# A row the tier may hold ('redis' mode): not expired, and its tier lease still running (SQL
# over alias ``s`` of vel_session_rows; the turn locks ask it too).
LEASED = "(coalesce(s.hot_until > now(), false) AND coalesce(s.expires_at > now(), true))"

# One round trip: the upsert takes the session row lock (serialising concurrent appends), bumps
# last_seq by k and hands the new value to the insert, which numbers the batch last_seq-k+1 ..
# last_seq. An expired or leased session matches the upsert's WHERE nowhere and returns no
# row: the caller then finds out which (_STATE) and starts it afresh or refuses. A session with
# last_seq = 0 (new or cleared) restarts created_at.
_APPEND_CTES = f"""
sess AS (
    INSERT INTO vel_session_rows AS s (id, last_seq, expires_at)
    VALUES ($1, cardinality($2::text[]), now() + $4::float8 * interval '1 second')
    ON CONFLICT (id) DO UPDATE
       SET last_seq = s.last_seq + EXCLUDED.last_seq,
           updated_at = now(),
           expires_at = EXCLUDED.expires_at,
           revision = s.revision + 1,
           created_at = CASE WHEN s.last_seq = 0 THEN now() ELSE s.created_at END
     WHERE (s.expires_at IS NULL OR s.expires_at > now()) AND NOT {LEASED}
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
# the retry. The lease row is UNLOGGED, so the release adds no WAL to the commit. A lease some
# turn waits for is released with a NOTIFY on vel_turn_lock (migration 0008; handoff.py).
_APPEND_UNLOCK = f"""WITH {_APPEND_CTES}, unlock AS (
    UPDATE vel_locks SET expires_at = '-infinity'
     WHERE session_id = $1 AND token = $5 AND EXISTS (SELECT 1 FROM sess)
    RETURNING waited
)
SELECT last_seq,
       (SELECT CASE WHEN u.waited THEN pg_notify('{CHANNEL}', $1)::text END FROM unlock u)
  FROM sess"""
# Why a writer found no row to update: the row, locked, with its lease and expiry.
_STATE = f"""
SELECT s.hot_until, coalesce(s.expires_at <= now(), false) AS expired, {LEASED} AS leased,
       s.last_seq
  FROM vel_session_rows s
 WHERE s.id = $1
   FOR UPDATE
"""
# An expired session starts afresh in place: its row keeps counting generations and
# revisions, so a flush or warm of the old history can never be mistaken for the new one.
_RESTART_EXPIRED = """
UPDATE vel_session_rows
   SET last_seq = 0, generation = generation + 1, revision = revision + 1,
       created_at = now(), updated_at = now(), expires_at = NULL, hot_until = NULL
 WHERE id = $1 AND expires_at <= now()
RETURNING id
"""
_REPLAYED = """
SELECT count(*) AS found, coalesce(max(seq), 0) AS last_seq
  FROM vel_messages
 WHERE session_id = $1 AND message_id = ANY($2::text[])
"""
_LAST_SEQ = """
SELECT generation, last_seq
  FROM vel_session_rows
 WHERE id = $1 AND (expires_at IS NULL OR expires_at > now())
"""
# The EXISTS is uncorrelated, so it runs once as a one-time filter; the window is a backward
# scan of the primary key that stops after $2 rows (LIMIT NULL = all).
_LOAD = """
SELECT m.message::text
  FROM vel_messages m
 WHERE m.session_id = $1
   AND EXISTS (SELECT 1 FROM vel_session_rows s
                WHERE s.id = $1 AND s.last_seq > 0
                  AND (s.expires_at IS NULL OR s.expires_at > now()))
 ORDER BY m.seq DESC
 LIMIT $2::bigint
"""
_REPLACE_SESSION = f"""
INSERT INTO vel_session_rows AS s (id, last_seq, expires_at)
VALUES ($1, $2::bigint, now() + $3::float8 * interval '1 second')
ON CONFLICT (id) DO UPDATE
   SET generation = s.generation + 1,
       revision = s.revision + 1,
       last_seq = EXCLUDED.last_seq,
       updated_at = now(),
       expires_at = EXCLUDED.expires_at,
       created_at = CASE WHEN s.last_seq = 0 OR s.expires_at <= now()
                         THEN now() ELSE s.created_at END
 WHERE NOT {LEASED}
RETURNING id
"""
# Deletes run as statements of their own, after the row lock is held: a DELETE sharing a
# statement with the lock would use a snapshot from before the wait and miss rows committed
# meanwhile by the writer it waited for.
_DELETE_MESSAGES = "DELETE FROM vel_messages WHERE session_id = $1"
# The row stays behind as a tombstone carrying the generation (purged an hour later).
_CLEAR_SESSION = f"""
UPDATE vel_session_rows s
   SET generation = generation + 1, revision = revision + 1, last_seq = 0, updated_at = now()
 WHERE s.id = $1 AND NOT {LEASED}
RETURNING id
"""
# What an import keeps from the file besides the messages.
_IMPORTED_DETAILS = """
UPDATE vel_session_rows
   SET metadata = coalesce($2::jsonb, metadata), created_at = LEAST(created_at, $3),
       owner = coalesce($4, owner)
 WHERE id = $1
"""


@dataclass(frozen=True, slots=True)
class ImportEntry:
    """One session of an import: its history (JSON texts and ids) and details."""

    session_id: str
    texts: list[str]
    message_ids: list[str]
    metadata_json: str | None = None
    created_at: datetime | None = None
    owner: str | None = None


@dataclass(frozen=True, slots=True)
class ImportCounts:
    imported: int
    replaced: int
    skipped: int
    messages: int


async def refuse_if_leased(conn: Conn, session_id: str) -> None:
    """Raise TierLeaseError if the tier holds ``session_id`` (locks its row)."""
    state = await conn.fetchrow(_STATE, session_id)
    if state is not None and state["leased"]:
        raise TierLeaseError(session_id, state["hot_until"])


# Pop, step one: take the row lock and claim the newest seq. The generation moves on, as with a
# clear or replace, so a Redis copy of this session made before the pop can no longer be
# flushed back over it (DESIGN.md 3.5 and 3.8).
_POP_SESSION = f"""
UPDATE vel_session_rows AS s
   SET last_seq = last_seq - 1,
       generation = generation + 1,
       revision = revision + 1,
       updated_at = now(),
       expires_at = now() + $2::float8 * interval '1 second'
 WHERE id = $1 AND last_seq > 0 AND (expires_at IS NULL OR expires_at > now()) AND NOT {LEASED}
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
                            state = await conn.fetchrow(_STATE, session_id)
                            if state is not None and state["leased"]:
                                raise TierLeaseError(session_id, state["hot_until"])
                            if state is not None and state["expired"]:
                                await conn.execute(_DELETE_MESSAGES, session_id)
                                await conn.execute(_RESTART_EXPIRED, session_id)
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
        return decode_texts(row[0] for row in reversed(rows))

    async def replace(
        self,
        session_id: str,
        messages: Sequence[Message],
        message_ids: Sequence[str] | None = None,
    ) -> None:
        session_id = validate_session_id(session_id)
        encoded = encode_messages(messages, whole_history=True)
        ids = check_message_ids(message_ids, len(encoded))

        async def op(conn: Conn) -> None:
            async with transaction(conn):
                await self._replace_locked(conn, session_id, ids, encoded)

        await self._db.run("replace", op, statements=chunks(len(encoded)))

    async def _replace_locked(
        self, conn: Conn, session_id: str, ids: list[str], texts: list[str]
    ) -> None:
        done = await conn.fetchval(_REPLACE_SESSION, session_id, len(texts), self._retention)
        if done is None:
            await refuse_if_leased(conn, session_id)
            raise StoreError(f"session {session_id!r}: replace found no session row")
        await conn.execute(_DELETE_MESSAGES, session_id)
        await insert_rows(conn, session_id, ids, texts)

    async def clear(self, session_id: str) -> None:
        session_id = validate_session_id(session_id)

        async def op(conn: Conn) -> None:
            async with transaction(conn):
                if await conn.fetchval(_CLEAR_SESSION, session_id) is not None:
                    await conn.execute(_DELETE_MESSAGES, session_id)
                else:
                    await refuse_if_leased(conn, session_id)

        await self._db.run("clear", op)

    async def import_sessions(
        self, entries: Sequence[ImportEntry], *, replace: bool
    ) -> ImportCounts:
        """Write every entry or none, in one transaction (see PostgresStore.import_sessions)."""
        seen: set[str] = set()
        for entry in entries:
            if entry.session_id in seen:
                raise InvalidInputError(f"session {entry.session_id!r} is listed twice")
            seen.add(entry.session_id)

        async def op(conn: Conn) -> ImportCounts:
            imported = replaced = skipped = written = 0
            async with transaction(conn):
                # In id order, so two imports of overlapping files cannot deadlock.
                for entry in sorted(entries, key=lambda e: e.session_id):
                    sid = entry.session_id
                    state = await conn.fetchrow(_STATE, sid)
                    if state is not None and state["leased"]:
                        raise TierLeaseError(sid, state["hot_until"])
                    exists = state is not None and state["last_seq"] > 0 and not state["expired"]
                    if exists and not replace:
                        skipped += 1
                        continue
                    if not exists and not entry.texts:
                        continue
                    await self._replace_locked(conn, sid, entry.message_ids, entry.texts)
                    if (
                        entry.metadata_json is not None
                        or entry.created_at is not None
                        or entry.owner is not None
                    ):
                        await conn.execute(
                            _IMPORTED_DETAILS,
                            sid,
                            entry.metadata_json,
                            entry.created_at,
                            entry.owner,
                        )
                    replaced += exists
                    imported += not exists
                    written += len(entry.texts)
            return ImportCounts(imported, replaced, skipped, written)

        total = sum(chunks(len(e.texts)) + 2 for e in entries)
        return await self._db.run("import", op, statements=total)

    async def pop(self, session_id: str) -> Message | None:
        session_id = validate_session_id(session_id)

        async def op(conn: Conn) -> str | None:
            async with transaction(conn):
                seq = await conn.fetchval(_POP_SESSION, session_id, self._retention)
                if seq is None:
                    await refuse_if_leased(conn, session_id)
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
