"""Listing the sessions held in Redis (Redis-only mode's ``list_sessions``): a SCAN over the
meta keys of one key prefix."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from vel.stores.base import SessionInfo
from vel.stores.redis.client import Client, Connector
from vel.stores.redis.keys import KeyLayout


async def scan_sessions(
    redis: Connector, keys: KeyLayout, inactive_for: float | None, limit: int
) -> list[SessionInfo]:
    """Sessions with messages, least recently updated first (see ``RedisStore.list_sessions``)."""

    async def run(c: Client) -> list[tuple[str, list[Any], int]]:
        found: list[tuple[str, list[Any], int]] = []
        async for raw in c.redis.scan_iter(match=keys.meta_pattern, count=1000):
            key = raw.decode()
            sid = keys.session_id_of(key)
            if sid is None or keys.session(sid).meta != key:
                continue
            meta = await c.redis.hmget(key, "seq", "created", "updated")
            ttl = await c.redis.pttl(key)
            if meta[0] is not None and int(meta[0]) > 0:
                found.append((sid, meta, ttl))
        return found

    now = time.time()
    infos = []
    for sid, meta, ttl in await redis.call("scan", run, idempotent=True):
        updated = int(meta[2] or meta[1] or 0) / 1000
        if inactive_for is not None and now - updated < inactive_for:
            continue
        infos.append(
            SessionInfo(
                session_id=sid,
                message_count=int(meta[0]),
                created_at=datetime.fromtimestamp(int(meta[1] or 0) / 1000, UTC),
                updated_at=datetime.fromtimestamp(updated, UTC),
                expires_at=None if ttl < 0 else datetime.fromtimestamp(now + ttl / 1000, UTC),
            )
        )
    infos.sort(key=lambda i: i.updated_at)
    return infos[:limit]
