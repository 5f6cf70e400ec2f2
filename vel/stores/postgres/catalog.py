"""The Postgres side of :class:`~vel.stores.listing.SessionCatalog`: owner and metadata,
listings by keyset cursor, pages of a history, deletion by owner.

Listings read the indexes of migration 0005: ``(owner, updated_at, id)`` for one owner's
sessions and ``(updated_at, id)`` for all of them. Each variant (owner or all, newest or oldest
first, first page or not) is its own statement, so the keyset condition is always an index
bound, never a filter: a page costs the same at 10 or 1,000,000 sessions. The snapshot that
keeps the pages after the first from repeating a session is Postgres' own
(``pg_current_snapshot()``, judged per row by ``vel_unchanged_since(xmin, ...)``): exact in
commit order, and nothing extra is written by any append.
"""

from __future__ import annotations

import json
import re
from functools import cache
from typing import Any

import asyncpg

from vel.errors import InvalidInputError
from vel.messages import validate_session_id
from vel.stores.listing import (
    HistoryPage,
    Query,
    SessionDetails,
    SessionPage,
    _Unset,
    check_metadata,
    check_owner,
    from_micros,
    next_cursor,
    page_of,
)
from vel.stores.postgres.connector import Conn, Connector

LIVE = "s.last_seq > 0 AND (s.expires_at IS NULL OR s.expires_at > now())"
_COLUMNS = (
    "s.id, s.owner, s.metadata::text AS metadata, s.last_seq, s.created_at, s.updated_at, "
    "s.expires_at"
)
_SNAPSHOT_RE = re.compile(r"^\d{1,20}:\d{1,20}:(\d{1,20}(,\d{1,20})*)?$")

_DETAILS = f"SELECT {_COLUMNS} FROM vel_session_rows s WHERE s.id = $1 AND {LIVE}"
# The row whatever its size (a session the Redis tier holds may not be flushed yet).
_ROW = f"""
SELECT {_COLUMNS} FROM vel_session_rows s
 WHERE s.id = $1 AND (s.expires_at IS NULL OR s.expires_at > now())
"""
# Details never touch updated_at or the history: setting them is no write of the session's
# (no revision, no tier lease: the Redis tier holds no details). A new row is a session
# announced before its first turn; the first append keeps what it finds.
_SET_DETAILS = """
INSERT INTO vel_session_rows AS s (id, owner, metadata)
VALUES ($1, CASE WHEN $2::bool THEN $3::text END, coalesce($5::jsonb, '{}'))
ON CONFLICT (id) DO UPDATE
   SET owner = CASE WHEN $2::bool THEN $3::text ELSE s.owner END,
       metadata = CASE WHEN $4::bool THEN $5::jsonb ELSE s.metadata END
"""
# Rows of an owner, for its deletion, in id order (keyset: deleted rows lose their owner).
_OWNED = "SELECT id FROM vel_session_rows WHERE owner = $1 AND id > $2 ORDER BY id LIMIT $3"
# What a deletion leaves: the tombstone a clear leaves, without the owner's details.
_FORGET_DETAILS = """
UPDATE vel_session_rows SET owner = NULL, metadata = '{}'
 WHERE id = ANY($1::text[]) AND owner = $2
"""
# Sessions without messages that the Redis tier may still hold a copy of: cleared through the
# tier, or deleted behind it (the spec's DELETE through the vel_sessions view, 0006).
_EMPTY_LEASED = """
SELECT id FROM vel_session_rows
 WHERE last_seq = 0 AND hot_until > now() AND id > $2
 ORDER BY id
 LIMIT $1
"""
_LAST = "SELECT s.last_seq FROM vel_session_rows s WHERE s.id = $1 AND " + LIVE
# A range of the history (the primary key's range scan), only while the session is live.
_RANGE = f"""
SELECT m.seq, m.message::text
  FROM vel_messages m
 WHERE m.session_id = $1 AND m.seq > $2 AND m.seq < $3
   AND EXISTS (SELECT 1 FROM vel_session_rows s WHERE s.id = $1 AND {LIVE})
 ORDER BY m.seq {{order}}
 LIMIT $4
"""
_NEWEST_RANGE = _RANGE.format(order="DESC")
_OLDEST_RANGE = _RANGE.format(order="ASC")


