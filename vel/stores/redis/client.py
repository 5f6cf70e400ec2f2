"""The one place a Redis connection lives and redis-py errors are mapped to vel's.

:class:`Connector` parses the URL (standalone, TLS, unix socket, or a cluster's seeds), builds
one client per event loop with every Lua script registered (:class:`Client`), and runs every
Redis operation of the store's parts through :meth:`Connector.call`, which bounds it by
``op_timeout`` and translates redis-py's errors exactly once (DESIGN.md 3.7: timeouts on
every network call). Times go to Redis as integer milliseconds (:func:`ms`, :func:`now_ms`).
"""

from __future__ import annotations

import asyncio
import random
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from vel._loops import PerLoop
from vel.errors import (
    ConfigurationError,
    StoreError,
    StoreFullError,
    StoreTimeoutError,
    StoreUnavailableError,
)
from vel.settings import redact
from vel.stores.redis import scripts as lua

T = TypeVar("T")

CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")


def cluster_seeds(url: str) -> tuple[list[tuple[str, int]], str | None, str | None, bool]:
    """Parse ``redis+cluster://[user[:password]@]host:port[,host:port...][/0]``.

    Returns (seed nodes, username, password, TLS). Any one reachable seed is enough: the
    client discovers the other nodes from it.
    """
    scheme, _, rest = url.partition("://")
    rest, _, query = rest.partition("?")
    rest, _, db = rest.partition("/")
    creds, at, hosts = rest.rpartition("@")
    if query or db not in ("", "0"):
        raise ConfigurationError(
            f"a cluster REDIS_URL takes no database or options (cluster mode has only db 0), "
            f"got {redact(url)!r}"
        )
    username = password = None
    if at:
        user, colon, secret = creds.partition(":")
        username = urllib.parse.unquote(user) or None
        password = urllib.parse.unquote(secret) if colon else None
    seeds = []
    for item in hosts.split(","):
        host, colon, port = item.strip().rpartition(":")
        host = host.strip("[]")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigurationError(
                f"cluster REDIS_URL needs host:port seeds separated by commas, got "
                f"{item!r} in {redact(url)!r}"
            )
        seeds.append((host, int(port)))
    return seeds, username, password, scheme == "rediss+cluster"


