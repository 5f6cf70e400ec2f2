"""The durable tier of the two-tier store: what the flusher writes and the warm reads.

:meth:`Sink.apply_flushes` applies batches copied from Redis idempotently (keyed by
``(session_id, seq)``, verified by message id; DESIGN.md 3.3), :meth:`Sink.apply_clear`
records a clear, and :meth:`Sink.load_snapshot` reads a whole session in one consistent
statement for the warm (3.4). The generation sync (:meth:`Sink._sync_generations`) is where a
flush that began before a clear or replace is recognised as stale and never writes the old
messages back (3.5).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import asyncpg

from vel import failpoints
from vel.bounds import COUNTER
from vel.errors import FlushConflictError, InvalidInputError
from vel.messages import check_message_ids, validate_session_id
from vel.stores.postgres.connector import MESSAGE_ID_KEY, Conn, Connector, transaction

# One statement, hence one snapshot: the header and the rows always agree.
_SNAPSHOT = """
SELECT s.generation, s.last_seq,
       floor(extract(epoch FROM s.created_at) * 1000)::bigint AS created_ms,
       floor(extract(epoch FROM s.updated_at) * 1000)::bigint AS updated_ms,
       floor(extract(epoch FROM s.expires_at) * 1000)::bigint AS expires_ms,
       m.seq, m.message_id, m.message::text AS message
  FROM vel_sessions s
  LEFT JOIN vel_messages m ON m.session_id = s.id
 WHERE s.id = $1 AND (s.expires_at IS NULL OR s.expires_at > now())
 ORDER BY m.seq
"""
# Creates the rows (with the caller's generations) or locks the existing ones, in id order so
# that concurrent flushers of overlapping batches cannot deadlock. The no-op SET is what makes
# ON CONFLICT lock and return the newest version of each row.
_LOCK_SESSIONS = """
INSERT INTO vel_sessions AS s (id, generation, expires_at)
SELECT u.id, u.generation, now() + $3::float8 * interval '1 second'
  FROM unnest($1::text[], $2::bigint[]) AS u (id, generation)
 ORDER BY u.id
ON CONFLICT (id) DO UPDATE SET last_seq = s.last_seq
RETURNING s.id, s.generation, coalesce(s.expires_at <= now(), false) AS expired
"""
# Runs with the row locks held, so its snapshot already holds every message of the sessions.
_RESET_SESSIONS = """
WITH target AS (
    SELECT u.id, u.generation FROM unnest($1::text[], $2::bigint[]) AS u (id, generation)
), gone AS (
    DELETE FROM vel_messages WHERE session_id = ANY($1::text[])
)
UPDATE vel_sessions s
   SET generation = t.generation,
       last_seq = 0,
       updated_at = now(),
       created_at = CASE WHEN s.expires_at <= now() THEN now() ELSE s.created_at END,
       expires_at = now() + $3::float8 * interval '1 second'
  FROM target t
 WHERE s.id = t.id
"""
# Also with the row locks held: sessions Redis brought to a newer generation by pops only keep
# their messages up to the kept seq and take that generation (see vel.stores.redis.scripts).
_TRUNCATE_SESSIONS = """
WITH target AS (
    SELECT u.id, u.generation, u.keep
      FROM unnest($1::text[], $2::bigint[], $3::bigint[]) AS u (id, generation, keep)
), gone AS (
    DELETE FROM vel_messages m USING target t WHERE m.session_id = t.id AND m.seq > t.keep
)
UPDATE vel_sessions s
   SET generation = t.generation,
       last_seq = least(s.last_seq, t.keep),
       updated_at = now(),
       expires_at = now() + $4::float8 * interval '1 second'
  FROM target t
 WHERE s.id = t.id
