"""Direct Postgres reads and fix-ups of the ops commands (the stores expose no bulk reads)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from vel.errors import StoreError
from vel.stores.postgres.migrate import CONNECT_ERRORS, connect_error, redact_dsn


@asynccontextmanager
async def connection(dsn: str) -> AsyncIterator[asyncpg.Connection[Any]]:
    """One connection, every driver error turned into one password-free vel error."""
    try:
        conn = await asyncpg.connect(dsn, timeout=10)
    except CONNECT_ERRORS as exc:
        raise connect_error(exc, dsn) from exc
    try:
        yield conn
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        raise StoreError(f"Postgres at {redact_dsn(dsn)} failed: {exc}") from exc
    finally:
        await conn.close()


LIVE = "last_seq > 0 AND (expires_at IS NULL OR expires_at > now())"

EXPORT = f"""
SELECT s.id, s.created_at, s.updated_at, s.expires_at, s.metadata::text AS metadata,
       (SELECT json_agg(json_build_array(m.message_id, m.message) ORDER BY m.seq)::text
          FROM vel_messages m WHERE m.session_id = s.id) AS messages
  FROM vel_sessions s
 WHERE {LIVE} AND ($1::text[] IS NULL OR s.id = ANY($1::text[]))
 ORDER BY s.id
"""

RECENT = f"SELECT id FROM vel_sessions WHERE {LIVE} ORDER BY updated_at DESC LIMIT $1"
ALL_PAGE = f"SELECT id FROM vel_sessions WHERE {LIVE} AND id > $1 ORDER BY id LIMIT $2"
FIX_IMPORTED = """
UPDATE vel_sessions SET metadata = $2::jsonb, created_at = LEAST(created_at, $3)
 WHERE id = $1
"""
