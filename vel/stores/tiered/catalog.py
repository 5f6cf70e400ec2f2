"""The two-tier store's :class:`~vel.stores.listing.SessionCatalog`.

Owner and metadata live in Postgres only (the Redis tier holds histories, nothing else), so
setting them is one Postgres statement whatever Redis holds, and listings are Postgres index
scans: a session appears in them, with its ``updated_at``, once the flusher has written it (at
most one flush interval after the write). A session's info takes its size and last write from
Redis when Redis has it, so it is current.

A page of a history comes from Redis for the seqs its copy holds and from Postgres for older
ones (from the history the copy was loaded from), or wholly from Postgres when Redis has no copy:
nothing is warmed. Deleting an owner's sessions clears each in Redis (a new generation, so no
flush that began before can write the old messages back; DESIGN.md 3.5) and brings Postgres to
that generation at once, then forgets the owner's details.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from vel.messages import Message, validate_session_id
from vel.stores.base import SessionInfo
from vel.stores.listing import HistoryPage, Query, SessionDetails, SessionPage, _Unset
from vel.stores.postgres import PostgresStore
from vel.stores.redis import RedisStore
from vel.stores.redis import catalog as redis_catalog
from vel.stores.redis.catalog import Rows
from vel.stores.redis.client import now_ms

_ATTEMPTS = 5


async def session_details(
    hot: RedisStore, cold: PostgresStore, session_id: str
) -> SessionDetails | None:
    session_id = validate_session_id(session_id)
    keys = hot.keys.session(session_id)
    seq, updated = await hot.call(
        "hmget",
        lambda c: c.redis.hmget(keys.meta, "seq", "updated"),
        idempotent=True,
    )
    info = await cold.catalog.session_row(session_id)
    if seq is None:
        return info if info is not None and info.message_count > 0 else None
    count = int(seq)
    if count == 0:
        return None
    written = datetime.fromtimestamp(int(updated or 0) / 1000, UTC)
    if info is None:
        # Redis holds a session whose row is gone (deleted behind the tier): its own times.
        return SessionDetails(session_id, None, {}, count, written, written, None)
    return replace(info, message_count=count, updated_at=max(info.updated_at, written))


async def history_page(
    hot: RedisStore,
    cold: PostgresStore,
    session_id: str,
    before: int | None,
    after: int | None,
    limit: int,
) -> HistoryPage:
    async def older(sid: str, first: int, last: int, gen: int, rev: int | None) -> Rows | None:
        return await cold.load_range(sid, first, last, gen, rev, now_ms())

    async def missing() -> HistoryPage:
        # No Redis copy, so no unflushed write: Postgres holds the whole history.
        return await cold.history_page(session_id, before, after, limit)

    return await redis_catalog.history_page(hot, session_id, before, after, limit, older, missing)


async def delete_owner(
    cold: PostgresStore, owner: str, clear: Callable[[str], Awaitable[int]]
) -> int:
    """``clear``: the tier's replace of a history by nothing; returns the new generation."""
    deleted, after = 0, ""
    while ids := await cold.catalog.owned(owner, after, 500):
        for session_id in ids:
            generation = await clear(session_id)
            await cold.apply_clear(session_id, generation)
        await cold.catalog.forget_details(owner, ids)
        deleted += len(ids)
        after = ids[-1]
    return deleted


async def drop_deleted_copies(hot: RedisStore, cold: PostgresStore) -> int:
    """Drop the clean Redis copies of sessions Postgres holds without messages (deleted
    behind the tier by SQL, or cleared): a copy of a deleted session must not keep serving
    its history, nor take new turns on top of it. A copy with unflushed writes is kept (its
    flush finds the newer generation and is set aside, never written). Returns how many
    copies were dropped."""
    dropped, after = 0, ""
    while ids := await cold.catalog.empty_leased(500, after):
        codes = await hot.drop_clean_each(ids)
        dropped += sum(code > 0 for code in codes)
        after = ids[-1]
    return dropped


class TieredCatalog:
    """The two-tier store's listing and :class:`~vel.stores.listing.SessionCatalog` calls. A
    mixin, so the store's facade stays one class while these calls sit beside the functions
    that serve them."""

    hot: RedisStore
    cold: PostgresStore
    _replace: Callable[[str, Sequence[Message]], Awaitable[int]]

    async def list_sessions(
        self, inactive_for: float | None = None, limit: int = 1000
    ) -> list[SessionInfo]:
        """Sessions recorded in Postgres (a brand-new session appears once flushed)."""
        return await self.cold.list_sessions(inactive_for=inactive_for, limit=limit)

    async def session_details(self, session_id: str) -> SessionDetails | None:
        return await session_details(self.hot, self.cold, session_id)

    async def set_details(
        self, session_id: str, owner: str | _Unset | None, metadata: dict[str, Any] | _Unset
    ) -> None:
        await self.cold.set_details(session_id, owner, metadata)

    async def find_sessions(self, query: Query) -> SessionPage:
        """A page of a listing, read from Postgres (flushed sessions only)."""
        return await self.cold.find_sessions(query)

    async def history_page(
        self, session_id: str, before: int | None, after: int | None, limit: int
    ) -> HistoryPage:
        return await history_page(self.hot, self.cold, session_id, before, after, limit)

    async def delete_owner(self, owner: str) -> int:
        return await delete_owner(self.cold, owner, lambda sid: self._replace(sid, []))
