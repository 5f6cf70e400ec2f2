"""RedisStore: the Redis tier (hot, shared by every worker), also usable on its own.

In write-behind mode (inside :class:`~vel.stores.tiered.TieredStore`) an append marks the
session dirty and removes its TTL; the flusher copies it to Postgres and only then gives it
back its idle TTL, so unflushed data never expires and, under ``volatile-*`` eviction, is never
evicted. In Redis-only mode (``session_storage='redis'`` without ``POSTGRES_DSN``) every write
and read slides the session's TTL, and the TTL ends the session.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from vel import failpoints
from vel._lease import LeaseKeeper
from vel._loops import PerLoop
from vel.errors import (
    BackpressureError,
    ConfigurationError,
    SessionLockedError,
    StoreError,
    StoreFullError,
    StoreTimeoutError,
    StoreUnavailableError,
)
from vel.messages import (
    Message,
    check_message_ids,
    decode_message,
    encode_messages,
    validate_session_id,
)
from vel.settings import Settings, load_settings, redact
from vel.stores import redis_scripts as lua
from vel.stores.base import SessionInfo
from vel.stores.redis_keys import KeyLayout, SessionKeys

log = logging.getLogger("vel.redis")
T = TypeVar("T")

MISS, REPLAY, BACKPRESSURE, DAMAGED, LOCKED = -1, -2, -3, -4, -5


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


def _ms(seconds: float | None) -> int:
    return 0 if not seconds else max(1, int(seconds * 1000))


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True, slots=True)
class Pending:
    """What a flusher has to copy for one session."""

    session_id: str
    gen: int
    fgen: int
    flushed: int
    seq: int
    rows: list[tuple[int, str, str]]  # (seq, message id, message JSON)


class RedisTurn:
    """A turn holding its session's lock (see :meth:`RedisStore.turn`)."""

    def __init__(
        self,
        store: RedisStore,
        session_id: str,
        token: str,
        on_miss: Callable[[], Awaitable[None]] | None,
    ) -> None:
        self.store = store
        self.session_id = session_id
        self.token = token
        self.on_miss = on_miss
        self.window: list[Message] = []
        self.keeper: LeaseKeeper | None = None
        self._keep_later: asyncio.TimerHandle | None = None
        self.committed = False

    def keep_lease(self, start: Callable[[], LeaseKeeper], after: float) -> None:
        """Renew the lock from ``after`` seconds on: most turns end before a renewal is due,
        and then no renewal task is ever created (a task per turn costs more than the rest
        of the turn's bookkeeping)."""

        def begin() -> None:
            self._keep_later = None
            self.keeper = start()

        self._keep_later = asyncio.get_running_loop().call_later(after, begin)

    async def stop_lease(self) -> None:
        if self._keep_later is not None:
            self._keep_later.cancel()
            self._keep_later = None
        if self.keeper is not None:
            await self.keeper.stop()

    async def commit(
        self, messages: Sequence[Message], message_ids: Sequence[str] | None = None
    ) -> int:
        """Append the turn's messages and release the lock in one step; return the last seq.

        Raises:
            InvalidInputError: bad messages; nothing was stored and the lock is still held.
            StoreError: as :meth:`RedisStore.append`.
        """
        if self.committed:
            raise StoreError("this turn was already committed")
        items = self.store.encode(messages, message_ids)
        if not items:
            return await self.store.last_seq(self.session_id)
        await self.stop_lease()  # the append below ends the lease
        first_id = items[0].partition("\n")[0]
        seq = await self.store.append_items(
            self.session_id, items, first_id, self.on_miss, unlock=self.token
        )
        self.committed = True
        return seq


