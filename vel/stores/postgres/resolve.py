"""An operator's resolution of a flush conflict, in Postgres (``vel sessions resolve``;
DESIGN.md 3.8): append the messages only Redis held after the history (skipping ids it
already holds), or make them the whole history. The row changes outside the flush protocol,
so both its generation and its revision move: no older Redis copy or flush can write over the
result."""

from __future__ import annotations

from collections.abc import Sequence

from vel.messages import check_message_ids, validate_session_id
from vel.stores.postgres.connector import Conn, Connector, transaction
from vel.stores.postgres.sql import chunks, insert_rows

# An operator's resolution of a conflict (vel sessions resolve): the row is changed outside
# the flush protocol, so both counters move and every older Redis copy or read is fenced off.
_RESOLVE_LOCK = """
INSERT INTO vel_session_rows AS s (id) VALUES ($1)
ON CONFLICT (id) DO UPDATE SET generation = s.generation + 1, revision = s.revision + 1
RETURNING last_seq, coalesce(expires_at <= now(), false) AS expired
"""
_RESOLVE_KNOWN_IDS = """
SELECT message_id FROM vel_messages WHERE session_id = $1 AND message_id = ANY($2::text[])
"""
_RESOLVE_DONE = """
UPDATE vel_session_rows
   SET last_seq = $2, updated_at = now(), hot_until = NULL,
       expires_at = CASE WHEN $4 THEN now() + $3::float8 * interval '1 second'
                         ELSE expires_at END
 WHERE id = $1
"""
_DELETE_MESSAGES = "DELETE FROM vel_messages WHERE session_id = $1"


class Resolver:
    """Conflict resolutions; ``retention`` in seconds, None for never."""

    def __init__(self, db: Connector, retention: float | None) -> None:
        self._db = db
        self._retention = retention

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
                await insert_rows(conn, session_id, new_ids, new_texts, last)
                last += len(new_ids)
                await conn.execute(_RESOLVE_DONE, session_id, last, self._retention, bool(new_ids))
                return last

        return await self._db.run("resolve", op, statements=chunks(len(texts)) + 4)
