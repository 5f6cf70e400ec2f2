"""The durable tier of the two-tier store: what the flusher writes and the warm reads.

:meth:`Sink.apply_flushes` applies batches copied from Redis idempotently (keyed by
``(session_id, seq)``, verified by message id; DESIGN.md 3.3) and only onto the Postgres history
the Redis copy was built from: the generation sync (:meth:`Sink._lock_for_flush`) is where a
flush that began before a clear or replace is recognised as stale (3.5), and where a history
changed behind the tier (another revision, a deleted row) turns the flush into a conflict that
is never counted as flushed (3.8). Each applied flush extends the session's tier lease and
carries the time of the writes it copies, so retention counts from the write, not the flush
(3.9). :meth:`Sink.take_lease` is the warm's read: the tier lease plus the window the caller
needs, never the whole history (3.10); :meth:`Sink.load_range` serves the older part on demand.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import asyncpg

from vel import failpoints
from vel.errors import FlushConflictError, InvalidInputError, StoreError
from vel.messages import check_message_ids, validate_session_id
from vel.stores.postgres.checks import non_negative
from vel.stores.postgres.connector import MESSAGE_ID_KEY, Conn, Connector, transaction
from vel.stores.postgres.sessions import INSERT_CHUNK, chunks, insert_history

Row = tuple[int, str, str]  # (seq, message id, message JSON text)

# Conflict reasons (FlushResult.conflict): why a batch was not applied.
CHANGED = "changed"  # Postgres' revision differs: a write outside the tier since the load
DELETED = "deleted"  # the row the Redis copy was loaded from is gone

_MS = "floor(extract(epoch FROM {}) * 1000)::bigint"
# A client time in ms as a timestamp (NULL: the server's now()).
_AT = "coalesce(to_timestamp({} / 1000.0), now())"

# One statement, hence one snapshot: the header and the rows always agree.
_SNAPSHOT = f"""
SELECT s.generation, s.last_seq, s.revision,
       {_MS.format("s.created_at")} AS created_ms,
       {_MS.format("s.updated_at")} AS updated_ms,
       {_MS.format("s.expires_at")} AS expires_ms,
       m.seq, m.message_id, m.message::text AS message
  FROM vel_sessions s
  LEFT JOIN vel_messages m ON m.session_id = s.id
 WHERE s.id = $1 AND (s.expires_at IS NULL OR s.expires_at > now())
 ORDER BY m.seq
