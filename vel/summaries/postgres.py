"""Summaries in Postgres (``session_storage='database'``, and the durable copy of the Redis
tier's): table ``vel_summaries`` (migration 0007).

Every call is one statement (two for :meth:`PostgresSummaries.history`, in one snapshot)
through the store's connector, so the same deadlines and error translation apply.
"""

from __future__ import annotations

from typing import Any

from vel.messages import decode_message
from vel.stores.postgres import PostgresStore
from vel.stores.postgres.connector import Conn
from vel.summaries.base import Entry, History, Summary

_GET = """
SELECT s.summary, s.covered_seq, s.covered_id, extract(epoch FROM s.updated_at)::float8,
       EXISTS (SELECT 1 FROM vel_messages m
                WHERE m.session_id = s.session_id AND m.seq = s.covered_seq
                  AND m.message_id = s.covered_id) AS current
  FROM vel_summaries s
 WHERE s.session_id = $1 AND s.summary IS NOT NULL
"""
# A summary whose covered message is gone (cleared, replaced, the session deleted) is
# deleted with its row, unless a newer one was written meanwhile.
_RETIRE = """
DELETE FROM vel_summaries WHERE session_id = $1 AND covered_seq = $2 AND covered_id = $3
"""
_LAST_SEQ = """
SELECT coalesce((SELECT last_seq FROM vel_session_rows WHERE id = $1), 0)
"""
_AFTER = """
SELECT seq, message_id, message::text FROM vel_messages
 WHERE session_id = $1 AND seq > $2 ORDER BY seq LIMIT $3
"""
# Compare-and-set: stored only over the summary the caller started from ($6, $7: its covered
# seq and id; 0 and NULL when it had none) and, with $8, only while the covered message is
# still the session's. Without $8 (the Redis tier's write-through, after Redis' own
# compare-and-set accepted it) it is written as it is.
_PUT = """
INSERT INTO vel_summaries AS s (session_id, summary, covered_seq, covered_id, lag, updated_at)
SELECT $1, $2, $3, $4, $5, to_timestamp($9)
 WHERE NOT $8 OR EXISTS (SELECT 1 FROM vel_messages m
                          WHERE m.session_id = $1 AND m.seq = $3 AND m.message_id = $4)
ON CONFLICT (session_id) DO UPDATE
   SET summary = excluded.summary, covered_seq = excluded.covered_seq,
       covered_id = excluded.covered_id, lag = excluded.lag, updated_at = excluded.updated_at
 WHERE NOT $8
    OR (s.summary IS NULL AND $6 = 0)
    OR (s.covered_seq = $6 AND s.covered_id IS NOT DISTINCT FROM $7)
RETURNING 1
"""
_DELETE = "DELETE FROM vel_summaries WHERE session_id = $1"
_TAKE = """
INSERT INTO vel_summaries AS s (session_id, lease_token, lease_until)
VALUES ($1, $2, now() + make_interval(secs => $3))
ON CONFLICT (session_id) DO UPDATE
   SET lease_token = excluded.lease_token, lease_until = excluded.lease_until
 WHERE s.lease_until IS NULL OR s.lease_until < now() OR s.lease_token = $2
RETURNING 1
"""
_RENEW = """
UPDATE vel_summaries SET lease_until = now() + make_interval(secs => $3)
 WHERE session_id = $1 AND lease_token = $2
RETURNING 1
"""
_RELEASE = """
UPDATE vel_summaries SET lease_token = NULL, lease_until = NULL
 WHERE session_id = $1 AND lease_token = $2
"""
_NOTE = """
UPDATE vel_summaries SET lag = $2, calls = calls + $3, failures = failures + $4
 WHERE session_id = $1
"""
_FIGURES = """
SELECT coalesce(sum(calls), 0)::float8, coalesce(sum(failures), 0)::float8,
       coalesce(sum(lag) FILTER (WHERE lag > 0), 0)::float8,
       coalesce(max(lag), 0)::float8, count(*) FILTER (WHERE lag > 0)::float8
  FROM vel_summaries
"""


class PostgresSummaries:
    """Summaries of a :class:`PostgresStore`'s sessions.

    Args:
        store: the store (its pool, deadlines and schema).
        check_history: refuse a summary whose covered message Postgres does not hold (True
            for 'database' mode; the Redis tier writes before its messages are flushed, and
            its own script checks the history instead).
    """

    def __init__(self, store: PostgresStore, *, check_history: bool = True) -> None:
        self.store = store
        self.check_history = check_history
        self._db = store.connector

    async def get(self, session_id: str) -> Summary | None:
        row = await self._db.run("summary read", lambda c: c.fetchrow(_GET, session_id))
        if row is None:
            return None
        if not row["current"]:
            await self._db.run(
                "summary retire", lambda c: c.execute(_RETIRE, session_id, row[1], row[2])
            )
            return None
        return Summary(row[0], row[1], row[2], row[3])

    async def history(self, session_id: str, after: int, limit: int) -> History:
        async def op(conn: Conn) -> tuple[int, list[Any]]:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                last = await conn.fetchval(_LAST_SEQ, session_id)
                rows = await conn.fetch(_AFTER, session_id, after, limit)
            return int(last), list(rows)

        last, rows = await self._db.run("summary history", op, statements=2)
        return History(last, [Entry(r[0], r[1], decode_message(r[2])) for r in rows])

    async def put(
        self, session_id: str, summary: Summary, previous: Summary | None, basis: History
    ) -> bool:
        args = (
            session_id,
            summary.text,
            summary.covered_seq,
            summary.covered_id,
            0,  # the lag left is noted by the runner, which knows the window
            previous.covered_seq if previous is not None else 0,
            previous.covered_id if previous is not None else None,
            self.check_history,
            summary.updated_at,
        )
        done = await self._db.run("summary write", lambda c: c.fetchval(_PUT, *args))
        return done is not None

    async def delete(self, session_id: str) -> None:
        await self._db.run("summary delete", lambda c: c.execute(_DELETE, session_id))

    async def try_lease(self, session_id: str, token: str, seconds: float) -> bool:
        done = await self._db.run(
            "summary lease", lambda c: c.fetchval(_TAKE, session_id, token, seconds)
        )
        return done is not None

    async def renew_lease(self, session_id: str, token: str, seconds: float) -> bool:
        done = await self._db.run(
            "summary lease", lambda c: c.fetchval(_RENEW, session_id, token, seconds)
        )
        return done is not None

    async def release_lease(self, session_id: str, token: str) -> None:
        await self._db.run("summary lease", lambda c: c.execute(_RELEASE, session_id, token))

    async def note(self, session_id: str, lag: int, *, calls: int = 0, failures: int = 0) -> None:
        await self._db.run(
            "summary note", lambda c: c.execute(_NOTE, session_id, lag, calls, failures)
        )

    async def figures(self) -> dict[str, float]:
        row = await self._db.run("summary figures", lambda c: c.fetchrow(_FIGURES))
        assert row is not None  # an aggregate always returns its row
        return dict(
            zip(
                (
                    "summary_calls",
                    "summary_failures",
                    "summary_lag_messages",
                    "summary_max_lag",
                    "summary_sessions_behind",
                ),
                (float(v) for v in row),
                strict=True,
            )
        )

    async def aclose(self) -> None:
        return None  # the store owns the pool