class _Client:
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
        self.lock_load = self._register(lua.LOCK_LOAD)
        self.append = self._register(lua.APPEND)
        self.seed = self._register(lua.SEED)
        self.replace = self._register(lua.REPLACE)
        self.claim = self._register(lua.CLAIM)
        self.pending = self._register(lua.PENDING)
        self.ack = self._register(lua.ACK)
        self.renew = self._register(lua.RENEW_LOCK)
        self.release = self._register(lua.RELEASE_LOCK)
        self.drop_clean = self._register(lua.DROP_CLEAN)

    def _register(self, source: str) -> Any:
        script = self.redis.register_script(source)
        self.scripts.append(script)
        return script

    async def queue(self, pipe: Any, script: Any, keys: list[str], args: list[Any]) -> None:
        """Add one script call to a non-transactional pipeline."""
        if self.cluster:
            # redis-py refuses pipe.evalsha on a cluster; the raw command is routed by its
            # keys like any other (a node lacking the script: see RedisStore._pipelined).
            pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
        else:
            await script(keys=keys, args=args, client=pipe)

    async def load_scripts(self) -> None:
        """Load every script on every master (a cluster's pipelines cannot load them, and a
        promoted replica may lack them)."""
        for script in self.scripts:
            await self.redis.script_load(script.script)


def _split(item: bytes) -> tuple[str, str]:
    mid, _, text = item.partition(b"\n")
    return mid.decode(), text.decode()


