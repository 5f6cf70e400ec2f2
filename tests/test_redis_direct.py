"""Script calls past redis-py's per-command layers (vel.stores.redis.direct, issue 14): the
same replies and errors as redis-py's own path, a script the server lost is loaded again, a
call cancelled mid-flight never leaves its reply for the next caller, the connection budget
holds, and clients that cannot take this path use redis-py's."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import pytest
import redis.asyncio as aioredis
from redis import exceptions as rexc
from servers import RedisServer

from vel.stores.redis.direct import Script

MIXED = """
if ARGV[1] == 'fail' then return redis.error_reply('VELTEST refused ' .. KEYS[1]) end
redis.call('RPUSH', KEYS[1], unpack(ARGV))
return {redis.call('LLEN', KEYS[1]), ARGV[1], false, {1, 'two'}, tonumber(ARGV[2])}
"""
# Spins ARGV[1] iterations inside Redis (Lua has no sleep; 200000 take a millisecond or
# two), then echoes ARGV[2].
SLOW_ECHO = """
local n = 0
for i = 1, tonumber(ARGV[1]) do n = n + i end
return ARGV[2]
"""
ECHO = "return ARGV[1]"


@asynccontextmanager
async def _pooled(
    url: str, size: int
) -> AsyncIterator[tuple[aioredis.ConnectionPool, aioredis.Redis]]:
    # A plain pool of ``size`` connections, as vel's clients have (in-place checkout).
    pool = aioredis.ConnectionPool.from_url(url, max_connections=size)
    client = aioredis.Redis.from_pool(pool)
    try:
        yield pool, client
    finally:
        await client.aclose()


@pytest.fixture
def server() -> Iterator[RedisServer]:
    # A private server: the test flushes its scripts, which must not touch the shared one.
    with RedisServer() as srv:
        yield srv


async def test_replies_and_errors_match_redis_py(redis_url: str, key_prefix: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        direct = Script(client, MIXED)
        plain = client.register_script(MIXED)
        key = f"{key_prefix}:list"
        for value in ("a", "b\n\u00e9", "1" * 5000):
            args = [value, "7"]
            mine = await direct(keys=[key], args=args)
            theirs = await plain(keys=[key], args=args)
            # The same shape and types; only the list's length moved on (two items a call).
            assert mine[1:] == theirs[1:] == [value.encode(), None, [1, b"two"], 7]
            assert theirs[0] == mine[0] + 2
        with pytest.raises(rexc.ResponseError, match="VELTEST refused") as mine_err:
            await direct(keys=[key], args=["fail", "0"])
        with pytest.raises(rexc.ResponseError, match="VELTEST refused") as theirs_err:
            await plain(keys=[key], args=["fail", "0"])
        assert type(mine_err.value) is type(theirs_err.value)
        assert str(mine_err.value) == str(theirs_err.value)
        # The connection that carried the error is clean: the next call's reply is its own.
        assert (await direct(keys=[key], args=["after", "1"]))[1] == b"after"
    finally:
        await client.aclose()


async def test_a_script_the_server_lost_is_loaded_again(server: RedisServer) -> None:
    client = aioredis.Redis.from_url(server.url)
    try:
        echo = Script(client, ECHO)
        assert await echo(args=["one"]) == b"one"
        await client.script_flush()
        assert await echo(args=["two"]) == b"two"
        server.restart()  # a restarted server has no scripts and the pool's sockets broke
        for attempt in range(3):
            try:
                assert await echo(args=["three"]) == b"three"
                break
            except rexc.ConnectionError:
                # A pooled socket is found broken once (as on redis-py's own path); the
                # next call reconnects.
                assert attempt < 2
    finally:
        await client.aclose()


async def test_cancelled_calls_never_hand_their_reply_to_the_next_caller(
    server: RedisServer,
) -> None:
    async with _pooled(server.url, 4) as (pool, client):
        slow = Script(client, SLOW_ECHO)
        echo = Script(client, ECHO)
        rng = random.Random(14)
        gate = asyncio.Semaphore(4)  # vel's Client gate: the pool is never asked for a fifth

        cut = 0

        async def one(i: int) -> None:
            nonlocal cut
            async with gate:
                if rng.random() < 0.5:
                    # Cut off at a random point: before the send, between send and reply,
                    # or not at all; a reply that arrives is this call's own.
                    try:
                        async with asyncio.timeout(rng.uniform(0.0, 0.004)):
                            reply = await slow(args=[200000, f"slow{i}"])
                        assert reply == f"slow{i}".encode()
                    except TimeoutError:
                        cut += 1
                else:
                    assert await echo(args=[f"echo{i}"]) == f"echo{i}".encode()

        await asyncio.gather(*(one(i) for i in range(200)))
        assert cut > 10
        # Every later call still gets its own reply, on at most the budget's connections.
        for i in range(20):
            assert await echo(args=[f"after{i}"]) == f"after{i}".encode()
        assert len(pool._in_use_connections) == 0
        assert len(pool._available_connections) <= 4


async def test_clients_that_cannot_take_the_direct_path_use_redis_py(redis_url: str) -> None:
    single = aioredis.Redis.from_url(redis_url, single_connection_client=True)
    try:
        echo = Script(single, ECHO)
        assert echo._pool is None
        assert await echo(args=["x"]) == b"x"
        pipe = single.pipeline(transaction=False)
        await echo(args=["y"], client=pipe)
        assert await pipe.execute() == [b"y"]
    finally:
        await single.aclose()


async def test_in_place_checkout_shares_the_pool_with_redis_py_commands(
    server: RedisServer,
) -> None:
    # The installed redis-py has the idle list and in-use set the in-place checkout works
    # on: if a release renames them, this fails instead of the turn silently slowing down.
    async with _pooled(server.url, 3) as (pool, client):
        echo = Script(client, ECHO)
        assert echo._inplace
        gate = asyncio.Semaphore(3)
        rng = random.Random(7)

        async def one(i: int) -> None:
            async with gate:
                if rng.random() < 0.5:
                    assert await echo(args=[f"e{i}"]) == f"e{i}".encode()
                else:
                    assert await client.echo(f"p{i}") == f"p{i}".encode()

        await asyncio.gather(*(one(i) for i in range(300)))
        # Both paths checked connections in and out of one budget: none is lost or twice.
        idle = pool._available_connections
        assert len(pool._in_use_connections) == 0
        assert len(idle) == len(set(map(id, idle))) <= 3
        # Connections closed while idle (aclose() of the pool's sockets, a server that hung
        # up) are not handed out as they are: the call reconnects through redis-py.
        await pool.disconnect()
        assert await echo(args=["again"]) == b"again"
        killed = await client.client_kill_filter(_type="normal", skipme=False)
        assert killed >= 1
        for attempt in range(3):
            try:
                assert await echo(args=["after kill"]) == b"after kill"
                break
            except rexc.ConnectionError:
                assert attempt < 2  # a socket found broken once, as on redis-py's path
        assert len(pool._in_use_connections) == 0


async def test_a_blocking_pool_keeps_redis_py_checkout_and_wakes_its_waiters(
    redis_url: str,
) -> None:
    # A caller's BlockingConnectionPool wakes a waiter only from its own release(): with
    # one connection and eight callers, an in-place checkin would leave seven waiting.
    pool = aioredis.BlockingConnectionPool.from_url(redis_url, max_connections=1, timeout=5)
    client = aioredis.Redis.from_pool(pool)
    try:
        echo = Script(client, ECHO)
        assert not echo._inplace
        async with asyncio.timeout(10):
            replies = await asyncio.gather(*(echo(args=[f"b{i}"]) for i in range(8)))
        assert replies == [f"b{i}".encode() for i in range(8)]
    finally:
        await client.aclose()


async def test_a_script_and_a_list_read_in_one_transaction(server: RedisServer) -> None:
    """``with_tail`` (a window's header script and its LRANGE in one MULTI/EXEC): the
    script's reply and the items as the script left them; a lost script is loaded again;
    an error reply of either command is raised only once every reply was read, so the
    single connection's next call gets its own reply."""
    async with _pooled(server.url, 1) as (_, client):
        mixed = Script(client, MIXED)
        assert mixed.direct
        reply, items = await mixed.with_tail(["l"], ["a", "5"], "l", -2)
        assert reply == [2, b"a", None, [1, b"two"], 5] and items == [b"a", b"5"]
        reply, items = await mixed.with_tail(["l"], ["b", "6"], "l", 0)
        assert reply[0] == 4 and items == [b"a", b"5", b"b", b"6"]
        await client.script_flush()
        reply, items = await mixed.with_tail(["l"], ["c", "7"], "l", -1)
        assert reply[0] == 6 and items == [b"7"]
        with pytest.raises(rexc.ResponseError, match="VELTEST refused"):
            await mixed.with_tail(["l"], ["fail", "0"], "l", 0)
        await client.set("s", "a string")
        with pytest.raises(rexc.ResponseError, match="WRONGTYPE"):
            await mixed.with_tail(["l"], ["d", "8"], "s", 0)
        # The RPUSH ran (a transaction is not rolled back), and nothing is left unread.
        reply, items = await mixed.with_tail(["l"], ["e", "9"], "l", -2)
        assert reply[0] == 10 and items == [b"e", b"9"]
        assert await client.llen("l") == 10


async def test_a_cancelled_transaction_never_hands_its_replies_to_the_next_caller(
    server: RedisServer,
) -> None:
    async with _pooled(server.url, 2) as (_, client):
        slow = Script(client, SLOW_ECHO)
        gate = asyncio.Semaphore(2)
        rng = random.Random(15)
        await client.rpush("l", "x")
        cut = 0

        async def one(i: int) -> None:
            nonlocal cut
            async with gate:
                try:
                    async with asyncio.timeout(rng.uniform(0.0, 0.004)):
                        reply, items = await slow.with_tail([], [200000, f"s{i}"], "l", 0)
                    assert (reply, items) == (f"s{i}".encode(), [b"x"])
                except TimeoutError:
                    cut += 1

        await asyncio.gather(*(one(i) for i in range(100)))
        assert cut > 5
        for i in range(10):
            assert await slow.with_tail([], [1, f"after{i}"], "l", 0) == (
                f"after{i}".encode(),
                [b"x"],
            )
