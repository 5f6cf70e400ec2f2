"""What each benchmark mode runs a turn against: vel's stores, the references and the peers.

Every driver does the same work per turn: read the last ``limit`` messages (decoded from
JSON, as any caller needs them) and commit the turn's two messages (encoded to JSON). The
references are the floor each backend allows a Python client: a raw redis-py pipeline
(LRANGE + RPUSH in one round trip, no ids, no dirty marks, no durability) and a raw asyncpg
window read plus one-statement append (no ids, no idempotence, no lock). ``proto-redis`` is
the prototype of the minimal locked turn (:mod:`benchmarks.prototype`); the peers are the
OpenAI Agents SDK's session stores (:mod:`benchmarks.peers`).

The ``-lock`` modes run every turn as the Agent does, under the session's turn lock
(``redis-lock``: ``TieredStore.turn`` with the embedded flusher; ``database-lock``: the
Postgres lease row around the read and the append); the plain modes read and append unlocked.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Protocol

import asyncpg
import redis.asyncio as aioredis

from benchmarks.peers import PEERS, SdkRedisDriver, SdkSqlAlchemyDriver
from benchmarks.prototype import ProtoRedisDriver
from vel.messages import Message
from vel.stores.base import SessionStore
from vel.stores.memory import MemoryStore
from vel.stores.postgres import PostgresStore
from vel.stores.redis import RedisStore
from vel.stores.tiered import TieredStore

STORE_MODES = ("memory", "database", "database-lock", "redis", "redis-lock", "redis-only")
REFERENCES = ("ref-redis", "ref-redis-2rt", "ref-asyncpg", "proto-redis")
ALL_MODES = STORE_MODES + REFERENCES + PEERS
POSTGRES_MODES = frozenset(
    {"database", "database-lock", "redis", "redis-lock", "ref-asyncpg", "sdk-sqlalchemy"}
)
REDIS_MODES = frozenset(
    {"redis", "redis-lock", "redis-only", "ref-redis", "ref-redis-2rt", "proto-redis", "sdk-redis"}
)
# A -lock mode is its base mode's store, every turn under the turn lock.
LOCKED = {"database-lock": "database", "redis-lock": "redis", "proto-redis": "proto-redis"}


def base_mode(mode: str) -> str:
    """The store a mode runs on (``redis-lock`` -> ``redis``)."""
    return LOCKED.get(mode, mode)


class Driver(Protocol):
    async def open(self) -> None: ...

    async def turn(self, session_id: str, messages: Sequence[Message], limit: int) -> int:
        """Read the window, commit ``messages``; return the last seq (0 if not known)."""
        ...

    async def locked_turn(self, session_id: str, messages: Sequence[Message], limit: int) -> str:
        """The same under the session's turn lock; return the last message's content ('')."""
        ...

    async def history(self, session_id: str) -> list[Message]: ...

    async def aclose(self) -> None: ...


class StoreDriver:
    """A turn against a vel store, as the Agent drives it."""

    def __init__(self, store: SessionStore) -> None:
        self.store = store

    async def open(self) -> None:
        # Connect (pools are per event loop) before the clock starts.
        await self.store.load("bench-warmup", limit=1)

    async def turn(self, session_id: str, messages: Sequence[Message], limit: int) -> int:
        await self.store.load(session_id, limit=limit)
        return await self.store.append(session_id, messages)

    async def locked_turn(self, session_id: str, messages: Sequence[Message], limit: int) -> str:
        # As the Agent does it: a store with turn() takes the lock with the read and
        # releases it with the append; the others lock around a separate read and append.
        locked_turns = getattr(self.store, "turn", None)
        if callable(locked_turns):
            async with locked_turns(session_id, limit, 60.0) as turn:
                window = turn.window
                await turn.commit(messages)
        else:
            async with self.store.turn_lock(session_id, 60.0):
                window = await self.store.load(session_id, limit=limit)
                await self.store.append(session_id, messages)
        return str(window[-1]["content"]) if window else ""

    async def history(self, session_id: str) -> list[Message]:
        return await self.store.load(session_id)

    async def aclose(self) -> None:
        await self.store.aclose()


class RedisReference:
    """The ceiling: one redis-py pipeline per turn (LRANGE + RPUSH), JSON in and out.

    With ``pipelined=False`` the read and the write are two calls, as in a real turn, where
    the model runs between them: the ceiling for anything that reads, then commits.
    """

    def __init__(self, url: str, prefix: str, *, pipelined: bool = True) -> None:
        self.redis = aioredis.Redis.from_url(url)
        self.prefix = prefix
        self.pipelined = pipelined

    async def open(self) -> None:
        await self.redis.ping()

    async def turn(self, session_id: str, messages: Sequence[Message], limit: int) -> int:
        key = f"{self.prefix}:ref:{session_id}"
        if not self.pipelined:
            items = await self.redis.lrange(key, -limit, -1)
            [json.loads(item) for item in items]
            encoded = (json.dumps(m, separators=(",", ":")) for m in messages)
            return int(await self.redis.rpush(key, *encoded))
        pipe = self.redis.pipeline(transaction=False)
        pipe.lrange(key, -limit, -1)
        pipe.rpush(key, *(json.dumps(m, separators=(",", ":")) for m in messages))
        window, seq = await pipe.execute()
        [json.loads(item) for item in window]
        return int(seq)

    async def locked_turn(self, session_id: str, messages: Sequence[Message], limit: int) -> str:
        raise NotImplementedError("the references take no lock")

    async def history(self, session_id: str) -> list[Message]:
        items = await self.redis.lrange(f"{self.prefix}:ref:{session_id}", 0, -1)
        return [json.loads(item) for item in items]

    async def aclose(self) -> None:
        await self.redis.aclose()


_PG_REF_TABLE = """
CREATE TABLE "{schema}".ref_messages (
    session_id text NOT NULL,
    seq integer NOT NULL,
    message jsonb NOT NULL,
    PRIMARY KEY (session_id, seq)
)"""


async def create_reference_table(conn: asyncpg.Connection, schema: str) -> None:
    """Create the raw asyncpg reference's table (once, before its workers start)."""
    await conn.execute(_PG_REF_TABLE.format(schema=schema))