"""
# With the row locks held, "clash" sees exactly the rows that existed before this batch: a seq
# already stored under another message id means the two tiers' histories diverged. A message
# id already stored under another seq fails the insert itself (unique violation). $5 lists
# every session of the batch, rows or not, so each gets updated_at and one result row.
_FLUSH = """
WITH batch AS (
    SELECT b.session_id, b.seq, b.message_id, b.message
      FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[])
           AS b (session_id, seq, message_id, message)
), ins AS (
    INSERT INTO vel_messages (session_id, seq, message_id, message)
    SELECT session_id, seq, message_id, message::jsonb FROM batch
    ON CONFLICT (session_id, seq) DO NOTHING
    RETURNING session_id
), clash AS (
    SELECT b.session_id, b.seq
      FROM batch b
      JOIN vel_messages m ON m.session_id = b.session_id AND m.seq = b.seq
     WHERE m.message_id <> b.message_id
), upd AS (
    UPDATE vel_sessions s
       SET last_seq = greatest(s.last_seq, t.max_seq),
           updated_at = now(),
           expires_at = now() + $6::float8 * interval '1 second'
      FROM (SELECT k.id, max(b.seq) AS max_seq
              FROM unnest($5::text[]) AS k (id)
              LEFT JOIN batch b ON b.session_id = k.id
             GROUP BY k.id) t
     WHERE s.id = t.id
)
SELECT k.id AS session_id, coalesce(i.n, 0) AS inserted, c.seqs AS clashes
  FROM unnest($5::text[]) AS k (id)
  LEFT JOIN (SELECT session_id, count(*) AS n FROM ins GROUP BY session_id) i
         ON i.session_id = k.id
  LEFT JOIN (SELECT session_id, array_agg(seq ORDER BY seq) AS seqs FROM clash
              GROUP BY session_id) c
         ON c.session_id = k.id
"""
# After a unique violation on the message id: which of our ids sit at another seq.
_MISPLACED_IDS = """
SELECT m.session_id, m.seq
  FROM unnest($1::text[], $2::bigint[], $3::text[]) AS b (session_id, seq, message_id)
  JOIN vel_messages m ON m.session_id = b.session_id AND m.message_id = b.message_id
 WHERE m.seq <> b.seq
 ORDER BY m.session_id, m.seq
"""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A session as Postgres holds it (what the two-tier store warms Redis from).

    Attributes:
        generation: bumped by every clear/replace.
        last_seq: seq of the newest message (0 for a cleared session).
        rows: ``(seq, message_id, message JSON text)``, oldest first, text as stored.
        created_ms, updated_ms, expires_ms: Unix times in milliseconds (``expires_ms`` None
            when the session never expires).
    """

    generation: int
    last_seq: int
    rows: list[tuple[int, str, str]]
    created_ms: int
    updated_ms: int
    expires_ms: int | None


@dataclass(frozen=True, slots=True)
class FlushResult:
    """Outcome of :meth:`PostgresStore.apply_flush`.

    Attributes:
        inserted: rows newly written.
        duplicates: rows already present with the same message id (a replayed batch).
        stale: the batch belonged to an older generation and was ignored.
    """

    inserted: int
    duplicates: int
    stale: bool = False


