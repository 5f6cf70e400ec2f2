"""The flusher's side of the durable tier: what it writes to Postgres.

:meth:`Sink.apply_flushes` applies batches copied from Redis idempotently (keyed by
``(session_id, seq)``, verified by message id; DESIGN.md 3.3) and only onto the Postgres history
the Redis copy was built from: the generation sync (:meth:`Sink._lock_for_flush`) is where a
flush that began before a clear or replace is recognised as stale (3.5), and where a history
changed behind the tier (another revision, a deleted row) turns the flush into a conflict that
is never counted as flushed (3.8). Each applied flush extends the session's tier lease and
carries the time of the writes it copies, so retention counts from the write, not the flush
(3.9). What a flush carries and gets back is in :mod:`vel.stores.postgres.flushes`; the warm's
reads are in :mod:`vel.stores.postgres.lease`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import asyncpg

from vel import failpoints
from vel.bounds import COUNTER
from vel.errors import FlushConflictError, InvalidInputError
from vel.messages import check_message_ids, validate_session_id
from vel.stores.postgres.connector import MESSAGE_ID_KEY, Conn, Connector, transaction
from vel.stores.postgres.flushes import CHANGED, DELETED, FlushBatch, FlushResult, as_batch
from vel.stores.postgres.sql import AT as _AT
from vel.stores.postgres.sql import MS as _MS
from vel.stores.postgres.sql import Row

# Lock the rows of a flush, in id order so that concurrent flushers cannot deadlock; each
# row's expiry is judged at the time of the writes being flushed ($2, ms).
_LOCK_SESSIONS = f"""
SELECT s.id, s.generation, s.revision,
       coalesce(s.expires_at <= {_AT.format("u.written_ms")}, false) AS expired
  FROM vel_session_rows s
  JOIN unnest($1::text[], $2::float8[]) AS u (id, written_ms) ON u.id = s.id
 ORDER BY s.id
   FOR UPDATE OF s
"""
# Rows a flush may create: sessions whose Redis copy never had Postgres data.
_CREATE_SESSIONS = """
INSERT INTO vel_session_rows (id, generation)
SELECT u.id, u.generation FROM unnest($1::text[], $2::bigint[]) AS u (id, generation)
 ORDER BY u.id
ON CONFLICT (id) DO NOTHING
"""
# Runs with the row locks held, so its snapshot already holds every message of the sessions.
# $3: which rows restart (expired: created_at restarts too); $4: when each session was last
# written (ms): the write, not this flush, is when the session was updated (a flush carrying
# several sessions would otherwise give them one time, and listings no order).
_RESET_SESSIONS = f"""
WITH target AS (
    SELECT u.id, u.generation, u.restart, {_AT.format("u.written_ms")} AS written
      FROM unnest($1::text[], $2::bigint[], $3::bool[], $4::float8[])
           AS u (id, generation, restart, written_ms)
), gone AS (
    DELETE FROM vel_messages WHERE session_id = ANY($1::text[])
)
UPDATE vel_session_rows s
   SET generation = t.generation,
       last_seq = 0,
       updated_at = t.written,
       created_at = CASE WHEN t.restart THEN t.written ELSE s.created_at END
  FROM target t
 WHERE s.id = t.id
"""
# Also with the row locks held: sessions Redis brought to a newer generation by pops only keep
# their messages up to the kept seq and take that generation (see vel.stores.redis.scripts).
# $5: when each session was last written (ms), as in _RESET_SESSIONS; retention counts from
# it (DESIGN.md 3.9).
_TRUNCATE_SESSIONS = f"""
WITH target AS (
    SELECT u.id, u.generation, u.keep, {_AT.format("u.written_ms")} AS written
      FROM unnest($1::text[], $2::bigint[], $3::bigint[], $5::float8[])
           AS u (id, generation, keep, written_ms)
), gone AS (
    DELETE FROM vel_messages m USING target t WHERE m.session_id = t.id AND m.seq > t.keep
)
UPDATE vel_session_rows s
   SET generation = t.generation,
       last_seq = least(s.last_seq, t.keep),
       updated_at = t.written,
       expires_at = t.written + $4::float8 * interval '1 second'
  FROM target t
 WHERE s.id = t.id
