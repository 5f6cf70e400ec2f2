"""RedisStore: the Redis tier (hot, shared by every worker), also usable on its own.

In write-behind mode (inside :class:`~vel.stores.tiered.TieredStore`) an append marks the
session dirty and removes its TTL; the flusher copies it to Postgres and only then gives it
back its idle TTL, so unflushed data never expires and, under ``volatile-*`` eviction, is never
evicted. A clean copy's TTL never outlives the tier lease recorded in Postgres (DESIGN.md 3.8).
In Redis-only mode (``session_storage='redis'`` without ``POSTGRES_DSN``) every write and read
slides the session's TTL, and the TTL ends the session. In both, reads slide the TTL only up
to the retention deadline, which counts from the last write (3.9).

The store is a facade over parts that each hold one responsibility:
:mod:`~vel.stores.redis.client` (connections, bounded calls), :mod:`~vel.stores.redis.errormap`
(the one error mapping), :mod:`~vel.stores.redis.sessions` (session data),
:mod:`~vel.stores.redis.locks` (leases and locked turns), :mod:`~vel.stores.redis.writebehind`
(what the flusher claims and acknowledges) and :mod:`~vel.stores.redis.listing`; key names come
from :mod:`~vel.stores.redis.keys`, Lua from :mod:`~vel.stores.redis.scripts` (and the modules
it names). Two groups of its calls are mixins: :class:`~vel.stores.redis.leases.LeaseCalls`
(leases and locked turns) and :class:`~vel.stores.redis.tier.HotTier` (the calls only the
two-tier store makes).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis

from vel import metrics
from vel.bounds import (
    BUCKETS,
    COUNT,
    DELAY,
    LEASE,
    MAX_UNFLUSHED,
    POOL,
    TIMEOUT,
    TTL,
    WAIT,
    age_arg,
)
from vel.errors import InvalidInputError, StoreError
from vel.instrument import observed
from vel.messages import Message, validate_session_id
from vel.metrics.histograms import APPEND, LOAD
from vel.settings import Settings, load_settings
from vel.stores.base import SessionInfo
from vel.stores.listing import HistoryPage, Query, SessionDetails, SessionPage, _Unset
from vel.stores.redis import catalog
from vel.stores.redis.client import Client, Connector
from vel.stores.redis.items import Window, encode
from vel.stores.redis.keys import KeyLayout
from vel.stores.redis.leases import LeaseCalls
from vel.stores.redis.listing import scan_sessions
from vel.stores.redis.locks import Locks
from vel.stores.redis.sessions import Sessions
from vel.stores.redis.tier import HotTier
from vel.stores.redis.writebehind import WriteBehind

T = TypeVar("T")


class RedisStore(LeaseCalls, HotTier):
    """Sessions in Redis.

    Args:
        url: ``redis://`` / ``rediss://`` / ``unix://`` URL (default ``REDIS_URL`` or
            ``redis://127.0.0.1:6379/0``); ``redis+cluster://[user:password@]host:port[,...]``
            (``rediss+cluster://`` with TLS) uses a Redis Cluster, discovered from those seeds.
            Checked at once (see :mod:`vel.stores.redis.url` for the forms and options).
        client: a ``redis.asyncio.Redis`` or ``RedisCluster`` to use instead, made with
            ``decode_responses=False``. It stays the caller's (never closed here) and serves
            the event loop it belongs to (the one running when the store is made, or the
            first to use it); calls from another loop (the plain ``ctxmgr`` calls run on
            vel's helper loop) are sent to that loop while it runs, and refused with
            ConfigurationError when it cannot run them.
        write_behind: True inside a TieredStore (sessions get dirty marks, no TTL while dirty).
        key_prefix: namespace of every key (``VEL_KEY_PREFIX``, default ``vel``).
        buckets: hash-slot buckets (part of the key layout: same value in every process;
            ``VEL_BUCKETS``, default 16).
        hot_ttl: seconds a clean session stays after its last use (``VEL_HOT_TTL``).
        retention_ttl: seconds a session lives after its last write; reads never extend
            it (``VEL_RETENTION_TTL``; None: forever).
        max_unflushed: bound on messages waiting for Postgres (``VEL_MAX_UNFLUSHED``).
        backpressure_wait: seconds an append waits for the backlog to drain, then raises
            BackpressureError (0: raise at once).
        flush_delay: seconds a new dirty session waits before it is due, so several turns
            coalesce into one Postgres write.
        op_timeout: socket timeout of every Redis call.
        pool_max: connections per process (per event loop), per node on a cluster
            (``VEL_REDIS_POOL_MAX``).
        lock_lease: seconds a turn lock lives without renewal (renewed while held);
            default ``VEL_LOCK_LEASE`` (10).
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
        lock_lease: float | None = None,
        settings: Settings | None = None,
    ) -> None:
        s = settings or load_settings()
        self.url = url or s.redis_url
        self.keys = KeyLayout(
            key_prefix or s.key_prefix,
            s.buckets if buckets is None else BUCKETS.check_int("buckets", buckets),
        )
        self.write_behind = write_behind
        self.hot_ttl = s.hot_ttl if hot_ttl is None else TTL.check("hot_ttl", hot_ttl)
        # Reads slide the hot TTL only up to the retention deadline (kept per session), so
        # the hot TTL itself is not capped by the retention.
        self.retention_ttl = (
            s.retention_ttl if retention_ttl is None else TTL.check("retention_ttl", retention_ttl)
        )
        # The tier lease (write-behind): how long Postgres records that this tier may hold a
        # session after a warm or a flush; a clean copy's TTL never outlives it, so a copy
        # only read is warmed again once per lease. A clean copy whose lease ends within the
        # margin is not written (nor used for a turn) before it is warmed again.
        self.tier_lease = self.hot_ttl
        self.lease_margin = min(60.0, self.tier_lease / 4)
        self.max_unflushed = (
            s.max_unflushed
            if max_unflushed is None
            else MAX_UNFLUSHED.check_int("max_unflushed", max_unflushed)
        )
        self.backpressure_wait = (
            s.backpressure_wait
            if backpressure_wait is None
            else WAIT.check("backpressure_wait", backpressure_wait)
        )
        self.flush_delay = DELAY.check("flush_delay", flush_delay)
        self.op_timeout = (
            s.op_timeout if op_timeout is None else TIMEOUT.check("op_timeout", op_timeout)
        )
        self.pool_max = (
            s.redis_pool_max if pool_max is None else POOL.check_int("pool_max", pool_max)
        )
        self.lock_lease = (
            s.lock_lease if lock_lease is None else LEASE.check("lock_lease", lock_lease)
        )
        self._redis = Connector(
            self.url, injected=client, op_timeout=self.op_timeout, pool_max=self.pool_max
        )
        self.counters: dict[str, float] = {
            "appends": 0,
            "duplicates_suppressed": 0,
            "backpressure_rejections": 0,
            "lock_waits": 0,
            "damaged_reads": 0,
        }
        metrics.track(self, self.counters, "redis")
        self._sessions = Sessions(
            self._redis,
            self.keys,
            self.counters,
            write_behind=write_behind,
            hot_ttl=self.hot_ttl,
            retention_ttl=self.retention_ttl,
            lease_margin=self.lease_margin,
            max_unflushed=self.max_unflushed,
            backpressure_wait=self.backpressure_wait,
            flush_delay=self.flush_delay,
            lock_lease=self.lock_lease,
        )
        self._locks = Locks(
            self._redis, self.keys, self.counters, self._sessions, lease=self.lock_lease
        )
        self._write_behind = WriteBehind(self._redis, self.keys, sessions=self._sessions)

    @classmethod
    def from_settings(cls, settings: Settings, *, write_behind: bool) -> RedisStore:
        return cls(settings=settings, write_behind=write_behind)

    def __repr__(self) -> str:
        mode = "write-behind" if self.write_behind else "redis-only"
        return f"RedisStore({self._redis.where!r}, prefix={self.keys.prefix!r}, {mode})"

    @property
    def is_cluster(self) -> bool:
        """Whether this store talks to a Redis Cluster (``redis+cluster://``)."""
        return self._redis.is_cluster

    # -- connection ----------------------------------------------------------------------

    async def client(self) -> Client:
        return await self._redis.client()

    async def call(
        self, what: str, make: Callable[[Client], Awaitable[T]], *, idempotent: bool = False
    ) -> T:
        """Run one Redis operation, mapping redis-py errors to vel's, once (see
        :meth:`Connector.call <vel.stores.redis.client.Connector.call>`)."""
        return await self._redis.call(what, make, idempotent=idempotent)

    async def aclose(self) -> None:
        await self._redis.aclose()

    async def ping(self) -> bool:
        return bool(await self.call("PING", lambda c: c.redis.ping(), idempotent=True))

    # -- reads -----------------------------------------------------------------------------

    async def read(self, session_id: str, limit: int | None = None) -> Window | None:
        """The window, or None when the session is not usable in Redis (a miss)."""
        return await self._sessions.read(session_id, limit)

    async def load(self, session_id: str, limit: int | None = None) -> list[Message]:
        with observed(LOAD, "load", session_id):
            window = await self.read(session_id, limit)
        return [] if window is None else window.messages

    async def exists(self, session_id: str) -> bool:
        return await self._sessions.exists(session_id)

    # -- writes ----------------------------------------------------------------------------

    async def try_append(
        self, session_id: str, items: Sequence[str], first_id: str, unlock: str = ""
    ) -> tuple[int, int]:
        """Run the append script once: returns (code, value) where code is 0 on success.

        ``unlock``: a turn lock token to release in the same step once the items are stored.
        """
        return await self._sessions.try_append(session_id, items, first_id, unlock)

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
        return await self._sessions.append_items(session_id, items, first_id, on_miss, unlock)

    @staticmethod
    def encode(
        messages: Sequence[Message], message_ids: Sequence[str] | None, *, whole: bool = False
    ) -> list[str]:
        """Stored items of ``messages``; ``whole``: a whole history (the replace limit)."""
        return encode(messages, message_ids, whole=whole)

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
        with observed(APPEND, "append", session_id):
            return await self.append_items(session_id, items, items[0].partition("\n")[0])

    async def last_seq(self, session_id: str) -> int:
        return await self._sessions.last_seq(session_id)

    async def try_pop(self, session_id: str) -> tuple[int, Message | None]:
        """Run the pop script once: ``(0, message or None)``, or ``(MISS, None)`` when a
        write-behind store must warm the session first."""
        return await self._sessions.try_pop(session_id)

    async def pop(self, session_id: str) -> Message | None:
        validate_session_id(session_id)
        if self.write_behind:
            raise StoreError("a write-behind RedisStore is driven by its TieredStore")
        return (await self.try_pop(session_id))[1]

    async def try_replace(self, session_id: str, items: Sequence[str]) -> int:
        """Replace (no items: clear), any length: a long history is staged in chunks, then
        swapped in by one script. Returns the new generation, MISS or UNSTAGED."""
        return await self._sessions.try_replace(session_id, items)

    async def replace(
        self,
        session_id: str,
        messages: Sequence[Message],
        message_ids: Sequence[str] | None = None,
    ) -> None:
        validate_session_id(session_id)
        items = self.encode(messages, message_ids, whole=True)
        if self.write_behind:
            raise StoreError("a write-behind RedisStore is driven by its TieredStore")
        for _ in range(3):
            if await self.try_replace(session_id, items) >= 0:
                return
        raise StoreError(f"session {session_id!r}: the staged history kept vanishing")

    async def clear(self, session_id: str) -> None:
        await self.replace(session_id, [])

    # -- listing ----------------------------------------------------------------------------

    async def list_sessions(
        self, inactive_for: float | None = None, limit: int = 1000
    ) -> list[SessionInfo]:
        """Scan the sessions held in Redis (Redis-only mode's listing)."""
        inactive_for = age_arg(inactive_for)
        limit = COUNT.check_int("limit", limit, InvalidInputError)
        return await scan_sessions(self._redis, self.keys, inactive_for, limit)

    # -- organising sessions (Redis-only mode; see vel.stores.redis.catalog) -----------------

    async def session_details(self, session_id: str) -> SessionDetails | None:
        return await catalog.RedisCatalog(self).session_details(session_id)

    async def set_details(
        self, session_id: str, owner: str | _Unset | None, metadata: dict[str, Any] | _Unset
    ) -> None:
        await catalog.RedisCatalog(self).set_details(session_id, owner, metadata)

    async def find_sessions(self, query: Query) -> SessionPage:
        """A page of a listing, by a SCAN of the prefix (cost grows with the sessions)."""
        return await catalog.RedisCatalog(self).find_sessions(query)

    async def history_page(
        self, session_id: str, before: int | None, after: int | None, limit: int
    ) -> HistoryPage:
        return await catalog.history_page(self, session_id, before, after, limit, None, None)

    async def delete_owner(self, owner: str) -> int:
        return await catalog.RedisCatalog(self).delete_owner(owner)

    async def purge_expired(self) -> int:
        return 0  # Redis expires keys by itself

    async def stats(self) -> dict[str, float]:
        result = dict(self.counters)
        if self.is_cluster:
            result["cluster_retries"] = float(self._redis.retries)
        if self.write_behind:
            unflushed, oldest, dirty = await self.backlog()
            result.update(
                unflushed_messages=unflushed,
                oldest_dirty_age=oldest,
                dirty_sessions=dirty,
                conflict_sessions=await self.conflict_count(),
            )
        return result