class Sink:
    """The durable-tier calls of :class:`~vel.stores.postgres.PostgresStore` (documented
    there); ``retention`` in seconds, None for never."""

    def __init__(self, db: Connector, retention: float | None) -> None:
        self._db = db
        self._retention = retention
        self._flushes = 0
        self._flush_duplicates = 0
        self._flush_stale = 0

    def counters(self) -> dict[str, float]:
        return {
            "flushes": float(self._flushes),
            "flush_duplicates": float(self._flush_duplicates),
            "flush_stale": float(self._flush_stale),
        }

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
        )

    async def apply_flushes(
        self,
        batches: Sequence[tuple[str, int, Sequence[tuple[int, str, str]]]],
        truncations: Mapping[str, tuple[int, int]] | None = None,
    ) -> list[FlushResult]:
        generations: dict[str, int] = {}
        flat_sids: list[str] = []
        flat_seqs: list[int] = []
        flat_ids: list[str] = []
        flat_texts: list[str] = []
        for session_id, generation, rows in batches:
            session_id = validate_session_id(session_id)
            if session_id in generations:
                raise InvalidInputError(f"session {session_id!r} appears twice in one flush")
            generations[session_id] = COUNTER.check_int("generation", generation, InvalidInputError)
            seqs = [row[0] for row in rows]
            for seq in seqs:
                if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
                    raise InvalidInputError(f"flush row seq must be a positive int, got {seq!r}")
            if len(set(seqs)) != len(seqs):
                raise InvalidInputError(f"session {session_id!r}: flush rows repeat a seq")
            texts = [row[2] for row in rows]
            if not all(isinstance(text, str) for text in texts):
                raise InvalidInputError("flush row messages must be JSON text")
            flat_ids += check_message_ids([row[1] for row in rows], len(rows))
            flat_sids += [session_id] * len(rows)
            flat_seqs += seqs
            flat_texts += texts
        if not generations:
            return []
        cuts: dict[str, tuple[int, int]] = {}
        for session_id, (from_generation, keep) in (truncations or {}).items():
            if session_id not in generations:
                raise InvalidInputError(f"truncation of {session_id!r}, which has no batch")
            COUNTER.check_int("keep", keep, InvalidInputError)
            from_generation = COUNTER.check_int("generation", from_generation, InvalidInputError)
            if not from_generation < generations[session_id]:
                raise InvalidInputError(
                    f"session {session_id!r}: a truncation must start below its generation"
                )
            cuts[session_id] = (from_generation, keep)

        async def op(conn: Conn) -> dict[str, FlushResult]:
            results: dict[str, FlushResult] = {}
            try:
                async with transaction(conn):
                    stale = await self._sync_generations(conn, generations, cuts)
                    results = {sid: FlushResult(0, 0, stale=True) for sid in stale}
                    keep = [i for i, sid in enumerate(flat_sids) if sid not in stale]
                    live = [sid for sid in generations if sid not in stale]
                    if not live:
                        return results
                    outcome = await conn.fetch(
                        _FLUSH,
                        [flat_sids[i] for i in keep],
                        [flat_seqs[i] for i in keep],
                        [flat_ids[i] for i in keep],
                        [flat_texts[i] for i in keep],
                        live,
                        self._retention,
                    )
                    for row in outcome:
                        if row["clashes"]:
                            raise FlushConflictError(row["session_id"], row["clashes"])
                    await failpoints.hit("flush_mid_transaction")
            except asyncpg.UniqueViolationError as exc:
                if exc.constraint_name != MESSAGE_ID_KEY:
                    raise
                # Looked up after the rollback: the failed transaction accepts no queries.
                misplaced = await conn.fetch(_MISPLACED_IDS, flat_sids, flat_seqs, flat_ids)
                first = misplaced[0]["session_id"] if misplaced else flat_sids[0]
                seqs = [r["seq"] for r in misplaced if r["session_id"] == first]
                raise FlushConflictError(first, seqs) from exc
            sizes = {sid: 0 for sid in live}
            for sid in flat_sids:
                if sid in sizes:
                    sizes[sid] += 1
            for row in outcome:
                sid, inserted = row["session_id"], int(row["inserted"])
                results[sid] = FlushResult(inserted=inserted, duplicates=sizes[sid] - inserted)
            return results

        by_session = await self._db.run("apply_flush", op)
        results = [by_session[sid] for sid in generations]
        self._flushes += 1
        self._flush_duplicates += sum(r.duplicates for r in results)
        self._flush_stale += sum(r.stale for r in results)
        return results

    async def apply_clear(self, session_id: str, generation: int) -> None:
        wanted = {
            validate_session_id(session_id): COUNTER.check_int(
                "generation", generation, InvalidInputError
            )
        }

        async def op(conn: Conn) -> None:
            async with transaction(conn):
                await self._sync_generations(conn, wanted)

        await self._db.run("apply_clear", op)

    async def _sync_generations(
        self,
        conn: Conn,
        wanted: dict[str, int],
        cuts: Mapping[str, tuple[int, int]] | None = None,
    ) -> set[str]:
        """Lock (creating if need be) the sessions' rows and bring them to ``wanted``.

        Rows of an older generation, or expired ones (which count as absent), lose their
        messages and take the wanted generation, except where ``cuts`` gives
        ``(from_generation, keep)`` and the row's generation is at least ``from_generation``:
        those lose only the messages above seq ``keep``. Returns the sessions for which
        Postgres already holds a newer generation.
        """
        ids = sorted(wanted)
        rows = await conn.fetch(_LOCK_SESSIONS, ids, [wanted[sid] for sid in ids], self._retention)
        stale: set[str] = set()
        reset: list[str] = []
        truncate: list[str] = []
        for row in rows:
            sid, stored = row["id"], row["generation"]
            cut = (cuts or {}).get(sid)
            if row["expired"]:
                reset.append(sid)
            elif stored < wanted[sid] and cut is not None and stored >= cut[0]:
                truncate.append(sid)
            elif stored < wanted[sid]:
                reset.append(sid)
            elif stored > wanted[sid]:
                stale.add(sid)
        if reset:
            await conn.execute(
                _RESET_SESSIONS, reset, [wanted[sid] for sid in reset], self._retention
            )
        if truncate:
            assert cuts is not None
            await conn.execute(
                _TRUNCATE_SESSIONS,
                truncate,
                [wanted[sid] for sid in truncate],
                [cuts[sid][1] for sid in truncate],
                self._retention,
            )
        return stale
