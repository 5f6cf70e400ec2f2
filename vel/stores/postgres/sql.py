"""SQL pieces the Postgres tier's parts share: time conversions between the callers' Unix
milliseconds and timestamps, and the chunked insert of a long history (every statement stays
well inside ``op_timeout``, whatever the history's length)."""

from __future__ import annotations

from vel.stores.postgres.connector import Conn

Row = tuple[int, str, str]  # (seq, message id, message JSON text)

# A timestamp expression as Unix ms.
MS = "floor(extract(epoch FROM {}) * 1000)::bigint"
# A caller's Unix ms as a timestamp (NULL: the server's now()).
AT = "coalesce(to_timestamp({} / 1000.0), now())"

# Rows per INSERT (or SELECT) of a long history.
INSERT_CHUNK = 10_000

# $4: the seq before the chunk's first row.
_INSERT_ROWS = """
INSERT INTO vel_messages (session_id, seq, message_id, message)
SELECT $1, $4::bigint + m.ord, m.message_id, m.message::jsonb
  FROM unnest($2::text[], $3::text[]) WITH ORDINALITY AS m (message_id, message, ord)
"""


async def insert_rows(
    conn: Conn, session_id: str, ids: list[str], texts: list[str], after: int = 0
) -> None:
    """Insert seqs ``after + 1 ..`` in chunks of :data:`INSERT_CHUNK` (the caller holds the
    session row's lock)."""
    for start in range(0, len(texts), INSERT_CHUNK):
        end = start + INSERT_CHUNK
        await conn.execute(
            _INSERT_ROWS, session_id, ids[start:end], texts[start:end], after + start
        )


def chunks(n: int) -> int:
    """Statements a call over ``n`` rows sends (for its deadline)."""
    return 1 + n // INSERT_CHUNK