"""
# The warm's first statement: create or lock the row and take (or extend) the tier lease.
# $2 lease seconds, $3 the caller's clock in ms (expiry is judged on the clock that wrote it).
_TAKE_LEASE = f"""
INSERT INTO vel_sessions AS s (id, hot_until)
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
# An expired session met by a warm starts afresh in place (see sessions._RESTART_EXPIRED).
_RESTART_FOR_TIER = f"""
UPDATE vel_sessions
   SET last_seq = 0, generation = generation + 1, revision = revision + 1,
       created_at = now(), updated_at = now(), expires_at = NULL
 WHERE id = $1
RETURNING generation, revision, {_MS.format("created_at")} AS created_ms,
          {_MS.format("updated_at")} AS updated_ms
"""
# The window: the last rows, by a range scan of the primary key (the caller holds the lock).
_TAIL = """
SELECT seq, message_id, message::text AS message
  FROM vel_messages
 WHERE session_id = $1 AND seq > $2
 ORDER BY seq
"""
# Older rows on demand, only if the row still holds the history the Redis copy was loaded
# from ($4 generation, $5 revision, -1: not checked; $6 the caller's clock, ms).
_RANGE = f"""
SELECT m.seq, m.message_id, m.message::text AS message
  FROM vel_messages m
 WHERE m.session_id = $1 AND m.seq BETWEEN $2 AND $3
   AND EXISTS (SELECT 1 FROM vel_sessions s
                WHERE s.id = $1 AND s.generation = $4 AND ($5 < 0 OR s.revision = $5)
                  AND (s.expires_at IS NULL OR s.expires_at > {_AT.format("$6::float8")}))
 ORDER BY m.seq
"""
# Lock the rows of a flush, in id order so that concurrent flushers cannot deadlock; each
# row's expiry is judged at the time of the writes being flushed ($2, ms).
_LOCK_SESSIONS = f"""
SELECT s.id, s.generation, s.revision,
       coalesce(s.expires_at <= {_AT.format("u.written_ms")}, false) AS expired
  FROM vel_sessions s
  JOIN unnest($1::text[], $2::float8[]) AS u (id, written_ms) ON u.id = s.id
 ORDER BY s.id
   FOR UPDATE OF s
"""
# Rows a flush may create: sessions whose Redis copy never had Postgres data.
_CREATE_SESSIONS = """
INSERT INTO vel_sessions (id, generation)
SELECT u.id, u.generation FROM unnest($1::text[], $2::bigint[]) AS u (id, generation)
 ORDER BY u.id
ON CONFLICT (id) DO NOTHING
"""
# Runs with the row locks held, so its snapshot already holds every message of the sessions.
# $3: which rows restart (expired: created_at restarts too).
_RESET_SESSIONS = """
WITH target AS (
    SELECT u.id, u.generation, u.restart
      FROM unnest($1::text[], $2::bigint[], $3::bool[]) AS u (id, generation, restart)
), gone AS (
    DELETE FROM vel_messages WHERE session_id = ANY($1::text[])
)
UPDATE vel_sessions s
   SET generation = t.generation,
       last_seq = 0,
       updated_at = now(),
       created_at = CASE WHEN t.restart THEN now() ELSE s.created_at END
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
    UPDATE vel_sessions s
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
# An operator's resolution of a conflict (vel sessions resolve): the row is changed outside
# the flush protocol, so both counters move and every older Redis copy or read is fenced off.
_RESOLVE_LOCK = """
INSERT INTO vel_sessions AS s (id) VALUES ($1)
ON CONFLICT (id) DO UPDATE SET generation = s.generation + 1, revision = s.revision + 1
RETURNING last_seq, coalesce(expires_at <= now(), false) AS expired
"""
_RESOLVE_KNOWN_IDS = """
SELECT message_id FROM vel_messages WHERE session_id = $1 AND message_id = ANY($2::text[])
"""
_RESOLVE_APPEND = """
INSERT INTO vel_messages (session_id, seq, message_id, message)
SELECT $1, $4::bigint + m.ord, m.message_id, m.message::jsonb
  FROM unnest($2::text[], $3::text[]) WITH ORDINALITY AS m (message_id, message, ord)
"""
_RESOLVE_DONE = """
UPDATE vel_sessions
   SET last_seq = $2, updated_at = now(), hot_until = NULL,
       expires_at = CASE WHEN $4 THEN now() + $3::float8 * interval '1 second'
                         ELSE expires_at END
 WHERE id = $1
"""
_DELETE_MESSAGES = "DELETE FROM vel_messages WHERE session_id = $1"
# Give the tier lease back (the Redis copy is gone), unless a warm took it again since.
_RELEASE_EXPIRED = """
UPDATE vel_sessions SET hot_until = NULL
 WHERE id = ANY($1::text[]) AND expires_at <= now()
"""
_RELEASE = "UPDATE vel_sessions SET hot_until = NULL WHERE id = ANY($1::text[])"
_EXPIRED_LEASED = """
SELECT id FROM vel_sessions
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


@dataclass(frozen=True, slots=True)
class FlushBatch:
    """One session's batch of a flush, with what the flush checks it against.

    Attributes:
        session_id, generation, rows: what to write (rows possibly empty, to record a
            newer generation only).
        revision: the revision the Redis copy was loaded at (None: not checked).
        written_ms: when the session was last written (Unix ms; None: now). Retention
            counts from it.
        had_postgres_rows: the Redis copy was loaded from, or already flushed to, Postgres
            rows; a missing row then means it was deleted behind the tier.
    """

    session_id: str
    generation: int
    rows: Sequence[Row]
    revision: int | None = None
    written_ms: int | None = None
    had_postgres_rows: bool = False


