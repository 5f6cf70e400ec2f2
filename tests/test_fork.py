"""A forked child of a process that used vel: its own helper thread, pools and clients.

The gunicorn ``--preload`` pattern (and multiprocessing's 'fork' start method, Celery's
prefork pool): the parent imports the app, builds its Agent and may already have used it;
then it forks, and each child serves requests. Failing input 5 of issue 12: the child's
first plain call hung forever (the helper thread did not survive the fork, the cached portal
still pointed at it). The children here are real ``multiprocessing`` 'fork' processes; the
parent checks afterwards that its own connections were left alone.
"""

from __future__ import annotations

import asyncio
import faulthandler
import multiprocessing
import os
import sys
import uuid
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from conftest import model_for, schema_dsn

from vel import Agent, ConfigurationError
from vel.stores.postgres import PostgresStore
from vel.stores.redis import RedisStore
from vel.testing import FakeOpenAIServer

FORK = multiprocessing.get_context("fork")
# Python 3.12+ warns about forking a multi-threaded process: that is the case under test.
pytestmark = pytest.mark.filterwarnings("ignore:This process .* is multi-threaded")
FORKED = r"%s\.\.\.\) was made in the parent of this forked process"


def in_child(work: Callable[[], Any], timeout: float = 60.0) -> Any:
    """Run ``work()`` in a forked child; its result, or its exception raised here."""
    reader, writer = FORK.Pipe(duplex=False)

    def target() -> None:
        # Where a hung child hangs, in the test's output.
        faulthandler.dump_traceback_later(max(1.0, timeout - 5), file=sys.stderr)
        try:
            writer.send(("ok", work()))
        except BaseException as exc:
            writer.send(("error", exc))

    child = FORK.Process(target=target, name="vel-fork-child")
    child.start()
    writer.close()
    try:
        if not reader.poll(timeout):
            raise AssertionError(f"the forked child did not finish within {timeout} s (hung)")
        kind, value = reader.recv()
    finally:
        child.join(10)
        if child.is_alive():
            child.kill()
            child.join()
    assert child.exitcode == 0, child.exitcode
    if kind == "error":
        raise value
    return value


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def plain_calls(agent: Agent, sid: str) -> dict[str, Any]:
    """get, set, get, clear, get: the plain API, as a request handler of a child calls it."""
    ctx = agent.ctxmgr
    seen = ctx.get_session_context(sid)
    ctx.set_session_context(sid, [*seen, user("child")])
    after_set = ctx.get_session_context(sid)
    ctx.clear_session(sid)
    return {"seen": seen, "after_set": after_set, "after_clear": ctx.get_session_context(sid)}


@pytest.mark.parametrize("parent_used", ["plain", "async"])
async def test_a_forked_child_completes_get_set_and_clear(
    storage_mode: str, srv: FakeOpenAIServer, parent_used: str
) -> None:
    """The parent used the plain API (vel's helper thread and its pools exist) or ran turns
    on its own loop (still running when it forks); a 'fork' child then makes the same plain
    calls, and an async turn in an ``asyncio.run`` of its own."""
    sid = f"fork-{uuid.uuid4().hex[:8]}"
    other = f"fork-{uuid.uuid4().hex[:8]}"
    async with Agent(id="f", model=model_for(srv), session_storage=storage_mode) as agent:
        if parent_used == "plain":
            agent.ctxmgr.set_session_context(sid, [user("parent")])
            assert agent.ctxmgr.get_session_context(sid) == [user("parent")]
        else:
            await agent.ctxmgr.aset_session_context(sid, [user("parent")])
            await agent.run({"message": "hello"}, session_id=other)

        async def child_turn() -> tuple[str, list[dict[str, Any]]]:
            async with agent:  # the child's own flusher, drained at the end
                turn = await agent.run({"message": "from the child"}, session_id=other)
                return turn, await agent.ctxmgr.aget_session_context(other)

        def child() -> dict[str, Any]:
            result = plain_calls(agent, sid)
            result["turn"], result["other"] = asyncio.run(child_turn())
            return result

        got = in_child(child)
        assert got["seen"] == [user("parent")]
        assert got["after_set"] == [user("parent"), user("child")]
        assert got["after_clear"] == []
        assert got["turn"]
        assert got["other"][-2:] == [user("from the child"), got["other"][-1]]
        # The parent's own helper thread and connections still work, and see what the child
        # wrote (unless each process has its own memory).
        if storage_mode == "memory":
            assert agent.ctxmgr.get_session_context(sid) == [user("parent")]
        else:
            assert agent.ctxmgr.get_session_context(sid) == []
            assert await agent.ctxmgr.aget_session_context(other) == got["other"]


