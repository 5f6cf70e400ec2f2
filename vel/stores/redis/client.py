"""The one place a Redis connection lives and every Redis call is bounded.

:class:`Connector` parses the URL (standalone, TLS, unix socket, or a cluster's seeds), builds
one client per event loop with every Lua script registered (:class:`Client`), and runs every
Redis operation of the store's parts through :meth:`Connector.call`, which bounds it by
``op_timeout`` and translates redis-py's errors exactly once, by the mapping of
:mod:`vel.stores.redis.errormap` (DESIGN.md 3.7: timeouts on every network call). Times go to
Redis as integer milliseconds (:func:`ms`, :func:`now_ms`).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from vel._loops import CallerOwned, PerLoop
from vel._shield import CancelWatch
from vel.errors import (
    ConfigurationError,
    StoreTimeoutError,
    StoreUnavailableError,
    VelError,
)
from vel.redaction import redact
from vel.stores.redis import editscripts, errormap, lockscripts
from vel.stores.redis import scripts as lua
from vel.stores.redis import wbscripts as wbs
from vel.stores.redis.direct import Script
from vel.stores.redis.url import RedisURL, parse_redis_url

T = TypeVar("T")


def cluster_seeds(url: str) -> tuple[list[tuple[str, int]], str | None, str | None, bool]:
    """(seed nodes, username, password, TLS) of a ``redis+cluster://`` URL (see
    :mod:`vel.stores.redis.url`). Any one reachable seed is enough: the client discovers the
    other nodes from it.

    Raises:
        ConfigurationError: not a valid cluster URL.
    """
    parsed = parse_redis_url(url)
    if not parsed.cluster:
        raise ConfigurationError(f"not a cluster REDIS_URL (redis+cluster://...): {redact(url)!r}")
    return parsed.hosts, parsed.username, parsed.password, parsed.tls


def check_injected(client: object) -> None:
    """Refuse a caller's Redis client vel cannot use, naming the fix.

    Raises:
        ConfigurationError: not a ``redis.asyncio`` client, or one that decodes replies.
    """
    if not isinstance(client, (aioredis.Redis, RedisCluster)):
        raise ConfigurationError(
            "RedisStore(client=...) takes a redis.asyncio.Redis or "
            f"redis.asyncio.RedisCluster, got {type(client).__name__} (a synchronous "
            "client cannot serve an async store): pass url= instead"
        )
    if client.get_encoder().decode_responses:
        raise ConfigurationError(
            "RedisStore(client=...) needs a client made with decode_responses=False (vel "
            "stores messages as bytes): create it without decode_responses, or pass url="
        )


def ms(seconds: float | None) -> int:
    """Seconds as Redis takes them: integer ms, at least 1 (0 or None: 0, meaning none)."""
    return 0 if not seconds else max(1, int(seconds * 1000))


def now_ms() -> int:
    return int(time.time() * 1000)


class Client:
    """One loop's Redis client and its registered scripts."""

    def __init__(self, redis: aioredis.Redis | RedisCluster, *, gate: int = 0) -> None:
        self.redis = redis
        # redis-py's plain pools fail (rather than wait) when full (a cluster client's
        # failure also makes it rediscover the cluster): calls wait here instead, so no
        # server or node ever sees more than ``gate`` connections from this client (0: no
        # gate).
        self.cluster = isinstance(redis, RedisCluster)
        self.gate = asyncio.Semaphore(gate) if gate > 0 else None
        # Turns blocked on a lock's wake list (BLPOP) hold a connection each: at most half
        # the budget, so the holders' commits always find one; other waiters poll.
        self.waiters = asyncio.Semaphore(max(1, gate // 2) if gate > 0 else 8)
        self.scripts: list[Script] = []
        self.load = self._register(lua.LOAD)
        self.head = self._register(lua.HEAD)
        self.take = self._register(lockscripts.TAKE_LOCK)
        self.lock_load = self._register(lockscripts.LOCK_LOAD)
        self.lock_head = self._register(lockscripts.LOCK_HEAD)
        self.append = self._register(lua.APPEND)
        self.seed = self._register(lua.SEED)
        self.extend = self._register(editscripts.EXTEND)
        self.replace = self._register(editscripts.REPLACE)
        self.pop = self._register(editscripts.POP)
        self.renew_claims = self._register(wbs.RENEW_CLAIMS)
        self.flush_read = self._register(wbs.READ)
        self.flush_ack = self._register(wbs.ACK)
        self.conflict = self._register(editscripts.CONFLICT)
        self.resolved = self._register(editscripts.RESOLVED)
        self.copy = self._register(editscripts.COPY)
        self.renew = self._register(lockscripts.RENEW_LOCK)
        self.release = self._register(lockscripts.RELEASE_LOCK)
        self.abandon = self._register(lockscripts.ABANDON_LOCK)
        self.drop_clean = self._register(editscripts.DROP_CLEAN)

    def _register(self, source: str) -> Script:
        script = Script(self.redis, source)
        self.scripts.append(script)
        return script

    def queue(self, pipe: Any, script: Script, keys: list[str], args: list[Any]) -> None:
        """Add one script call to a non-transactional pipeline, as a plain EVALSHA. Not
        redis-py's script objects: with one queued, a pipeline first asks ``SCRIPT EXISTS``,
        a round trip of its own on every execution (and a cancellation during it left the
        pipeline holding its connection: "Unclosed Pipeline client"). A server that lacks
        the script is :meth:`Connector.pipelined`'s to handle; a cluster pipeline routes the
        raw command by its keys like any other."""
        pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)

    async def load_scripts(self) -> None:
        """Load every script on every master (a cluster's pipelines cannot load them, and a
        promoted replica may lack them)."""
        for script in self.scripts:
            await self.redis.script_load(script.script)


class Connector:
    """A :class:`Client` per event loop (or the caller's client) and the one error mapping.

    Args:
        url: the REDIS_URL (ignored when ``injected`` is given).
        injected: the caller's ``redis.asyncio.Redis`` or ``RedisCluster``: never closed
            here, used on its own event loop (calls from other loops are sent there, see
            :class:`~vel._loops.CallerOwned`).
        op_timeout: socket timeout of every call, and the bound of :meth:`call`.
        pool_max: connections per event loop (per node on a cluster).
    """

    def __init__(
        self,
        url: str,
        *,
        injected: aioredis.Redis | RedisCluster | None,
        op_timeout: float,
        pool_max: int,
    ) -> None:
        self.url = url
        self.op_timeout = op_timeout
        self.pool_max = pool_max
        self._injected = injected
        self.parsed: RedisURL | None = None
        self._owner: CallerOwned | None = None
        if injected is None:
            self.parsed = parse_redis_url(url)
        else:
            check_injected(injected)
            self._owner = CallerOwned(
                "RedisStore(client=...)",
                "give RedisStore a url= instead (vel then opens a client per event loop)",
            )
        self._clients: PerLoop[Client] = PerLoop(self._connect, self._disconnect)
        self.retries = 0  # idempotent calls retried through a cluster failover
        self._injected_client: Client | None = None
        self._injected_lock: asyncio.Lock | None = None

    @property
    def is_cluster(self) -> bool:
        if self._injected is not None:
            return isinstance(self._injected, RedisCluster)
        assert self.parsed is not None
        return self.parsed.cluster

    @property
    def where(self) -> str:
        """The server, for messages (never with credentials)."""
        return "the caller's Redis client" if self._injected is not None else redact(self.url)

    async def _connect(self) -> Client:
        assert self.parsed is not None
        if self.parsed.cluster:
            return await self._connect_cluster(self.parsed)
        # A plain pool behind the client's gate: a burst of callers waits for a permit
        # (within its call's deadline) instead of failing with "Too many connections", at a
        # fraction of a BlockingConnectionPool's checkout cost (its condition variable and
        # per-checkout health check). call()'s deadline is the one timeout of a call, so no
        # socket timeout nests another scope in each read (a connection broken while idle
        # fails on use and redis-py reconnects).
        pool = aioredis.ConnectionPool(
            max_connections=self.pool_max,
            socket_connect_timeout=self.op_timeout,
            # redis-py 8 defaults to 5 s, which costs a wait_for (a task on 3.11) per send.
            socket_timeout=None,
            **self.parsed.connection_kwargs(),
        )
        return Client(aioredis.Redis.from_pool(pool), gate=self.pool_max)

    async def _connect_cluster(self, parsed: RedisURL) -> Client:
        cluster = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in parsed.hosts],
            max_connections=self.pool_max,
            socket_timeout=self.op_timeout,
            socket_connect_timeout=self.op_timeout,
            # MOVED/ASK are followed by the client. redis-py retries a connection error at
            # once (the backoff below applies to other errors), with a fresh slot map: a
            # couple of times, to pick up a topology that already changed. Waiting out a
            # replica's promotion is call()'s job, with backoff, for idempotent calls.
            retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), retries=2),
            **parsed.cluster_kwargs(),
        )
        client = Client(cluster, gate=self.pool_max)
        seeds_used = list(cluster.nodes_manager.startup_nodes.values())
        try:
            async with asyncio.timeout(self.op_timeout + 1.0):
                await cluster.initialize()
                # Discovery leaves a connection open on a seed object that the client then
                # replaces with its own node objects: close it, or it sits outside the budget.
                known = {id(node) for node in cluster.nodes_manager.nodes_cache.values()}
                for node in seeds_used:
                    if id(node) not in known:
                        await node.disconnect()
                await client.load_scripts()
        except BaseException:
            # Best effort: an error of the cleanup must not replace the one in flight (a
            # cancellation above all).
            with contextlib.suppress(Exception):
                await cluster.aclose()
            raise
        return client

    async def _disconnect(self, client: Client) -> None:
        await client.redis.aclose()

    async def _caller_client(self) -> Client:
        """The caller's client, its scripts registered (and on a cluster loaded) once."""
        assert self._owner is not None
        self._owner.check_process()
        if self._injected_client is None:
            if self._injected_lock is None:
                self._injected_lock = asyncio.Lock()
            async with self._injected_lock:
                if self._injected_client is None:
                    assert self._injected is not None
                    cluster = isinstance(self._injected, RedisCluster)
                    client = Client(self._injected, gate=self.pool_max if cluster else 0)
                    if cluster:
                        await client.load_scripts()
                    self._injected_client = client
        return self._injected_client

    async def client(self) -> Client:
        if self._injected is not None:
            return await self._caller_client()
        return await self._clients.get()

    async def aclose(self) -> None:
        await self._clients.aclose()

    async def call(
        self, what: str, make: Callable[[Client], Awaitable[T]], *, idempotent: bool = False
    ) -> T:
        """Run one Redis operation, mapping redis-py errors to vel's, once.

        ``idempotent``: running it twice does what running it once does (a read, a
        token-checked lock or release, an append carrying its message ids). On a Redis
        Cluster such a call is retried with backoff while a master is unreachable (refused,
        reset, CLUSTERDOWN while its replica is promoted), for about ``op_timeout`` in all:
        redis-py's own retries of a connection error come without a pause and are spent in
        about a second, long before a replica is promoted.

        Raises:
            StoreFullError: Redis is out of memory.
            AccessDeniedError: the ACL user may not run the command or touch the key.
            ConfigurationError: refused credentials or certificate, a database that does not
                exist, a caller's client whose loop cannot run the call.
            StoreTimeoutError, StoreUnavailableError: Redis did not answer.
            StoreError: anything else Redis refused.
        """
        if self._owner is not None and not self._owner.is_home():
            return await self._owner.run(lambda: self.call(what, make, idempotent=idempotent))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.op_timeout
        delay = 0.05
        while True:
            try:
                return await self._call_once(what, make, deadline - loop.time() + 1.0)
            except StoreUnavailableError as exc:
                if not idempotent or not self.is_cluster or isinstance(exc, StoreTimeoutError):
                    raise
                pause = delay * (0.5 + random.random() / 2)
                if loop.time() + pause >= deadline:
                    raise
                self.retries += 1
                await asyncio.sleep(pause)
                delay = min(delay * 2, 0.5)

    async def _call_once(
        self, what: str, make: Callable[[Client], Awaitable[T]], seconds: float
    ) -> T:
        watch = CancelWatch()
        timeout = asyncio.timeout(seconds)
        try:
            # This loop's client, once made, without the two awaits of client().
            client = self._clients.current() if self._injected is None else None
            if client is None:
                client = await self.client()
            async with timeout:
                if client.gate is None:
                    return await make(client)
                async with client.gate:
                    while True:
                        try:
                            return await make(client)
                        except rexc.MaxConnectionsError:
                            # A call cut off by its deadline can hold its node connection
                            # a moment longer than its gate permit. Raised before sending
                            # (pipelines carry idempotent commands only), so retrying is safe.
                            await asyncio.sleep(0.01)
        except VelError:
            raise
        except Exception as exc:
            if watch.requested():
                # The caller was cancelled and redis-py, cut off mid-call, said so in its own
                # words (a broken connection): the cancellation passes through unchanged.
                raise asyncio.CancelledError(f"Redis {what} was cancelled") from exc
            if timeout.expired() and not isinstance(exc, TimeoutError):
                exc = TimeoutError(f"{type(exc).__name__}: {exc}")  # cut off by our deadline
            raise self.translate(what, exc) from exc

    def translate(self, what: str, exc: Exception) -> VelError:
        """The vel error for a redis-py (or socket) error raised during ``what``."""
        return errormap.translate(what, exc, where=self.where, op_timeout=self.op_timeout)

    @staticmethod
    async def pipelined(c: Client, fill: Callable[[Client, Any], Awaitable[None]]) -> list[Any]:
        """Run ``fill``'s commands in one non-transactional pipeline (on a cluster: one per
        node). Scripts are queued as plain EVALSHA (:meth:`Client.queue`), so a server that
        lacks one (restarted, flushed, a promoted replica) answers NOSCRIPT: every script is
        then loaded and the pipeline runs again, which is why only idempotent scripts
        (READ, ACK, DROP_CLEAN) are pipelined."""
        for attempt in range(2):
            pipe = c.redis.pipeline(transaction=False)
            await fill(c, pipe)
            try:
                return list(await pipe.execute())
            except rexc.NoScriptError:
                if attempt:
                    raise
                await c.load_scripts()
        raise AssertionError("unreachable")
