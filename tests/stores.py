"""Builders of every shipped store against the real local servers, for shared test suites."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from vel.stores.base import SessionStore
from vel.stores.memory import MemoryStore
from vel.stores.redis import RedisStore

STORE_KINDS = ["memory", "postgres", "redis", "tiered", "redis-cluster", "tiered-cluster"]
# Kinds whose Redis is the session's local Redis Cluster (``redis_cluster_url``).
CLUSTER_KINDS = {"redis-cluster", "tiered-cluster"}


@asynccontextmanager
async def make_store(
    kind: str, *, pg_dsn: str, schema: str, redis_url: str, prefix: str, **options: Any
) -> AsyncIterator[SessionStore]:
    store: SessionStore
    kind = kind.removesuffix("-cluster")  # the caller passes the cluster's URL as redis_url
    if kind == "memory":
        store = MemoryStore()
    elif kind == "postgres":
        from vel.stores.postgres import PostgresStore

        store = PostgresStore(pg_dsn, schema=schema)
    elif kind == "redis":
        store = RedisStore(redis_url, key_prefix=prefix, write_behind=False, **options)
    elif kind == "tiered":
        from vel.stores.postgres import PostgresStore
        from vel.stores.tiered import TieredStore

        store = TieredStore(
            RedisStore(redis_url, key_prefix=prefix, write_behind=True, **options),
            PostgresStore(pg_dsn, schema=schema),
        )
    else:
        raise ValueError(kind)
    try:
        yield store
    finally:
        await store.aclose()


async def sql(dsn: str, schema: str, query: str, *args: Any) -> list[Any]:
    """Rows of ``query`` run in ``schema`` on a connection of its own."""
    import asyncpg

    conn = await asyncpg.connect(dsn, server_settings={"search_path": schema})
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()
