"""Peers: the OpenAI Agents SDK's own session stores, driven with the same turn as vel's modes.

``sdk-redis`` is ``agents.extensions.memory.RedisSession`` (one redis-py client per process,
one session object per conversation, as its docs show); ``sdk-sqlalchemy`` is
``SQLAlchemySession`` on Postgres through SQLAlchemy's asyncpg driver. A turn is
``get_items(limit)`` then ``add_items([user, assistant])``. Neither takes a lock across
processes (the SDK serialises calls on one session object within a process only), writes
behind, or keeps a replay record, so they are peers for speed, not for guarantees.

They come with the ``bench`` extra (``pip install -e '.[bench]'``: ``openai-agents[redis,
sqlalchemy]``); without it the bench leaves them out and says so.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from vel.messages import Message

PEERS = ("sdk-redis", "sdk-sqlalchemy")
# A conversation touched before the clock starts (connecting, and creating the tables).
_SETUP_SESSION = "bench-setup"


def available() -> bool:
    """Whether the SDK and its Redis and SQLAlchemy extras are installed."""
    return all(importlib.util.find_spec(m) is not None for m in ("agents", "sqlalchemy"))


def sqlalchemy_url(dsn: str) -> str:
    """``postgresql://...`` as SQLAlchemy's asyncpg URL."""
    parts = urlsplit(dsn)
    return urlunsplit(("postgresql+asyncpg", *parts[1:]))


def _engine(dsn: str, schema: str, pool_max: int) -> Any:
    from sqlalchemy.ext.asyncio import create_async_engine

    # The same connection budget as vel's pool, and the run's own schema.
    return create_async_engine(
        sqlalchemy_url(dsn),
        pool_size=pool_max,
        max_overflow=0,
        connect_args={"server_settings": {"search_path": f'"{schema}"'}},
    )


async def create_sqlalchemy_tables(dsn: str, schema: str) -> None:
    """Create the SDK's tables in ``schema`` once, before any worker starts."""
    from agents.extensions.memory.sqlalchemy_session import SQLAlchemySession

    engine = _engine(dsn, schema, 1)
    try:
        await SQLAlchemySession(_SETUP_SESSION, engine=engine, create_tables=True).get_items()
    finally:
        await engine.dispose()


class _SdkDriver:
    """The turn every SDK session store gets: read the window, add the turn's items."""

    def session(self, session_id: str) -> Any:
        raise NotImplementedError

    async def open(self) -> None:
        await self.session(_SETUP_SESSION).get_items(1)

    async def turn(self, session_id: str, messages: Sequence[Message], limit: int) -> int:
        s = self.session(session_id)
        await s.get_items(limit)
        await s.add_items(list(messages))
        return 0

    async def locked_turn(self, session_id: str, messages: Sequence[Message], limit: int) -> str:
        raise NotImplementedError("the SDK's sessions take no turn lock")

    async def history(self, session_id: str) -> list[Message]:
        return list(await self.session(session_id).get_items())


class SdkRedisDriver(_SdkDriver):
    """A turn on the SDK's ``RedisSession``."""

    def __init__(self, url: str, prefix: str) -> None:
        import redis.asyncio as aioredis

        self.redis = aioredis.Redis.from_url(url)
        self.prefix = f"{prefix}:sdk"
        self.sessions: dict[str, Any] = {}

    def session(self, session_id: str) -> Any:
        s = self.sessions.get(session_id)
        if s is None:
            from agents.extensions.memory.redis_session import RedisSession

            s = self.sessions[session_id] = RedisSession(
                session_id, redis_client=self.redis, key_prefix=self.prefix
            )
        return s

    async def aclose(self) -> None:
        await self.redis.aclose()


class SdkSqlAlchemyDriver(_SdkDriver):
    """A turn on the SDK's ``SQLAlchemySession`` (Postgres via asyncpg)."""

    def __init__(self, dsn: str, schema: str, pool_max: int) -> None:
        self.engine = _engine(dsn, schema, pool_max)
        self.sessions: dict[str, Any] = {}

    def session(self, session_id: str) -> Any:
        s = self.sessions.get(session_id)
        if s is None:
            from agents.extensions.memory.sqlalchemy_session import SQLAlchemySession

            s = self.sessions[session_id] = SQLAlchemySession(session_id, engine=self.engine)
        return s

    async def aclose(self) -> None:
        await self.engine.dispose()
