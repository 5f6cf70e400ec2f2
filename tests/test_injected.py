"""Caller-supplied Redis clients and asyncpg pools (issue 13, failing input 9): used on their own
event loop in every call path (turns, reads, writes, listing, the flusher, the warm; a Redis
Cluster client too, its scripts loaded), never closed by vel; a call from another loop is sent
to the owner loop while it runs and refused with ConfigurationError naming the fix when it
cannot run there; a client vel cannot use is refused at construction.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest
import redis
import redis.asyncio as aioredis
from conftest import model_for

from vel import Agent, ContextManager
from vel.errors import ConfigurationError
from vel.settings import Settings
from vel.stores.postgres import PostgresStore
from vel.stores.redis import RedisStore
from vel.stores.tiered import TieredStore
from vel.testing import FakeOpenAIServer


def msgs(*texts: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": t} for t in texts]


def test_clients_vel_cannot_use_are_refused_at_construction(redis_url: str) -> None:
    with pytest.raises(ConfigurationError, match="decode_responses=False"):
        RedisStore(client=aioredis.Redis.from_url(redis_url, decode_responses=True))
    sync_client = redis.Redis.from_url(redis_url)
    try:
        with pytest.raises(ConfigurationError, match=r"redis\.asyncio"):
            RedisStore(client=sync_client)  # type: ignore[arg-type]
    finally:
        sync_client.close()
    with pytest.raises(ConfigurationError, match=r"asyncpg\.Pool"):
        PostgresStore(pool=object(), settings=Settings())  # type: ignore[arg-type]


async def test_every_call_path_uses_the_callers_client_and_pool(
    redis_url: str,
    pg_dsn: str,
    migrated_schema: str,
    key_prefix: str,
    srv: FakeOpenAIServer,
) -> None:
    client = aioredis.Redis.from_url(redis_url)
    pool = await asyncpg.create_pool(
        pg_dsn, min_size=1, max_size=4, server_settings={"search_path": migrated_schema}
    )
    try:
        store = TieredStore(
            RedisStore(client=client, key_prefix=key_prefix, write_behind=True, flush_delay=0),
            PostgresStore(pool=pool, settings=Settings()),
            settings=Settings(),
        )
        async with Agent(
            id="inj",
            model=model_for(srv),
            session_storage=store,
            context_manager=ContextManager(max_history=10),
        ) as agent:
            await agent.run({"message": "one"}, session_id="s")  # locked turn, warm, append
            await agent.run({"message": "two"}, session_id="s")
            history = await agent.ctxmgr.aget_session_context("s")
            assert [m["content"] for m in history if m["role"] == "user"] == ["one", "two"]
            assert await store.flush(10)  # the flusher writes through the caller's pool
            await client.delete(*store.hot.keys.session("s").data)
            assert len(await store.load("s")) == 4  # warmed back through the caller's pool
            await agent.ctxmgr.aset_session_context("s", msgs("replaced"))
            assert await store.load("s") == msgs("replaced")
            assert [i.session_id for i in await store.list_sessions()] == ["s"]
            await agent.ctxmgr.aclear_session("s")
            assert await store.load("s") == []
        await store.aclose()
        # Still the caller's, still open.
        assert await client.ping()
        assert await pool.fetchval("SELECT 1") == 1
    finally:
        await client.aclose()
        await pool.close()


async def test_plain_calls_reach_the_owner_loop_while_it_runs(
    redis_url: str, pg_dsn: str, migrated_schema: str, key_prefix: str
) -> None:
    """Sync code on another thread (a thread pool, a sync web handler) calling the plain
    operations of a store whose client and pool belong to a running loop."""
    client = aioredis.Redis.from_url(redis_url)
    pool = await asyncpg.create_pool(
        pg_dsn, min_size=1, max_size=2, server_settings={"search_path": migrated_schema}
    )
    store = TieredStore(
        RedisStore(client=client, key_prefix=key_prefix, write_behind=True, flush_delay=0),
        PostgresStore(pool=pool, settings=Settings()),
        flusher=False,
        settings=Settings(),
    )
    ctx = ContextManager()
    ctx.bind(store)

    def sync_code() -> list[Any]:
        # Plain calls run on vel's helper loop, which sends them to the owner loop.
        ctx.set_session_context("p", msgs("a", "b"))
        seen = [ctx.get_session_context("p")]
        # A second event loop of this thread is sent there too.
        seen.append(asyncio.run(store.load("p")))
        return seen

    try:
        assert await asyncio.to_thread(sync_code) == [msgs("a", "b")] * 2
        assert await store.flush(10)
        assert await asyncio.to_thread(ctx.get_inactive_sessions, None) == ["p"]
        await asyncio.to_thread(ctx.clear_session, "p")
        assert await asyncio.to_thread(ctx.get_session_context, "p") == []
    finally:
        await store.aclose()
        await client.aclose()
        await pool.close()


async def test_a_plain_call_that_would_block_the_owner_loop_is_refused(
    pg_dsn: str, migrated_schema: str
) -> None:
    pool = await asyncpg.create_pool(
        pg_dsn, min_size=2, max_size=2, server_settings={"search_path": migrated_schema}
    )
    try:
        store = PostgresStore(pool=pool, settings=Settings())
        ctx = ContextManager()
        ctx.bind(store)
        await ctx.aset_session_context("b", msgs("kept"))
        # A plain call inside the owner loop would block it: refused, naming the fix.
        with pytest.raises(ConfigurationError) as info:
            ctx.get_session_context("b")
        assert "aget_session_context" in str(info.value)
        # The pool is intact: no connection was killed, the async call works.
        assert pool.get_size() == 2
        assert await ctx.aget_session_context("b") == msgs("kept")
    finally:
        await pool.close()


def test_a_call_after_the_owner_loop_ended_is_refused(redis_url: str, key_prefix: str) -> None:
    async def make() -> tuple[Any, RedisStore]:
        client = aioredis.Redis.from_url(redis_url)
        store = RedisStore(client=client, key_prefix=key_prefix, settings=Settings())
        await store.append("e", msgs("x"))
        return client, store

    _client, store = asyncio.run(make())
    ctx = ContextManager()
    ctx.bind(store)
    with pytest.raises(ConfigurationError) as info:
        ctx.get_session_context("e")
    assert "url=" in str(info.value)


async def test_a_callers_cluster_client(redis_cluster_url: str, key_prefix: str) -> None:
    from redis.asyncio.cluster import ClusterNode, RedisCluster

    seeds = [
        ClusterNode(host, int(port))
        for host, port in (s.rsplit(":", 1) for s in redis_cluster_url.split("://")[1].split(","))
    ]
    cluster = RedisCluster(startup_nodes=seeds)
    try:
        # A fresh cluster may lack vel's scripts: loaded when the store first uses it.
        await cluster.script_flush()
        store = RedisStore(client=cluster, key_prefix=key_prefix, settings=Settings())
        assert store.is_cluster
        for sid in ("c1", "c2", "{7}"):
            await store.append(sid, msgs(sid))
        assert await store.load("c1") == msgs("c1")
        async with store.turn("c2", limit=5) as turn:
            assert turn.window == msgs("c2")
            await turn.commit(msgs("more"))
        assert await store.load("c2") == msgs("c2", "more")
        await store.aclose()
        assert await cluster.ping()
    finally:
        await cluster.aclose()