_PG_REF_WINDOW = (
    'SELECT message FROM "{schema}".ref_messages WHERE session_id = $1 ORDER BY seq DESC LIMIT $2'
)
_PG_REF_APPEND = """
INSERT INTO "{schema}".ref_messages (session_id, seq, message)
SELECT $1, coalesce((SELECT max(seq) FROM "{schema}".ref_messages WHERE session_id = $1), 0)
       + u.n, u.m::jsonb
FROM unnest($2::text[]) WITH ORDINALITY AS u(m, n)"""


class PostgresReference:
    """The floor for Postgres: one window SELECT and one INSERT per turn on a raw pool."""

    def __init__(self, dsn: str, schema: str, pool_max: int) -> None:
        self.dsn = dsn
        self.schema = schema
        self.pool_max = pool_max
        self.pool: asyncpg.Pool | None = None

    async def open(self) -> None:
        self.pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=self.pool_max)

    async def turn(self, session_id: str, messages: Sequence[Message], limit: int) -> int:
        assert self.pool is not None
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(_PG_REF_WINDOW.format(schema=self.schema), session_id, limit)
            [json.loads(r[0]) for r in reversed(rows)]
            texts = [json.dumps(m, separators=(",", ":")) for m in messages]
            await conn.execute(_PG_REF_APPEND.format(schema=self.schema), session_id, texts)
        return 0

    async def locked_turn(self, session_id: str, messages: Sequence[Message], limit: int) -> str:
        raise NotImplementedError("the references take no lock")

    async def history(self, session_id: str) -> list[Message]:
        assert self.pool is not None
        rows = await self.pool.fetch(
            f'SELECT message FROM "{self.schema}".ref_messages WHERE session_id = $1 ORDER BY seq',
            session_id,
        )
        return [json.loads(r[0]) for r in rows]

    async def aclose(self) -> None:
        if self.pool is not None:
            await self.pool.close()


def make_driver(mode: str, spec: dict[str, Any]) -> Driver:
    """Build ``mode``'s driver from a worker spec (dsn, schema, redis_url, prefix, pool)."""
    dsn, schema = spec.get("dsn"), spec.get("schema")
    url, prefix = spec.get("redis_url"), spec.get("prefix")
    pool = int(spec.get("pool_max", 20))
    mode = base_mode(mode)
    if mode == "memory":
        return StoreDriver(MemoryStore())
    if mode == "database":
        return StoreDriver(PostgresStore(dsn, schema=schema, pool_max=pool))
    if mode == "redis":
        return StoreDriver(
            TieredStore(
                RedisStore(url, key_prefix=prefix, write_behind=True, pool_max=pool),
                PostgresStore(dsn, schema=schema, pool_max=pool),
                flusher=True,
            )
        )
    if mode == "redis-only":
        return StoreDriver(RedisStore(url, key_prefix=prefix, write_behind=False, pool_max=pool))
    if mode == "ref-redis":
        assert url is not None and prefix is not None
        return RedisReference(url, prefix)
    if mode == "ref-redis-2rt":
        assert url is not None and prefix is not None
        return RedisReference(url, prefix, pipelined=False)
    if mode == "ref-asyncpg":
        assert dsn is not None and schema is not None
        return PostgresReference(dsn, schema, pool)
    if mode == "proto-redis":
        assert url is not None and prefix is not None
        return ProtoRedisDriver(url, prefix, pool)
    if mode == "sdk-redis":
        assert url is not None and prefix is not None
        return SdkRedisDriver(url, prefix)
    if mode == "sdk-sqlalchemy":
        assert dsn is not None and schema is not None
        return SdkSqlAlchemyDriver(dsn, schema, pool)
    raise ValueError(f"unknown mode {mode!r}")