@cache
def listing_sql(by_owner: bool, newest: bool, first_page: bool) -> str:
    """The statement of one listing variant. Parameters: $1 owner (unused for all), $2
    metadata filter (NULL: none), $3 limit, then for later pages $4 updated_at, $5 id,
    $6 the first page's snapshot."""
    direction = "DESC" if newest else "ASC"
    where = ["s.owner = $1" if by_owner else "$1::text IS NULL", LIVE]
    where.append("($2::jsonb IS NULL OR s.metadata @> $2::jsonb)")
    if not first_page:
        compare = "<" if newest else ">"
        where.append(f"(s.updated_at, s.id) {compare} ($4::timestamptz, $5::text)")
        where.append("vel_unchanged_since(s.xmin, $6::text::pg_snapshot)")
    return (
        f"SELECT {_COLUMNS}, pg_current_snapshot()::text AS snapshot\n"
        f"  FROM vel_session_rows s\n WHERE {' AND '.join(where)}\n"
        f" ORDER BY s.updated_at {direction}, s.id {direction}\n LIMIT $3"
    )


def _details(row: Any) -> SessionDetails:
    return SessionDetails(
        session_id=row["id"],
        owner=row["owner"],
        metadata=json.loads(row["metadata"]),
        message_count=int(row["last_seq"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        expires_at=row["expires_at"],
    )


class Catalog:
    """The catalog calls of :class:`~vel.stores.postgres.PostgresStore`."""

    def __init__(self, db: Connector) -> None:
        self._db = db

    async def session_details(self, session_id: str) -> SessionDetails | None:
        session_id = validate_session_id(session_id)
        row = await self._db.run("session_details", lambda c: c.fetchrow(_DETAILS, session_id))
        return None if row is None else _details(row)

    async def session_row(self, session_id: str) -> SessionDetails | None:
        """Like :meth:`session_details`, for a row without messages too."""
        session_id = validate_session_id(session_id)
        row = await self._db.run("session_details", lambda c: c.fetchrow(_ROW, session_id))
        return None if row is None else _details(row)

    async def set_details(
        self, session_id: str, owner: str | _Unset | None, metadata: dict[str, Any] | _Unset
    ) -> None:
        session_id = validate_session_id(session_id)
        set_owner = not isinstance(owner, _Unset)
        if set_owner and owner is not None:
            owner = check_owner(owner)
        set_meta = not isinstance(metadata, _Unset)
        text = check_metadata(metadata)[1] if set_meta else None
        args = (session_id, set_owner, owner if set_owner else None, set_meta, text)
        await self._db.run("set_details", lambda c: c.execute(_SET_DETAILS, *args))

    async def find_sessions(self, query: Query) -> SessionPage:
        first = query.after is None
        if not first and not _SNAPSHOT_RE.match(query.snapshot or ""):
            raise InvalidInputError("cursor is not a cursor returned by a listing")
        sql = listing_sql(query.owner is not None, query.order == "newest", first)
        args: list[Any] = [query.owner, query.metadata_json, query.limit + 1]
        if query.after is not None:
            args += [from_micros(query.after[0]), query.after[1], query.snapshot]

        async def op(conn: Conn) -> list[Any]:
            try:
                return list(await conn.fetch(sql, *args))
            except (asyncpg.InvalidTextRepresentationError, asyncpg.DataError) as exc:
                raise InvalidInputError("cursor is not a cursor returned by a listing") from exc

        rows = await self._db.run("find_sessions", op)
        sessions = [_details(r) for r in rows[: query.limit]]
        if len(rows) <= query.limit:
            return SessionPage(sessions, None)
        snapshot = query.snapshot if query.snapshot is not None else rows[0]["snapshot"]
        return SessionPage(sessions, next_cursor(query, sessions[-1], snapshot))

    async def history_page(
        self, session_id: str, before: int | None, after: int | None, limit: int
    ) -> HistoryPage:
        session_id = validate_session_id(session_id)
        low = 0 if after is None else after
        high = 2**62 if before is None else before
        sql = _OLDEST_RANGE if after is not None and before is None else _NEWEST_RANGE

        async def op(conn: Conn) -> tuple[int, list[Any]]:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                last = await conn.fetchval(_LAST, session_id)
                if last is None:
                    return 0, []
                return int(last), list(await conn.fetch(sql, session_id, low, high, limit))

        last, rows = await self._db.run("history_page", op)
        pairs = sorted((int(r["seq"]), r["message"]) for r in rows)
        return page_of(pairs, last, low, high)

    async def owned(self, owner: str, after: str, limit: int) -> list[str]:
        owner = check_owner(owner)
        rows = await self._db.run("owned", lambda c: c.fetch(_OWNED, owner, after, limit))
        return [r["id"] for r in rows]

    async def empty_leased(self, limit: int, after: str) -> list[str]:
        rows = await self._db.run("empty_leased", lambda c: c.fetch(_EMPTY_LEASED, limit, after))
        return [r["id"] for r in rows]

    async def forget_details(self, owner: str, session_ids: list[str]) -> None:
        await self._db.run(
            "forget_details", lambda c: c.execute(_FORGET_DETAILS, session_ids, owner)
        )