"""
# With the row locks held, "clash" sees exactly the rows that existed before this batch: a seq
# already stored under another message id means the two tiers' histories diverged. A message
# id already stored under another seq fails the insert itself (unique violation). $5 lists
# every session of the batch, rows or not, so each gets one result row; $6 retention seconds,
# $7 lease seconds (NULL: no lease), $8 when each session was last written (ms, NULL: now).
_FLUSH = f"""
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
    UPDATE vel_session_rows s
       SET last_seq = greatest(s.last_seq, t.max_seq),
           updated_at = greatest(s.updated_at, t.written),
           expires_at = t.written + $6::float8 * interval '1 second',
           hot_until = CASE WHEN $7::float8 IS NULL THEN s.hot_until
                            ELSE greatest(coalesce(s.hot_until, now()),
                                          now() + $7::float8 * interval '1 second') END
      FROM (SELECT k.id, {_AT.format("k.written_ms")} AS written, max(b.seq) AS max_seq
              FROM unnest($5::text[], $8::float8[]) AS k (id, written_ms)
              LEFT JOIN batch b ON b.session_id = k.id
             GROUP BY k.id, k.written_ms) t
     WHERE s.id = t.id
    RETURNING s.id, {_MS.format("s.hot_until - now()")} AS lease_ms
)
SELECT k.id AS session_id, coalesce(i.n, 0) AS inserted, c.seqs AS clashes, u.lease_ms
  FROM unnest($5::text[]) AS k (id)
  LEFT JOIN (SELECT session_id, count(*) AS n FROM ins GROUP BY session_id) i
         ON i.session_id = k.id
  LEFT JOIN (SELECT session_id, array_agg(seq ORDER BY seq) AS seqs FROM clash
              GROUP BY session_id) c
         ON c.session_id = k.id
  LEFT JOIN upd u ON u.id = k.id
"""
# After a unique violation on the message id: which of our ids sit at another seq.
_MISPLACED_IDS = """
SELECT m.session_id, m.seq
  FROM unnest($1::text[], $2::bigint[], $3::text[]) AS b (session_id, seq, message_id)
  JOIN vel_messages m ON m.session_id = b.session_id AND m.message_id = b.message_id
 WHERE m.seq <> b.seq
 ORDER BY m.session_id, m.seq