class RedisStore:
    """Sessions in Redis.

    Args:
        url: ``redis://`` / ``rediss://`` / ``unix://`` URL (default ``REDIS_URL`` or
            ``redis://127.0.0.1:6379/0``); ``redis+cluster://[user:password@]host:port[,...]``
            (``rediss+cluster://`` with TLS) uses a Redis Cluster, discovered from those seeds.
        client: a ``redis.asyncio.Redis`` to use instead (it belongs to the caller).
        write_behind: True inside a TieredStore (sessions get dirty marks, no TTL while dirty).
        key_prefix: namespace of every key (``VEL_KEY_PREFIX``, default ``vel``).
        buckets: hash-slot buckets (part of the key layout: same value in every process;
            ``VEL_BUCKETS``, default 16).
        hot_ttl: seconds a clean session stays after its last use (``VEL_HOT_TTL``).
        retention_ttl: in Redis-only mode, caps the TTL (``VEL_RETENTION_TTL``).
        max_unflushed: bound on messages waiting for Postgres (``VEL_MAX_UNFLUSHED``).
        backpressure_wait: seconds an append waits for the backlog to drain, then raises
            BackpressureError (0: raise at once).
        flush_delay: seconds a new dirty session waits before it is due, so several turns
            coalesce into one Postgres write.
        op_timeout: socket timeout of every Redis call.
        pool_max: connections per process (per event loop), per node on a cluster
            (``VEL_REDIS_POOL_MAX``).
        lock_lease: seconds a turn lock lives without renewal (renewed while held).
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        client: aioredis.Redis | None = None,
        write_behind: bool = False,
        key_prefix: str | None = None,
        buckets: int | None = None,
        hot_ttl: float | None = None,
        retention_ttl: float | None = None,
        max_unflushed: int | None = None,
        backpressure_wait: float | None = None,
        flush_delay: float = 0.05,
        op_timeout: float | None = None,
        pool_max: int | None = None,
        lock_lease: float = 60.0,
        settings: Settings | None = None,
    ) -> None:
        s = settings or load_settings()
        self.url = url or s.redis_url
        self.keys = KeyLayout(key_prefix or s.key_prefix, s.buckets if buckets is None else buckets)
        self.write_behind = write_behind
        hot = s.hot_ttl if hot_ttl is None else hot_ttl
        retention = s.retention_ttl if retention_ttl is None else retention_ttl
        if retention is not None and retention > 0:
            hot = min(hot, retention) if hot > 0 else retention
        self.hot_ttl = hot
        self.retention_ttl = retention
        self.max_unflushed = s.max_unflushed if max_unflushed is None else max_unflushed
        self.backpressure_wait = (
            s.backpressure_wait if backpressure_wait is None else backpressure_wait
        )
        self.flush_delay = flush_delay
        self.op_timeout = s.op_timeout if op_timeout is None else op_timeout
        self.pool_max = s.redis_pool_max if pool_max is None else pool_max
        self.lock_lease = lock_lease
        self._injected = client
        if client is None:
            self._check_url(self.url)
        self._clients: PerLoop[_Client] = PerLoop(self._connect, self._disconnect)
        self.counters: dict[str, float] = {
            "appends": 0,
            "duplicates_suppressed": 0,
            "backpressure_rejections": 0,
            "lock_waits": 0,
            "damaged_reads": 0,
        }

    @classmethod
    def from_settings(cls, settings: Settings, *, write_behind: bool) -> RedisStore:
        return cls(settings=settings, write_behind=write_behind)

    def __repr__(self) -> str:
        mode = "write-behind" if self.write_behind else "redis-only"
        return f"RedisStore({redact(self.url)!r}, prefix={self.keys.prefix!r}, {mode})"

    @staticmethod
    def _check_url(url: str) -> None:
        if url.startswith(CLUSTER_SCHEMES):
            cluster_seeds(url)
        elif not url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigurationError(
                "REDIS_URL must start with redis://, rediss://, unix://, redis+cluster:// or "
                f"rediss+cluster://, got {redact(url)!r}"
            )

    @property
    def is_cluster(self) -> bool:
        """Whether this store talks to a Redis Cluster (``redis+cluster://``)."""
        return self._injected is None and self.url.startswith(CLUSTER_SCHEMES)

    # -- connection ----------------------------------------------------------------------

    async def _connect(self) -> _Client:
        if self._injected is not None:
            return _Client(self._injected)
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
        return _Client(client)

    async def _connect_cluster(self) -> _Client:
        seeds, username, password, tls = cluster_seeds(self.url)
        cluster = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in seeds],
            username=username,
            password=password,
            ssl=tls,
            max_connections=self.pool_max,
            socket_timeout=self.op_timeout,
            socket_connect_timeout=self.op_timeout,
            # MOVED/ASK are followed by the client; a dead master (ConnectionError,
            # CLUSTERDOWN while its replica is promoted) is retried with backoff and a fresh
            # slot map. The retries add up to about op_timeout: call()'s deadline cannot be
            # relied on to cut them short (a cancellation landing in redis-py may be lost).
            retry=Retry(
                ExponentialWithJitterBackoff(base=0.05, cap=0.5),
                retries=max(2, round(self.op_timeout / 0.25)),
            ),
        )
        client = _Client(cluster, gate=self.pool_max)
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

    async def _disconnect(self, client: _Client) -> None:
        if self._injected is None:
            await client.redis.aclose()

    async def client(self) -> _Client:
        return await self._clients.get()

    async def call(self, what: str, make: Callable[[_Client], Awaitable[T]]) -> T:
        """Run one Redis operation, mapping redis-py errors to vel's, once."""
        try:
            client = await self._clients.get()
            async with asyncio.timeout(self.op_timeout + 1.0):
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

    async def aclose(self) -> None:
        await self._clients.aclose()

    async def ping(self) -> bool:
        return bool(await self.call("PING", lambda c: c.redis.ping()))

    # -- reads -----------------------------------------------------------------------------

    async def read(self, session_id: str, limit: int | None = None) -> list[Message] | None:
        """The window, or None when the session is not in Redis (a miss)."""
        keys = self.keys.session(validate_session_id(session_id))
        args = [
            -1 if limit is None else limit,
            _ms(self.hot_ttl),
            "1" if self.write_behind else "0",
        ]
        reply: list[Any] = await self.call(
            "load", lambda c: c.load(keys=list(keys.data), args=args)
        )
        return self._window(session_id, reply)

    def _window(self, session_id: str, reply: list[Any]) -> list[Message] | None:
        head = int(reply[0])
        if head == MISS:
            return None
        if head == DAMAGED:
            self.counters["damaged_reads"] += 1
            raise StoreError(
                f"session {session_id!r} lost part of its data in Redis while unflushed; "
                "check maxmemory-policy (never allkeys-*) with `vel doctor`"
            )
        # json.loads takes the bytes after the id as they are: no split, no decode to str.
        return [decode_message(item[item.index(b"\n") + 1 :]) for item in reply[1:]]

    async def load(self, session_id: str, limit: int | None = None) -> list[Message]:
        messages = await self.read(session_id, limit)
        return [] if messages is None else messages

    async def exists(self, session_id: str) -> bool:
        keys = self.keys.session(session_id)
        return bool(await self.call("exists", lambda c: c.redis.exists(keys.meta)))

    # -- writes ----------------------------------------------------------------------------

    async def try_append(
        self, session_id: str, items: Sequence[str], first_id: str, unlock: str = ""
    ) -> tuple[int, int]:
        """Run the append script once: returns (code, value) where code is 0 on success.

        ``unlock``: a turn lock token to release in the same step once the items are stored.
        """
        keys = self.keys.session(session_id)
        per_bucket = max(1, -(-self.max_unflushed // self.keys.buckets))
        args: list[Any] = [
            now_ms(),
            "wb" if self.write_behind else "ro",
            _ms(self.hot_ttl),
            _ms(self.flush_delay),
            per_bucket,
            session_id,
            first_id,
            unlock,
            *items,
        ]
        names = [*keys.data, keys.dirty, keys.dirty_since, keys.backlog]
        if unlock:
            names.append(keys.turn_lock)
        reply = await self.call("append", lambda c: c.append(keys=names, args=args))
        head = int(reply[0])
        if head >= 0:
            self.counters["appends"] += 1
            await failpoints.hit("after_append_script")
            return 0, head
        return head, int(reply[1]) if len(reply) > 1 else 0

    async def append_items(
        self,
        session_id: str,
        items: Sequence[str],
        first_id: str,
        on_miss: Callable[[], Awaitable[None]] | None = None,
        unlock: str = "",
    ) -> int:
        """Append encoded items, retrying replays, misses and backpressure as configured.

        ``unlock``: a turn lock token released by the append that stores the items.
        """
        deadline = time.monotonic() + self.backpressure_wait
        delay = 0.01
        for attempt in range(1000):
            try:
                code, value = await self.try_append(session_id, items, first_id, unlock)
            except StoreUnavailableError as exc:
                # Safe to retry: the first message id makes a replayed append a no-op. A
                # timeout is not retried, so a frozen Redis costs one op_timeout, not three.
                if attempt >= 2 or isinstance(exc, StoreTimeoutError):
                    raise
                await asyncio.sleep(0.05 * (attempt + 1))
                continue
            if code == 0:
                return value
            if code == REPLAY:
                self.counters["duplicates_suppressed"] += 1
                return value
            if code == MISS:
                if on_miss is None:
                    raise StoreError("append found no session and has no way to create it")
                await on_miss()
                continue
            if code == BACKPRESSURE:
                if time.monotonic() >= deadline:
                    self.counters["backpressure_rejections"] += 1
                    raise BackpressureError(
                        f"{value} messages are waiting for Postgres in this bucket "
                        f"(bound {self.max_unflushed} in all); retry later"
                    )
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 0.5)
                continue
            if code == DAMAGED:
                self.counters["damaged_reads"] += 1
                raise StoreError(
                    f"session {session_id!r} lost part of its data in Redis while unflushed; "
                    "check maxmemory-policy (never allkeys-*) with `vel doctor`"
                )
            raise StoreError(f"unexpected append reply {code}")
        raise StoreError("append did not settle after 1000 attempts")

    @staticmethod
    def encode(messages: Sequence[Message], message_ids: Sequence[str] | None) -> list[str]:
        texts = encode_messages(messages)
        ids = check_message_ids(message_ids, len(texts))
        return [f"{mid}\n{text}" for mid, text in zip(ids, texts, strict=True)]

    async def append(
        self,
        session_id: str,
        messages: Sequence[Message],
        message_ids: Sequence[str] | None = None,
    ) -> int:
        validate_session_id(session_id)
        items = self.encode(messages, message_ids)
        if not items:
            return await self.last_seq(session_id)
        if self.write_behind:
            raise StoreError("a write-behind RedisStore is driven by its TieredStore")
        return await self.append_items(session_id, items, items[0].partition("\n")[0])

    async def last_seq(self, session_id: str) -> int:
        keys = self.keys.session(validate_session_id(session_id))
        raw = await self.call("hget", lambda c: c.redis.hget(keys.meta, "seq"))
        return int(raw or 0)

    async def try_replace(self, session_id: str, items: Sequence[str]) -> int:
        """Replace (no items: clear). Returns the new generation, or MISS."""
        keys = self.keys.session(session_id)
        args: list[Any] = [
            now_ms(),
            "wb" if self.write_behind else "ro",
            _ms(self.hot_ttl),
            session_id,
            *items,
        ]
        reply = await self.call(
            "replace",
            lambda c: c.replace(
                keys=[*keys.data, keys.dirty, keys.dirty_since, keys.backlog], args=args
            ),
        )
        return int(reply[0])

    async def replace(self, session_id: str, messages: Sequence[Message]) -> None:
        validate_session_id(session_id)
        items = self.encode(messages, None)
        if self.write_behind:
            raise StoreError("a write-behind RedisStore is driven by its TieredStore")
        await self.try_replace(session_id, items)

    async def clear(self, session_id: str) -> None:
        await self.replace(session_id, [])

    async def seed(
        self,
        session_id: str,
        token: str,
        gen: int,
        last_seq: int,
        rows: Sequence[tuple[int, str, str]],
        created_ms: int,
        updated_ms: int,
    ) -> int:
        """Install a snapshot read from Postgres (see SEED). Returns 1, 0 or -1."""
        keys = self.keys.session(session_id)
        args: list[Any] = [token, _ms(self.hot_ttl), gen, last_seq, created_ms, updated_ms]
        args += [f"{mid}\n{text}" for _, mid, text in rows]
        reply = await self.call(
            "seed", lambda c: c.seed(keys=[*keys.data, keys.warm_lock], args=args)
        )
        return int(reply)

    # -- leases ----------------------------------------------------------------------------

    async def try_lock(self, key: str, token: str, lease: float) -> bool:
        return bool(
            await self.call("lock", lambda c: c.redis.set(key, token, nx=True, px=_ms(lease)))
        )

    async def renew_lock(self, key: str, token: str, lease: float) -> bool:
        return bool(
            await self.call("renew", lambda c: c.renew(keys=[key], args=[token, _ms(lease)]))
        )

    async def release_lock(self, key: str, token: str) -> None:
        await self.call("unlock", lambda c: c.release(keys=[key], args=[token]))

    def turn_lock(
        self, session_id: str, timeout: float | None = None
    ) -> AbstractAsyncContextManager[None]:
        return self._turn_lock(self.keys.session(validate_session_id(session_id)), timeout)

    async def _until_locked(
        self, keys: SessionKeys, timeout: float | None, attempt: Callable[[], Awaitable[T | None]]
    ) -> T:
        """Call ``attempt`` (one try at the turn lock) with backoff until it returns a value."""
        deadline = time.monotonic() + (30.0 if timeout is None else timeout)
        delay = 0.005
        waited = False
        while (result := await attempt()) is None:
            if not waited:
                waited = True
                self.counters["lock_waits"] += 1
            if time.monotonic() >= deadline:
                raise SessionLockedError(
                    f"session lock {keys.turn_lock!r} is held by another turn (waited {timeout} s)"
                )
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 0.2)
        return result

    def _keep_lock(self, keys: SessionKeys, token: str) -> LeaseKeeper:
        return LeaseKeeper(
            lambda: self.renew_lock(keys.turn_lock, token, self.lock_lease),
            self.lock_lease / 3,
            f"turn lock {keys.turn_lock!r}",
            self.keys.session_id_of(keys.meta),
        )

    async def _unlock(self, keys: SessionKeys, token: str) -> None:
        try:
            await self.release_lock(keys.turn_lock, token)
        except StoreError:
            log.warning(
                "could not release turn lock %s; its lease will run out",
                keys.turn_lock,
                extra={"session_id": self.keys.session_id_of(keys.meta)},
            )

    @asynccontextmanager
    async def _turn_lock(self, keys: SessionKeys, timeout: float | None) -> AsyncIterator[None]:
        token = uuid.uuid4().hex

        async def attempt() -> bool | None:
            return await self.try_lock(keys.turn_lock, token, self.lock_lease) or None

        await self._until_locked(keys, timeout, attempt)
        keeper = self._keep_lock(keys, token)
        try:
            yield
        finally:
            await keeper.stop()
            await self._unlock(keys, token)

    @asynccontextmanager
    async def turn(
        self,
        session_id: str,
        limit: int | None = None,
        timeout: float | None = None,
        on_miss: Callable[[], Awaitable[None]] | None = None,
    ) -> AsyncIterator[RedisTurn]:
        """A turn of ``session_id``: its window, read under its turn lock; commit once.

        The lock is taken by the script that reads the window and released by the script
        that stores the turn's messages, so a locked turn costs two round trips, like an
        unlocked one. Leaving without a commit releases the lock (one more round trip).

        Args:
            session_id: the session.
            limit: the window (last ``limit`` messages; None: all).
            timeout: seconds to wait for the lock (default 30).
            on_miss: loads the session into Redis when it is missing (the TieredStore's
                warm); None: a missing session is empty (Redis-only mode).

        Raises:
            SessionLockedError: another turn held the lock for ``timeout`` seconds.
            StoreError: Redis failed, or the session's Redis copy is damaged.
        """
        keys = self.keys.session(validate_session_id(session_id))
        token = uuid.uuid4().hex
        args: list[Any] = [
            -1 if limit is None else limit,
            _ms(self.hot_ttl),
            "1" if self.write_behind else "0",
            token,
            _ms(self.lock_lease),
        ]

        async def attempt() -> list[Any] | None:
            reply: list[Any] = await self.call(
                "lock+load",
                lambda c: c.lock_load(keys=[*keys.data, keys.turn_lock], args=args),
            )
            return None if int(reply[0]) == LOCKED else reply

        reply = await self._until_locked(keys, timeout, attempt)
        turn = RedisTurn(self, session_id, token, on_miss)
        try:
            window = self._window(session_id, reply)
            for _ in range(5):
                if window is not None or on_miss is None:
                    break
                await on_miss()
                window = await self.read(session_id, limit)
            if window is None and on_miss is not None:
                raise StoreTimeoutError(f"session {session_id!r} kept vanishing from Redis")
            turn.window = window or []
            # Started after a sixth of the lease, the keeper first renews at half of it.
            turn.keep_lease(lambda: self._keep_lock(keys, token), self.lock_lease / 6)
            yield turn
        finally:
            await turn.stop_lease()
            if not turn.committed:
                await self._unlock(keys, token)

    # -- flushing (write-behind) -----------------------------------------------------------

    async def claim(self, bucket: int, lease: float, limit: int) -> list[str]:
        dirty = self.keys.bucket_keys(bucket)[0]
        reply = await self.call(
            "claim", lambda c: c.claim(keys=[dirty], args=[now_ms(), _ms(lease), limit])
        )
        return [sid.decode() for sid in reply]

    async def try_sweep(self, bucket: int, interval: float) -> bool:
        """Take the bucket's sweep turn for ``interval`` seconds (False: taken by another)."""
        key = f"{self.keys.tag(bucket)}:sweep"
        return bool(
            await self.call("sweep", lambda c: c.redis.set(key, 1, nx=True, px=_ms(interval)))
        )

    async def reschedule(self, bucket: int, session_ids: Sequence[str], delay: float) -> None:
        """Make claimed sessions due again after ``delay`` seconds (if still dirty)."""
        dirty = self.keys.bucket_keys(bucket)[0]
        due = now_ms() + _ms(delay)
        mapping: dict[str, float] = {sid: due for sid in session_ids}
        await self.call("reschedule", lambda c: c.redis.zadd(dirty, mapping, xx=True))

    async def pending(self, session_ids: Sequence[str], max_rows: int) -> list[Pending | None]:
        """Read what each claimed session still has to copy (one pipelined round trip)."""

        async def fill(c: _Client, pipe: Any) -> None:
            for sid in session_ids:
                keys = self.keys.session(sid)
                await c.queue(pipe, c.pending, [keys.meta, keys.messages], [max_rows])

        replies = await self.call("pending", lambda c: self._pipelined(c, fill))
        result: list[Pending | None] = []
        for sid, reply in zip(session_ids, replies, strict=True):
            if int(reply[0]) == MISS and len(reply) == 1:
                result.append(None)
                continue
            gen, fgen, flushed, seq = (int(x) for x in reply[:4])
            rows = []
            for offset, item in enumerate(reply[4:], start=1):
                mid, text = _split(item)
                rows.append((flushed + offset, mid, text))
            result.append(Pending(sid, gen, fgen, flushed, seq, rows))
        return result

    async def ack(self, acks: Sequence[tuple[str, int, int]]) -> list[int]:
        """Acknowledge (session id, generation, flushed up to seq) triples."""

        now = now_ms()

        async def fill(c: _Client, pipe: Any) -> None:
            for sid, gen, upto in acks:
                keys = self.keys.session(sid)
                await c.queue(
                    pipe,
                    c.ack,
                    [*keys.data, keys.dirty, keys.dirty_since, keys.backlog],
                    [sid, gen, upto, now, _ms(self.hot_ttl)],
                )

        return [int(r) for r in await self.call("ack", lambda c: self._pipelined(c, fill))]

    @staticmethod
    async def _pipelined(c: _Client, fill: Callable[[_Client, Any], Awaitable[None]]) -> list[Any]:
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

    async def backlog(self) -> tuple[int, float, int]:
        """(unflushed messages, oldest dirty age in seconds, dirty sessions)."""

        async def run(c: _Client) -> list[Any]:
            pipe = c.redis.pipeline(transaction=False)
            for b in range(self.keys.buckets):
                dirty, since, backlog = self.keys.bucket_keys(b)
                pipe.get(backlog)
                pipe.zrange(since, 0, 0, withscores=True)
                pipe.zcard(dirty)
            return list(await pipe.execute())

        replies = await self.call("backlog", run)
        total, oldest, sessions = 0, None, 0
        for i in range(0, len(replies), 3):
            total += int(replies[i] or 0)
            if replies[i + 1]:
                first = float(replies[i + 1][0][1])
                oldest = first if oldest is None else min(oldest, first)
            sessions += int(replies[i + 2])
        age = 0.0 if oldest is None else max(0.0, (now_ms() - oldest) / 1000)
        return total, age, sessions

    # -- listing ----------------------------------------------------------------------------

    async def list_sessions(
        self, inactive_for: float | None = None, limit: int = 1000
    ) -> list[SessionInfo]:
        """Scan the sessions held in Redis (Redis-only mode's listing)."""
        from datetime import UTC, datetime

        pattern = f"{self.keys.prefix}:{{*}}:h:*"

        async def run(c: _Client) -> list[tuple[str, list[Any], int]]:
            found: list[tuple[str, list[Any], int]] = []
            async for raw in c.redis.scan_iter(match=pattern, count=1000):
                key = raw.decode()
                sid = self.keys.session_id_of(key)
                if sid is None or self.keys.session(sid).meta != key:
                    continue
                meta = await c.redis.hmget(key, "seq", "created", "updated")
                ttl = await c.redis.pttl(key)
                if meta[0] is not None and int(meta[0]) > 0:
                    found.append((sid, meta, ttl))
            return found

        now = time.time()
        infos = []
        for sid, meta, ttl in await self.call("scan", run):
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

    async def purge_expired(self) -> int:
        return 0  # Redis expires keys by itself

    async def drop_clean(self, session_ids: Sequence[str]) -> int:
        """Delete the Redis copies of these sessions, except dirty ones (their unflushed
        messages must reach Postgres first); returns how many were dropped."""

        async def fill(c: _Client, pipe: Any) -> None:
            for sid in session_ids:
                keys = self.keys.session(sid)
                await c.queue(pipe, c.drop_clean, [*keys.data, keys.dirty], [sid])

        if not session_ids:
            return 0
        replies = await self.call("drop clean", lambda c: self._pipelined(c, fill))
        return sum(int(r) for r in replies)

    async def stats(self) -> dict[str, float]:
        result = dict(self.counters)
        if self.write_behind:
            unflushed, oldest, dirty = await self.backlog()
            result.update(
                unflushed_messages=unflushed, oldest_dirty_age=oldest, dirty_sessions=dirty
            )
        return result