async def test_a_forked_child_runs_its_own_flusher(
    pg_dsn: str, migrated_schema: str, redis_url: str, key_prefix: str, srv: FakeOpenAIServer
) -> None:
    """'redis' mode: the parent's embedded flusher runs on the parent's loop, which no thread
    of the child runs; the child writes behind through a flusher of its own, which its
    ``aclose()`` drains (the parent, blocked waiting for the child, flushes nothing)."""
    dsn = schema_dsn(pg_dsn, migrated_schema)
    os.environ.update(POSTGRES_DSN=dsn, REDIS_URL=redis_url, VEL_KEY_PREFIX=key_prefix)
    try:
        agent = Agent(id="f", model=model_for(srv), session_storage="redis")
        await agent.run({"message": "parent"}, session_id=f"p-{uuid.uuid4().hex[:8]}")
        sid = f"c-{uuid.uuid4().hex[:8]}"

        async def child_turn() -> int:
            await agent.run({"message": "child"}, session_id=sid)
            await agent.aclose()
            conn = await asyncpg.connect(dsn)
            try:
                count: int = await conn.fetchval(
                    "SELECT count(*) FROM vel_messages WHERE session_id = $1", sid
                )
            finally:
                await conn.close()
            return count

        assert in_child(lambda: asyncio.run(child_turn())) == 2  # the user message, the answer
        await agent.aclose()
    finally:
        for name in ("POSTGRES_DSN", "REDIS_URL", "VEL_KEY_PREFIX"):
            os.environ.pop(name, None)


async def test_a_forked_child_refuses_the_callers_redis_client(
    redis_url: str, key_prefix: str, srv: FakeOpenAIServer
) -> None:
    """A client the caller made belongs to the parent (its connections too, and vel cannot
    make it anew): the child gets a ConfigurationError saying what to do, not a hang or
    replies meant for the parent. The parent's client still works afterwards."""
    client = aioredis.Redis.from_url(redis_url)
    store = RedisStore(client=client, key_prefix=key_prefix)
    agent = Agent(id="f", model=model_for(srv), session_storage=store)
    sid = f"fork-{uuid.uuid4().hex[:8]}"
    try:
        await agent.ctxmgr.aset_session_context(sid, [user("parent")])
        for call in (
            lambda: agent.ctxmgr.get_session_context(sid),
            lambda: asyncio.run(agent.ctxmgr.aget_session_context(sid)),
        ):
            with pytest.raises(ConfigurationError, match=FORKED % r"RedisStore\(client="):
                in_child(call)
        assert await agent.ctxmgr.aget_session_context(sid) == [user("parent")]
    finally:
        await store.aclose()
        await client.aclose()


async def test_a_forked_child_refuses_the_callers_postgres_pool(
    pg_dsn: str, migrated_schema: str
) -> None:
    """The same for a caller's asyncpg pool."""
    pool = await asyncpg.create_pool(
        pg_dsn, min_size=1, server_settings={"search_path": migrated_schema}
    )
    store = PostgresStore(pool=pool)
    sid = f"fork-{uuid.uuid4().hex[:8]}"
    try:
        await store.append(sid, [user("parent")])
        with pytest.raises(ConfigurationError, match=FORKED % r"PostgresStore\(pool="):
            in_child(lambda: asyncio.run(store.load(sid)))
        assert await store.load(sid) == [user("parent")]
    finally:
        await store.aclose()
        await pool.close()
