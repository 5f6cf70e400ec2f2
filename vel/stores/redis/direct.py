"""Script calls on a plain Redis client, past redis-py's per-command layers.

redis-py's ``Script.__call__`` runs through ``execute_command``: a retry wrapper, operation
metrics, event dispatch, and a pure-Python ``pack_command`` whose cost grows with the argument
count (about 36 us for an append's 30 arguments, where ``hiredis.pack_command`` takes 4 us).
A turn is two script calls, and this path saves about 45 us of client CPU on each
(``benchmarks/turn_cpu.py``). The connection is checked out of the client's own pool, so the
connection budget and ``aclose()`` are redis-py's as before, and errors are redis-py's own
exceptions (vel's pools have no command-level retries to keep). A cluster client, a pipeline
and a single-connection client take redis-py's path.

Checkout and checkin of an idle, connected connection are done in place on the pool's own
idle list and in-use set (:func:`_checkout`, :func:`_checkin`): redis-py 8's
``get_connection``/``release`` take an ``asyncio.Lock``, record pool metrics and dispatch a
release event on every call (about 14% of a turn's client CPU, py-spy), none of which a plain
pool that vel owns uses (no OpenTelemetry pool metrics, credential re-auth or maintenance
notifications). Both are plain list and set operations with no await between them, so they
are atomic on the loop, as redis-py's locked section is. Its stale-data check at checkout is
not needed here: every user of these pools reads its whole reply or is disconnected by
redis-py on the error or cancellation that stopped it. A new connection, a disconnected one,
a connection a maintenance notification marked for reconnection, a caller's
``BlockingConnectionPool`` (its waiters are woken by its own ``release``) and a pool without
those two attributes (another redis-py release) take redis-py's methods.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import hiredis
import redis.asyncio as aioredis
from redis import exceptions as rexc


def _inplace(pool: Any) -> bool:
    # Exactly redis-py's plain pool: a BlockingConnectionPool's waiters are woken only by its
    # own release().
    return (
        type(pool) is aioredis.ConnectionPool
        and isinstance(getattr(pool, "_available_connections", None), list)
        and isinstance(getattr(pool, "_in_use_connections", None), set)
    )


def _checkout(pool: Any) -> Any:
    idle = pool._available_connections
    if idle and idle[-1].is_connected:
        conn = idle.pop()
        pool._in_use_connections.add(conn)
        return conn
    return None


def _checkin(pool: Any, conn: Any) -> bool:
    # A connection a maintenance notification marked for reconnection is release()'s job.
    again = getattr(conn, "should_reconnect", None)
    if conn.is_connected and conn in pool._in_use_connections and not (callable(again) and again()):
        pool._in_use_connections.remove(conn)
        pool._available_connections.append(conn)
        return True
    return False


def _pack(*args: Any) -> bytes:
    # hiredis' stub types its argument as a 1-tuple; it takes any tuple of str, bytes and
    # numbers.
    packed: bytes = hiredis.pack_command(cast(Any, args))
    return packed


_MULTI = b"*1\r\n$5\r\nMULTI\r\n"
_EXEC = b"*1\r\n$4\r\nEXEC\r\n"


class Script:
    """A Lua script registered on ``redis``; called like redis-py's ``AsyncScript``.

    Attributes:
        sha: the script's SHA1 (what EVALSHA names).
        script: its source (what SCRIPT LOAD sends).
    """

    __slots__ = ("_inplace", "_pool", "_registered", "_transactions", "script", "sha")

    def __init__(self, redis: Any, source: str) -> None:
        self._registered = redis.register_script(source)
        self.sha: str = self._registered.sha
        self.script = source
        # Only a plain client that checks a connection out per command can be bypassed.
        plain = isinstance(redis, aioredis.Redis) and not redis.single_connection_client
        self._pool: aioredis.ConnectionPool | None = redis.connection_pool if plain else None
        self._inplace = plain and _inplace(self._pool)
        self._transactions = True

    @property
    def direct(self) -> bool:
        """Whether :meth:`with_tail` may be called: calls bypass redis-py (a plain client)
        and the server has not refused MULTI."""
        return self._pool is not None and self._transactions

    def untransacted(self) -> None:
        """The server refused MULTI (an ACL without it): :attr:`direct` is False from now."""
        self._transactions = False

    async def with_tail(
        self, keys: Sequence[Any], args: Sequence[Any], list_key: str, start: int
    ) -> tuple[Any, list[bytes]]:
        """``MULTI; EVALSHA; LRANGE list_key start -1; EXEC`` in one round trip: the script's
        reply, and the list's items read atomically after it (so what the script changed
        is seen). Only on a :attr:`direct` script.

        Raises:
            redis.exceptions.RedisError: a failed command (after every reply was read, so
                the connection stays usable).
        """
        command = _pack("EVALSHA", self.sha, len(keys), *keys, *args)
        tail = _pack("LRANGE", list_key, start, -1)
        conn = await self._take()
        try:
            for _ in range(2):
                await conn.send_packed_command(_MULTI + command + tail + _EXEC, False)
                # Every reply is read before any error is raised: one left unread would
                # answer the connection's next command.
                error: Exception | None = None
                replies: list[Any] = []
                for _ in range(4):
                    try:
                        replies.append(await conn.read_response())
                    except rexc.ResponseError as exc:
                        error = error or exc
                        replies.append(None)
                if error is not None:
                    raise error
                reply, items = replies[3]
                if not isinstance(reply, rexc.NoScriptError):
                    # EXEC answers each command, an error included, in its array.
                    for part in (reply, items):
                        if isinstance(part, Exception):
                            raise part
                    return reply, items
                # A restarted or flushed server: load it and run again on this connection.
                await conn.send_packed_command(_pack("SCRIPT", "LOAD", self.script), False)
                await conn.read_response()
            raise rexc.NoScriptError("script not loaded after SCRIPT LOAD")
        finally:
            await self._give(conn)

    async def __call__(
        self, keys: Sequence[Any] = (), args: Sequence[Any] = (), client: Any = None
    ) -> Any:
        """EVALSHA (loading the script first if the server lacks it); the reply as redis-py
        returns it (bytes, ints, lists).

        Raises:
            redis.exceptions.RedisError: as redis-py's ``Script.__call__`` raises it.
        """
        if client is not None or self._pool is None:
            return await self._registered(keys=keys, args=args, client=client)
        command = _pack("EVALSHA", self.sha, len(keys), *keys, *args)
        conn = await self._take()
        try:
            await conn.send_packed_command(command, check_health=False)
            try:
                return await conn.read_response()
            except rexc.NoScriptError:
                # A restarted or flushed server: load it and run again on this connection.
                await conn.send_packed_command(_pack("SCRIPT", "LOAD", self.script), False)
                await conn.read_response()
                await conn.send_packed_command(command, check_health=False)
                return await conn.read_response()
        finally:
            # A connection broken mid-call was disconnected by redis-py (its send and read
            # do that on any error, a cancellation included): the next checkout reconnects.
            await self._give(conn)

    async def _take(self) -> Any:
        pool: Any = self._pool  # redis-py's pool methods are untyped
        conn = _checkout(pool) if self._inplace else None
        return conn if conn is not None else await pool.get_connection()

    async def _give(self, conn: Any) -> None:
        pool: Any = self._pool
        if not (self._inplace and _checkin(pool, conn)):
            await pool.release(conn)
