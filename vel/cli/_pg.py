"""Direct Postgres reads and fix-ups of the ops commands (the stores expose no bulk reads)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from vel.errors import AccessDeniedError, ConfigurationError, StoreError
from vel.namespace import Placement
from vel.redaction import normalize_userinfo, redact, remember
from vel.stores.postgres.migrate import CONNECT_ERRORS, connect_error


@asynccontextmanager
async def connection(
    dsn: str, placement: Placement | None = None
) -> AsyncIterator[asyncpg.Connection[Any]]:
    """One connection to the namespace's schema (``placement``; None: the DSN's
    search_path), every driver error turned into one password-free vel error."""
    remember(dsn)
    settings = {}
    if placement is not None and placement.schema is not None:
        settings["search_path"] = f'"{placement.schema}"'
    where = placement.describe() if placement is not None else "the search_path"
    try:
        conn = await asyncpg.connect(normalize_userinfo(dsn), timeout=10, server_settings=settings)
    except CONNECT_ERRORS as exc:
        raise connect_error(exc, dsn) from exc
    try:
        yield conn
    except asyncpg.InsufficientPrivilegeError as exc:
        raise AccessDeniedError(
            f"Postgres at {redact(dsn)} refused it for lack of permission "
            f"({redact(exc)}; insufficient_privilege) in {where}: grant the role the "
            "privileges listed in docs/operations.md (Postgres grants)"
        ) from exc
    except (asyncpg.UndefinedTableError, asyncpg.InvalidSchemaNameError) as exc:
        raise ConfigurationError(
            f"vel tables are missing in {where} at {redact(dsn)} ({redact(exc)}): run "
            "`vel migrate` with the same settings"
        ) from exc
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        raise StoreError(f"Postgres at {redact(dsn)} failed: {redact(exc)}") from exc
    finally:
        await conn.close()


LIVE = "last_seq > 0 AND (expires_at IS NULL OR expires_at > now())"

EXPORT = f"""
SELECT s.id, s.created_at, s.updated_at, s.expires_at, s.owner, s.metadata::text AS metadata,
       (SELECT json_agg(json_build_array(m.message_id, m.message) ORDER BY m.seq)::text
          FROM vel_messages m WHERE m.session_id = s.id) AS messages
  FROM vel_session_rows s
 WHERE {LIVE} AND ($1::text[] IS NULL OR s.id = ANY($1::text[]))
 ORDER BY s.id
"""

RECENT = f"SELECT id FROM vel_session_rows WHERE {LIVE} ORDER BY updated_at DESC LIMIT $1"
ALL_PAGE = f"SELECT id FROM vel_session_rows WHERE {LIVE} AND id > $1 ORDER BY id LIMIT $2"
FIX_IMPORTED = """
UPDATE vel_session_rows
   SET metadata = $2::jsonb, created_at = LEAST(created_at, $3), owner = coalesce($4, owner)
 WHERE id = $1
"""