def check_url(url: str) -> None:
    """Raise ConfigurationError unless ``url`` has a scheme vel connects to."""
    if url.startswith(CLUSTER_SCHEMES):
        cluster_seeds(url)
    elif not url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigurationError(
            "REDIS_URL must start with redis://, rediss://, unix://, redis+cluster:// or "
            f"rediss+cluster://, got {redact(url)!r}"
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
        # A cluster client's per-node pools fail (rather than wait) when full, and the
        # failure makes it rediscover the cluster: calls wait here instead, so no node ever
        # sees more than ``gate`` connections from this client (0: no gate).
        self.cluster = isinstance(redis, RedisCluster)
        self.gate = asyncio.Semaphore(gate) if gate > 0 else None
        self.scripts: list[Any] = []
        self.load = self._register(lua.LOAD)
        self.take = self._register(lua.TAKE_LOCK)
        self.lock_load = self._register(lua.LOCK_LOAD)
        self.append = self._register(lua.APPEND)
        self.seed = self._register(lua.SEED)
        self.replace = self._register(lua.REPLACE)
        self.claim = self._register(lua.CLAIM)
        self.renew_claims = self._register(lua.RENEW_CLAIMS)
        self.pending = self._register(lua.PENDING)
        self.ack = self._register(lua.ACK)
        self.renew = self._register(lua.RENEW_LOCK)
        self.release = self._register(lua.RELEASE_LOCK)
        self.abandon = self._register(lua.ABANDON_LOCK)
        self.drop_clean = self._register(lua.DROP_CLEAN)

    def _register(self, source: str) -> Any:
        script = self.redis.register_script(source)
        self.scripts.append(script)
        return script

    async def queue(self, pipe: Any, script: Any, keys: list[str], args: list[Any]) -> None:
        """Add one script call to a non-transactional pipeline."""
        if self.cluster:
            # redis-py refuses pipe.evalsha on a cluster; the raw command is routed by its
            # keys like any other (a node lacking the script: see Connector.pipelined).
            pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
        else:
            await script(keys=keys, args=args, client=pipe)

    async def load_scripts(self) -> None:
        """Load every script on every master (a cluster's pipelines cannot load them, and a
        promoted replica may lack them)."""
        for script in self.scripts:
            await self.redis.script_load(script.script)


class Connector:
    """A :class:`Client` per event loop (or the caller's client) and the one error mapping.

    Args:
        url: a URL that passed :func:`check_url` (ignored when ``injected`` is given).
        injected: the caller's ``redis.asyncio.Redis`` (never closed here).
        op_timeout: socket timeout of every call, and the bound of :meth:`call`.
        pool_max: connections per event loop (per node on a cluster).
    """

    def __init__(
        self, url: str, *, injected: aioredis.Redis | None, op_timeout: float, pool_max: int
    ) -> None:
        self.url = url
        self.op_timeout = op_timeout
        self.pool_max = pool_max
        self._injected = injected
        self._clients: PerLoop[Client] = PerLoop(self._connect, self._disconnect)
        self.retries = 0  # idempotent calls retried through a cluster failover

    @property
    def is_cluster(self) -> bool:
        return self._injected is None and self.url.startswith(CLUSTER_SCHEMES)

    async def _connect(self) -> Client:
        if self._injected is not None:
            return Client(self._injected)
        if self.is_cluster:
            return await self._connect_cluster()
        try:
            # A blocking pool makes a burst of callers wait for a connection (bounded by
            # op_timeout) instead of failing with "Too many connections".
            pool = aioredis.BlockingConnectionPool.from_url(
                self.url,
                max_connections=self.pool_max,
                timeout=self.op_timeout,
                socket_timeout=self.op_timeout,
                socket_connect_timeout=self.op_timeout,
                health_check_interval=30,
            )
            client = aioredis.Redis.from_pool(pool)
        except (ValueError, TypeError) as exc:
            raise ConfigurationError(f"bad REDIS_URL {redact(self.url)!r}: {exc}") from None
        return Client(client)

    async def _connect_cluster(self) -> Client:
        seeds, username, password, tls = cluster_seeds(self.url)
        cluster = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in seeds],
            username=username,
            password=password,
            ssl=tls,
            max_connections=self.pool_max,
            socket_timeout=self.op_timeout,
            socket_connect_timeout=self.op_timeout,
            # MOVED/ASK are followed by the client. redis-py retries a connection error at
            # once (the backoff below applies to other errors), with a fresh slot map: a
            # couple of times, to pick up a topology that already changed. Waiting out a
            # replica's promotion is call()'s job, with backoff, for idempotent calls.
            retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), retries=2),
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
            await cluster.aclose()
            raise
        return client

    async def _disconnect(self, client: Client) -> None:
        if self._injected is None:
            await client.redis.aclose()

    async def client(self) -> Client:
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
        """
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
        try:
            client = await self._clients.get()
            async with asyncio.timeout(seconds):
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
        except (rexc.ClusterDownError, rexc.TryAgainError, rexc.SlotNotCoveredError) as exc:
            raise StoreUnavailableError(
                f"Redis Cluster cannot serve {what} now (failover?): {exc}"
            ) from exc
        except rexc.ResponseError as exc:
            if isinstance(exc, rexc.OutOfMemoryError) or "maxmemory" in str(exc):
                raise StoreFullError(
                    f"Redis is out of memory during {what}; nothing was "
                    "stored (raise maxmemory or flush faster)"
                ) from exc
            raise StoreError(f"Redis rejected {what}: {exc}") from exc
        except rexc.AuthenticationError as exc:
            raise ConfigurationError(
                f"Redis refused the credentials in {redact(self.url)!r}"
            ) from exc
        except (rexc.TimeoutError, TimeoutError) as exc:
            raise StoreTimeoutError(
                f"Redis did not answer {what} within {self.op_timeout} s"
            ) from exc
        except (rexc.ConnectionError, OSError) as exc:
            raise StoreUnavailableError(
                f"Redis at {redact(self.url)} is unreachable during {what}: {exc}"
            ) from exc
        except (rexc.RedisError, rexc.RedisClusterException) as exc:
            raise StoreError(f"Redis failed during {what}: {exc}") from exc
        except (AttributeError, TypeError) as exc:
            # redis-py writing to a connection the peer has just reset (or one its cluster
            # client is tearing down) leaks the transport's internals as these instead of a
            # ConnectionError (redis/redis-py#4287): the connection broke mid-call.
            raise StoreUnavailableError(
                f"Redis connection broke during {what}: {type(exc).__name__}: {exc}"
            ) from exc

    @staticmethod
    async def pipelined(c: Client, fill: Callable[[Client, Any], Awaitable[None]]) -> list[Any]:
        """Run ``fill``'s commands in one non-transactional pipeline (on a cluster: one per
        node). A cluster pipeline cannot load a script a node lacks (a promoted replica may
        have none), so then every script is loaded and the pipeline runs again: only
        idempotent scripts (PENDING, ACK) are pipelined."""
        for attempt in range(2):
            pipe = c.redis.pipeline(transaction=False)
            await fill(c, pipe)
            try:
                return list(await pipe.execute())
            except rexc.NoScriptError:
                if attempt or not c.cluster:
                    raise
                await c.load_scripts()
        raise AssertionError("unreachable")