@dataclass(frozen=True, slots=True)
class FlushResult:
    """Outcome of :meth:`PostgresStore.apply_flush`.

    Attributes:
        inserted: rows newly written.
        duplicates: rows already present with the same message id (a replayed batch).
        stale: the batch was not applied: Postgres holds a newer generation, or (with
            ``conflict`` set) the history changed behind the tier.
        conflict: None, or why the batch cannot be applied (``"changed"``, ``"deleted"``).
        lease_ms: milliseconds left on the session's tier lease after the flush.
    """

    inserted: int
    duplicates: int
    stale: bool = False
    conflict: str | None = None
    lease_ms: int | None = field(default=None, compare=False)


def _as_batch(batch: FlushBatch | tuple[str, int, Sequence[Row]]) -> FlushBatch:
    if isinstance(batch, FlushBatch):
        return batch
    session_id, generation, rows = batch
    return FlushBatch(session_id, generation, rows)


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
            "flush_conflicts": float(self._flush_conflicts),
        }

    # -- reads for the warm --------------------------------------------------------------------

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
        non_negative("window", window, int)

        async def op(conn: Conn) -> Snapshot:
            async with transaction(conn):
                head = await conn.fetchrow(_TAKE_LEASE, session_id, lease, now_ms)
                assert head is not None
                generation, revision = int(head["generation"]), int(head["revision"])
                last_seq, expires_ms = int(head["last_seq"]), head["expires_ms"]
                created_ms, updated_ms = int(head["created_ms"]), int(head["updated_ms"])
                if head["expired"]:
                    await conn.execute(_DELETE_MESSAGES, session_id)
                    fresh = await conn.fetchrow(_RESTART_FOR_TIER, session_id)
                    assert fresh is not None
                    generation, revision = int(fresh["generation"]), int(fresh["revision"])
                    created_ms, updated_ms = int(fresh["created_ms"]), int(fresh["updated_ms"])
                    last_seq, expires_ms = 0, None
                rows: list[Row] = []
                if last_seq and window:
                    records = await conn.fetch(_TAIL, session_id, max(0, last_seq - window))
                    rows = [(int(r["seq"]), r["message_id"], r["message"]) for r in records]
                    if (
                        not rows
                        or rows[-1][0] != last_seq
                        or rows[0][0] + len(rows) - 1 != (last_seq)
                    ):
                        raise StoreError(
                            f"session {session_id!r}: Postgres rows do not end at its last "
                            f"seq {last_seq} (the history was changed by hand?)"
                        )
                return Snapshot(
                    generation=generation,
                    last_seq=last_seq,
                    rows=rows,
                    created_ms=created_ms,
                    updated_ms=updated_ms,
                    expires_ms=None if expires_ms is None else int(expires_ms),
                    revision=revision,
                    lease_ms=int(head["lease_ms"]),
                )

        return await self._db.run("take_lease", op, statements=chunks(window))

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

    # -- flushes -------------------------------------------------------------------------------

    async def apply_flushes(
        self,
        batches: Sequence[FlushBatch | tuple[str, int, Sequence[Row]]],
        lease: float | None = None,
    ) -> list[FlushResult]:
        work = [_as_batch(b) for b in batches]
        by_sid: dict[str, FlushBatch] = {}
        flat_sids: list[str] = []
        flat_seqs: list[int] = []
        flat_ids: list[str] = []
        flat_texts: list[str] = []
        for batch in work:
            session_id = validate_session_id(batch.session_id)
            if session_id in by_sid:
                raise InvalidInputError(f"session {session_id!r} appears twice in one flush")
            non_negative("generation", batch.generation, int)
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

        async def op(conn: Conn) -> dict[str, FlushResult]:
            results: dict[str, FlushResult] = {}
            try:
                async with transaction(conn):
                    results = await self._lock_for_flush(conn, by_sid)
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
            validate_session_id(session_id), non_negative("generation", generation, int), []
        )

        async def op(conn: Conn) -> None:
            async with transaction(conn):
                await self._lock_for_flush(conn, {batch.session_id: batch})

        await self._db.run("apply_clear", op)

    async def _lock_for_flush(
        self, conn: Conn, batches: dict[str, FlushBatch]
    ) -> dict[str, FlushResult]:
        """Lock (creating if allowed) the sessions' rows and bring them to the batches'
        generations.

        Rows of an older generation, or expired as of the flushed writes (which count as
        absent), lose their messages and take the batch's generation. Returns the sessions
        that must not be written: Postgres holds a newer generation (stale), or the history
        the Redis copy was built from is not there any more (conflict).
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
        for sid, row in rows.items():
            batch = batches[sid]
            stored = int(row["generation"])
            if row["expired"]:
                reset.append(sid)
                restart.append(True)
            elif batch.revision is not None and int(row["revision"]) != batch.revision:
                refused[sid] = FlushResult(0, 0, stale=True, conflict=CHANGED)
            elif stored < batch.generation:
                reset.append(sid)
                restart.append(False)
            elif stored > batch.generation:
                refused[sid] = FlushResult(0, 0, stale=True)
        if reset:
            await conn.execute(
                _RESET_SESSIONS, reset, [batches[sid].generation for sid in reset], restart
            )
        return refused

    # -- operators -----------------------------------------------------------------------------

    async def resolve(
        self, session_id: str, ids: Sequence[str], texts: Sequence[str], *, replace: bool
    ) -> int:
        session_id = validate_session_id(session_id)
        ids = check_message_ids(ids, len(texts))

        async def op(conn: Conn) -> int:
            async with transaction(conn):
                head = await conn.fetchrow(_RESOLVE_LOCK, session_id)
                assert head is not None
                last = 0 if head["expired"] else int(head["last_seq"])
                new_ids, new_texts = list(ids), list(texts)
                if replace or head["expired"]:
                    await conn.execute(_DELETE_MESSAGES, session_id)
                    last = 0
                else:
                    known = {
                        r[0] for r in await conn.fetch(_RESOLVE_KNOWN_IDS, session_id, new_ids)
                    }
                    kept = [i for i, mid in enumerate(new_ids) if mid not in known]
                    new_ids = [new_ids[i] for i in kept]
                    new_texts = [new_texts[i] for i in kept]
                if replace or head["expired"]:
                    await insert_history(conn, session_id, new_ids, new_texts)
                else:
                    for start in range(0, len(new_ids), 10_000):
                        await conn.execute(
                            _RESOLVE_APPEND,
                            session_id,
                            new_ids[start : start + 10_000],
                            new_texts[start : start + 10_000],
                            last + start,
                        )
                last += len(new_ids)
                await conn.execute(_RESOLVE_DONE, session_id, last, self._retention, bool(new_ids))
                return last

        return await self._db.run("resolve", op, statements=chunks(len(texts)) + 4)

    async def release_expired(self, session_ids: Sequence[str]) -> None:
        ids = [validate_session_id(sid) for sid in session_ids]
        await self._db.run("release", lambda c: c.execute(_RELEASE_EXPIRED, ids))

    async def release(self, session_ids: Sequence[str]) -> None:
        ids = [validate_session_id(sid) for sid in session_ids]
        await self._db.run("release", lambda c: c.execute(_RELEASE, ids))

    async def expired_leased(self, limit: int, after: str) -> list[str]:
        rows = await self._db.run("expired", lambda c: c.fetch(_EXPIRED_LEASED, limit, after))
        return [r["id"] for r in rows]