"""


class Sink:
    """The durable-tier calls of :class:`~vel.stores.postgres.PostgresStore` (documented
    there); ``retention`` in seconds, None for never."""

    def __init__(self, db: Connector, retention: float | None) -> None:
        self._db = db
        self._retention = retention
        self._flushes = 0
        self._flush_duplicates = 0
        self._flush_stale = 0
        self._flush_conflicts = 0

    def counters(self) -> dict[str, float]:
        return {
            "flushes": float(self._flushes),
            "flush_duplicates": float(self._flush_duplicates),
            "flush_stale": float(self._flush_stale),
            "flush_conflicted": float(self._flush_conflicts),
        }

    # -- flushes -------------------------------------------------------------------------------

    async def apply_flushes(
        self,
        batches: Sequence[FlushBatch | tuple[str, int, Sequence[Row]]],
        truncations: Mapping[str, tuple[int, int]] | None = None,
        lease: float | None = None,
    ) -> list[FlushResult]:
        work = [as_batch(b) for b in batches]
        by_sid: dict[str, FlushBatch] = {}
        flat_sids: list[str] = []
        flat_seqs: list[int] = []
        flat_ids: list[str] = []
        flat_texts: list[str] = []
        for batch in work:
            session_id = validate_session_id(batch.session_id)
            if session_id in by_sid:
                raise InvalidInputError(f"session {session_id!r} appears twice in one flush")
            COUNTER.check_int("generation", batch.generation, InvalidInputError)
            by_sid[session_id] = batch
            seqs = [row[0] for row in batch.rows]
            for seq in seqs:
                if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
                    raise InvalidInputError(f"flush row seq must be a positive int, got {seq!r}")
            if len(set(seqs)) != len(seqs):
                raise InvalidInputError(f"session {session_id!r}: flush rows repeat a seq")
            texts = [row[2] for row in batch.rows]
            if not all(isinstance(text, str) for text in texts):
                raise InvalidInputError("flush row messages must be JSON text")
            flat_ids += check_message_ids([row[1] for row in batch.rows], len(batch.rows))
            flat_sids += [session_id] * len(batch.rows)
            flat_seqs += seqs
            flat_texts += texts
        if not by_sid:
            return []
        cuts: dict[str, tuple[int, int]] = {}
        wanted = {sid: b.truncate for sid, b in by_sid.items() if b.truncate is not None}
        for session_id, (from_generation, keep) in {**wanted, **(truncations or {})}.items():
            if session_id not in by_sid:
                raise InvalidInputError(f"truncation of {session_id!r}, which has no batch")
            COUNTER.check_int("keep", keep, InvalidInputError)
            from_generation = COUNTER.check_int("generation", from_generation, InvalidInputError)
            if not from_generation < by_sid[session_id].generation:
                raise InvalidInputError(
                    f"session {session_id!r}: a truncation must start below its generation"
                )
            cuts[session_id] = (from_generation, keep)

        async def op(conn: Conn) -> dict[str, FlushResult]:
            results: dict[str, FlushResult] = {}
            try:
                async with transaction(conn):
                    results = await self._lock_for_flush(conn, by_sid, cuts)
                    keep = [i for i, sid in enumerate(flat_sids) if sid not in results]
                    live = [sid for sid in by_sid if sid not in results]
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
                        lease,
                        [by_sid[sid].written_ms for sid in live],
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
                lease_ms = None if lease is None else row["lease_ms"]
                results[sid] = FlushResult(
                    inserted=inserted,
                    duplicates=sizes[sid] - inserted,
                    lease_ms=None if lease_ms is None else int(lease_ms),
                )
            return results

        by_session = await self._db.run("apply_flush", op)
        results = [by_session[sid] for sid in by_sid]
        self._flushes += 1
        self._flush_duplicates += sum(r.duplicates for r in results)
        self._flush_stale += sum(r.stale and r.conflict is None for r in results)
        self._flush_conflicts += sum(r.conflict is not None for r in results)
        return results

    async def apply_clear(self, session_id: str, generation: int) -> None:
        batch = FlushBatch(
            validate_session_id(session_id),
            COUNTER.check_int("generation", generation, InvalidInputError),
            [],
        )

        async def op(conn: Conn) -> None:
            async with transaction(conn):
                await self._lock_for_flush(conn, {batch.session_id: batch}, {})

        await self._db.run("apply_clear", op)

    async def _lock_for_flush(
        self,
        conn: Conn,
        batches: dict[str, FlushBatch],
        cuts: Mapping[str, tuple[int, int]],
    ) -> dict[str, FlushResult]:
        """Lock (creating if allowed) the sessions' rows and bring them to the batches'
        generations.

        Rows of an older generation, or expired as of the flushed writes (which count as
        absent), lose their messages and take the batch's generation, except where ``cuts``
        gives ``(from_generation, keep)`` and the row's generation is at least
        ``from_generation``: those lose only the messages above seq ``keep``. Returns the
        sessions that must not be written: Postgres holds a newer generation (stale), or the
        history the Redis copy was built from is not there any more (conflict).
        """
        ids = sorted(batches)
        written = [batches[sid].written_ms for sid in ids]
        rows = {r["id"]: r for r in await conn.fetch(_LOCK_SESSIONS, ids, written)}
        missing = [sid for sid in ids if sid not in rows]
        refused: dict[str, FlushResult] = {}
        creatable = [sid for sid in missing if not batches[sid].had_postgres_rows]
        for sid in missing:
            if batches[sid].had_postgres_rows:
                refused[sid] = FlushResult(0, 0, stale=True, conflict=DELETED)
        if creatable:
            await conn.execute(
                _CREATE_SESSIONS, creatable, [batches[sid].generation for sid in creatable]
            )
            for r in await conn.fetch(
                _LOCK_SESSIONS, creatable, [batches[sid].written_ms for sid in creatable]
            ):
                rows[r["id"]] = r
        reset: list[str] = []
        restart: list[bool] = []
        truncate: list[str] = []
        for sid, row in rows.items():
            batch = batches[sid]
            stored = int(row["generation"])
            cut = cuts.get(sid)
            if row["expired"]:
                reset.append(sid)
                restart.append(True)
            elif batch.revision is not None and int(row["revision"]) != batch.revision:
                refused[sid] = FlushResult(0, 0, stale=True, conflict=CHANGED)
            elif stored < batch.generation and cut is not None and stored >= cut[0]:
                truncate.append(sid)
            elif stored < batch.generation:
                reset.append(sid)
                restart.append(False)
            elif stored > batch.generation:
                refused[sid] = FlushResult(0, 0, stale=True)
        if reset:
            await conn.execute(
                _RESET_SESSIONS,
                reset,
                [batches[sid].generation for sid in reset],
                restart,
                [batches[sid].written_ms for sid in reset],
            )
        if truncate:
            await conn.execute(
                _TRUNCATE_SESSIONS,
                truncate,
                [batches[sid].generation for sid in truncate],
                [cuts[sid][1] for sid in truncate],
                self._retention,
                [batches[sid].written_ms for sid in truncate],
            )
        return refused
