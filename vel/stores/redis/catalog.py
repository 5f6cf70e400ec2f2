"""Organising sessions in Redis-only mode (``session_storage='redis'`` without Postgres), and
the history page read both Redis modes share.

Redis-only mode keeps each session's owner and metadata in a hash beside it (``details`` in
:mod:`vel.stores.redis.keys`), whose TTL is moved to the session's own whenever the details
are set or read, so they go when the session goes. Listings and deletion by owner SCAN the
prefix's keys: their cost grows with the number of sessions Redis holds (the indexed listings
are Postgres': 'database' mode, or 'redis' mode with ``POSTGRES_DSN``). A listing's snapshot is
the time of its first page: the pages after it skip sessions written since (their ``updated``
time, stamped by the writing process, is later), so none is listed twice, within the clock
skew of the writers.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from vel.errors import InvalidInputError, StoreError
from vel.messages import validate_session_id
from vel.stores.listing import (
    HistoryPage,
    Query,
    SessionDetails,
    SessionPage,
    _Unset,
    check_metadata,
    check_owner,
    contains,
    micros,
    next_cursor,
    page_of,
)
from vel.stores.redis.client import Client

if TYPE_CHECKING:
    from vel.stores.redis.store import RedisStore

Rows = list[tuple[int, str, str]]
# Reads the seqs first..last below a copy's base, from the history the copy was loaded from
# (generation, revision); None when that history changed.
Older = Callable[[str, int, int, int, int | None], Awaitable[Rows | None]]
_ATTEMPTS = 5


def _stamp(ms: Any) -> datetime:
    return datetime.fromtimestamp(int(ms or 0) / 1000, UTC)


async def _lrange(key: str, start: int, stop: int, c: Client) -> list[Any]:
    return list(await c.redis.lrange(key, start, stop))


async def _hget(key: str, field: str, c: Client) -> Any:
    return await c.redis.hget(key, field)


async def _delete(key: str, c: Client) -> None:
    await c.redis.delete(key)


async def history_page(
    hot: RedisStore,
    session_id: str,
    before: int | None,
    after: int | None,
    limit: int,
    older: Older | None,
    missing: Callable[[], Awaitable[HistoryPage]] | None,
) -> HistoryPage:
    """A page of the session's Redis copy; the seqs below the copy's base through ``older``;
    ``missing`` when Redis has no copy (None: an empty page)."""
    session_id = validate_session_id(session_id)
    low = 0 if after is None else after
    high = 2**62 if before is None else before
    keys = hot.keys.session(session_id)
    for _ in range(_ATTEMPTS):
        head = await hot.read(session_id, 0)
        if head is None:
            return await missing() if missing is not None else page_of([], 0, low, high)
        top = min(head.seq, high - 1)
        if after is not None and before is None:
            first, last = low + 1, min(top, low + limit)
        else:
            first, last = max(low + 1, top - limit + 1, 1), top
        if first > last:
            return page_of([], head.seq, low, high)
        pairs: list[tuple[int, str]] = []
        if first <= head.base:
            rows = None
            if older is not None:
                rows = await older(session_id, first, min(last, head.base), head.gen, head.rev)
            if rows is None:
                continue  # the history the copy was loaded from changed: read again
            pairs += [(seq, text) for seq, _, text in rows]
        if last > head.base:
            start = max(first, head.base + 1) - head.base - 1
            stop = last - head.base - 1
            items = await hot.call(
                "lrange", functools.partial(_lrange, keys.messages, start, stop), idempotent=True
            )
            # The list's indices hold these seqs only while seq, base and gen are unchanged.
            again = await hot.read(session_id, 0)
            if again is None or (again.seq, again.base, again.gen) != (
                head.seq,
                head.base,
                head.gen,
            ):
                continue
            offset = max(first, head.base + 1)
            pairs += [
                (offset + i, item.partition(b"\n")[2].decode("utf-8"))
                for i, item in enumerate(items)
            ]
        return page_of(pairs, head.seq, low, high)
    raise StoreError(f"session {session_id!r} kept changing while a page of it was read")


class RedisCatalog:
    """The :class:`~vel.stores.listing.SessionCatalog` of a Redis-only store, made per call
    (the store keeps no reference to it, so no cycle delays the store's collection)."""

    def __init__(self, hot: RedisStore) -> None:
        self._hot = hot

    async def _read(self, session_id: str) -> tuple[list[Any], int, list[Any]] | None:
        """(seq, created, updated) of the meta, its PTTL, (owner, metadata); None: no copy.
        The details' TTL is moved to the session's."""
        keys = self._hot.keys.session(session_id)

        async def op(c: Client) -> tuple[list[Any], int, list[Any]]:
            pipe = c.redis.pipeline(transaction=False)
            pipe.hmget(keys.meta, "seq", "created", "updated")
            pipe.pttl(keys.meta)
            pipe.hmget(keys.details, "owner", "metadata")
            meta, ttl, details = await pipe.execute()
            if ttl > 0 and details != [None, None]:
                await c.redis.pexpire(keys.details, ttl)
            return list(meta), int(ttl), list(details)

        meta, ttl, details = await self._hot.call("details", op, idempotent=True)
        if meta[0] is None or int(meta[0]) == 0:
            return None
        return meta, ttl, details

    def _info(self, sid: str, meta: list[Any], ttl: int, details: list[Any]) -> SessionDetails:
        owner = details[0].decode() if details[0] is not None else None
        metadata = json.loads(details[1]) if details[1] is not None else {}
        expires = None if ttl < 0 else datetime.fromtimestamp(time.time() + ttl / 1000, UTC)
        return SessionDetails(
            sid, owner or None, metadata, int(meta[0]), _stamp(meta[1]), _stamp(meta[2]), expires
        )

    async def session_details(self, session_id: str) -> SessionDetails | None:
        session_id = validate_session_id(session_id)
        found = await self._read(session_id)
        return None if found is None else self._info(session_id, *found)

    async def set_details(
        self, session_id: str, owner: str | _Unset | None, metadata: dict[str, Any] | _Unset
    ) -> None:
        keys = self._hot.keys.session(validate_session_id(session_id))
        fields: dict[Any, Any] = {}
        if not isinstance(owner, _Unset):
            fields["owner"] = "" if owner is None else check_owner(owner)
        if not isinstance(metadata, _Unset):
            fields["metadata"] = check_metadata(metadata)[1]
        floor = int(self._hot.hot_ttl * 1000)

        async def op(c: Client) -> None:
            ttl = int(await c.redis.pttl(keys.meta))
            pipe = c.redis.pipeline(transaction=False)
            pipe.hset(keys.details, mapping=fields)
            pipe.pexpire(keys.details, max(ttl, floor))
            await pipe.execute()

        if fields:
            await self._hot.call("set details", op)

    async def _scan(self, kind: str) -> list[str]:
        """Ids of the sessions with a ``kind`` key (``meta`` or ``details``)."""
        layout = self._hot.keys
        pattern, marker = (
            (layout.meta_pattern, "}:h:") if kind == "meta" else (layout.details_pattern, "}:d:")
        )

        async def op(c: Client) -> list[str]:
            found = []
            async for raw in c.redis.scan_iter(match=pattern, count=1000):
                key = raw.decode()
                sid = key.partition(marker)[2]
                # A match of the pattern is one of ours only if it is exactly that key.
                if sid and getattr(layout.session(sid), kind) == key:
                    found.append(sid)
            return found

        return await self._hot.call("scan", op, idempotent=True)

    async def find_sessions(self, query: Query) -> SessionPage:
        if query.snapshot is not None and not query.snapshot.isdigit():
            raise InvalidInputError("cursor is not a cursor returned by a listing")
        snapshot = int(query.snapshot) if query.snapshot is not None else int(time.time() * 1000)
        newest = query.order == "newest"
        found: list[tuple[tuple[int, str], SessionDetails]] = []
        for sid in await self._scan("meta"):
            read = await self._read(sid)
            if read is None or (query.after is not None and int(read[0][2] or 0) > snapshot):
                continue
            info = self._info(sid, *read)
            if query.owner is not None and info.owner != query.owner:
                continue
            if query.metadata is not None and not contains(info.metadata, query.metadata):
                continue
            key = (micros(info.updated_at), sid)
            if query.after is not None and (key >= query.after if newest else key <= query.after):
                continue
            found.append((key, info))
        found.sort(key=lambda item: item[0], reverse=newest)
        page = [info for _, info in found[: query.limit]]
        if len(found) <= query.limit:
            return SessionPage(page, None)
        return SessionPage(page, next_cursor(query, page[-1], str(snapshot)))

    async def delete_owner(self, owner: str) -> int:
        owner = check_owner(owner)
        deleted = 0
        for sid in await self._scan("details"):
            key = self._hot.keys.session(sid).details
            raw = await self._hot.call(
                "hget", functools.partial(_hget, key, "owner"), idempotent=True
            )
            if raw is None or raw.decode() != owner:
                continue
            await self._hot.clear(sid)
            await self._hot.call("del", functools.partial(_delete, key))
            deleted += 1
        return deleted
