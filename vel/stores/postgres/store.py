"""PostgresStore: sessions kept in Postgres, a thin facade over the parts that do the work.

Used directly for ``session_storage='database'`` (write-through) and as the durable tier of the
two-tier store, whose flusher calls :meth:`PostgresStore.apply_flushes` and whose warm calls
:meth:`PostgresStore.take_lease` and :meth:`PostgresStore.load_range`.

The two modes may share one database (DESIGN.md 3.8): the tier lease recorded by the two-tier
store (``hot_until``) makes this store's own writes refuse a session Redis may hold, with
:class:`~vel.errors.TierLeaseError`.

Layout (see ``migrations/0001_initial.sql``): one ``vel_session_rows`` row per session carrying
``last_seq`` and a ``generation`` counter, and an append-only ``vel_messages`` table keyed by
``(session_id, seq)``. Every writer first takes the session row's lock (an upsert), which is what
serialises concurrent appends, flushes, clears and replaces of one session across processes.
The spec's ``vel_sessions(id, context, ...)`` is a view over both tables (``0006``) for SQL
written from the spec; vel itself never reads or writes through it.

The parts, each holding one responsibility and its SQL:

- :mod:`~vel.stores.postgres.connector`: pools, the per-call deadline, error translation;
- :mod:`~vel.stores.postgres.sessions`: write-through append, load, replace, clear;
- :mod:`~vel.stores.postgres.sink`: the two-tier store's flushes and clears;
- :mod:`~vel.stores.postgres.lease`: the tier lease and the warm's reads;
- :mod:`~vel.stores.postgres.resolve`: resolutions of flush conflicts;
- :mod:`~vel.stores.postgres.tier`: the durable-tier calls above, as this store's methods;
- :mod:`~vel.stores.postgres.locks`: turn-lock lease rows;
- :mod:`~vel.stores.postgres.maintenance`: listing, purge, database gauges.

This module validates the constructor's arguments and documents the public calls.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any, Self

from vel import metrics
from vel.bounds import LEASE, POOL, POOL_MIN, TIMEOUT, TTL
from vel.errors import ConfigurationError
from vel.instrument import observed
from vel.messages import Message
from vel.metrics.histograms import APPEND, LOAD
from vel.namespace import Placement, place
from vel.redaction import normalize_userinfo, redact, remember
from vel.settings import Settings, load_settings
from vel.stores.base import SessionInfo
from vel.stores.listing import HistoryPage, Query, SessionDetails, SessionPage, _Unset
from vel.stores.postgres.catalog import Catalog
from vel.stores.postgres.connector import Connector, Pool, check_injected_pool
from vel.stores.postgres.lease import TierLease
from vel.stores.postgres.locks import PostgresTurn, TurnLocks
from vel.stores.postgres.maintenance import Maintenance
from vel.stores.postgres.resolve import Resolver
from vel.stores.postgres.sessions import ImportCounts, ImportEntry, Sessions
from vel.stores.postgres.sink import Sink
from vel.stores.postgres.tier import DurableTier


class PostgresStore(DurableTier):
    """Session histories in Postgres, safe to share between tasks, event loops and processes.

    Args:
        dsn: ``postgresql://user:password@host:port/database``; default ``POSTGRES_DSN``.
        pool: an asyncpg pool to use instead of creating one. It stays the caller's: it is
            never closed here. It works on the event loop it was made on; calls from another
            loop (the plain ``ctxmgr`` calls run on vel's helper loop) are sent to that loop
            while it runs, and refused with ConfigurationError when it cannot run them.
        schema: Postgres schema holding vel's tables (put first in ``search_path``). Not
            combinable with ``pool`` (configure that pool's ``server_settings`` instead).
            Default: the namespace's schema (see :mod:`vel.namespace`): a ``search_path``
            in the DSN, else ``VEL_PG_SCHEMA``, else derived from ``namespace``.
        namespace: the deployment's namespace, its Redis key prefix (default
            ``VEL_KEY_PREFIX``): ``vel`` keeps the DSN's search_path, any other prefix has a
            schema of its own, so two prefixes never share sessions.
        pool_min: connections each event loop's pool keeps open (default 0, so an outage
            does not make the pool retry its floor in the background).
        pool_max: connections per event loop's pool; default ``VEL_PG_POOL_MAX``.
        op_timeout: deadline in seconds for one call, connecting included; default
            ``VEL_OP_TIMEOUT``.
        connect_timeout: seconds allowed to open one connection.
        retention_ttl: seconds a session lives after its last write; default
            ``VEL_RETENTION_TTL`` (unset: forever).
        migrate: apply pending migrations when connecting; default ``VEL_MIGRATE``.
        lock_lease: seconds a turn lock survives without renewal (a crashed holder's lock is
            free again after this); default ``VEL_LOCK_LEASE`` (10).
        settings: where the defaults above come from; default :func:`load_settings`.

    Raises:
        ConfigurationError: no DSN, or an unusable argument.
    """

    def __init__(
        self,
        dsn: str | None = None,
        *,
        pool: Pool | None = None,
        schema: str | None = None,
        namespace: str | None = None,
        pool_min: int = 0,
        pool_max: int | None = None,
        op_timeout: float | None = None,
        connect_timeout: float = 5.0,
        retention_ttl: float | None = None,
        migrate: bool | None = None,
        lock_lease: float | None = None,
        settings: Settings | None = None,
    ) -> None:
        needs_env = (
            (dsn is None and pool is None)
            or (schema is None and namespace is None)
            or pool_max is None
            or op_timeout is None
            or retention_ttl is None
            or migrate is None
            or lock_lease is None
        )
        env = settings if settings is not None else (load_settings() if needs_env else Settings())
        if pool is None:
            dsn = dsn or env.postgres_dsn
            if not dsn or not isinstance(dsn, str):
                raise ConfigurationError(
                    "POSTGRES_DSN is required for session_storage='database' "
                    "(e.g. postgresql://user:password@host:5432/dbname)"
                )
            remember(dsn)
            if not dsn.startswith(("postgresql://", "postgres://")):
                raise ConfigurationError(
                    f"POSTGRES_DSN must start with postgresql://, got {redact(dsn)!r}"
                )
            placement = place(
                schema=schema,
                dsn=dsn,
                env_schema=env.pg_schema,
                prefix=namespace if namespace is not None else env.key_prefix,
            )
        else:
            check_injected_pool(pool)
            if schema is not None:
                raise ConfigurationError(
                    "schema= cannot be combined with pool=: set search_path in that pool's "
                    "server_settings instead"
                )
            placement = Placement(None, "the caller's pool")
        pool_max = env.pg_pool_max if pool_max is None else POOL.check_int("pool_max", pool_max)
        pool_min = POOL_MIN.check_int("pool_min", pool_min)
        if pool_min > pool_max:
            raise ConfigurationError(f"pool_min ({pool_min}) exceeds pool_max ({pool_max})")
        op_timeout = (
            env.op_timeout if op_timeout is None else TIMEOUT.check("op_timeout", op_timeout)
        )
        connect_timeout = TIMEOUT.check("connect_timeout", connect_timeout)
        retention = (
            env.retention_ttl
            if retention_ttl is None
            else TTL.check("retention_ttl", retention_ttl)
        )
        if migrate is not None and not isinstance(migrate, bool):
            raise ConfigurationError(f"migrate must be True, False or None, got {migrate!r}")
        migrate = env.migrate_on_start if migrate is None else migrate
        lock_lease = env.lock_lease if lock_lease is None else LEASE.check("lock_lease", lock_lease)
        self.placement = placement

        self._db = Connector(
            normalize_userinfo(dsn) if pool is None and dsn else None,
            pool=pool,
            schema=placement.schema,
            placement=placement.describe(),
            pool_min=pool_min,
            pool_max=pool_max,
            op_timeout=op_timeout,
            connect_timeout=connect_timeout,
            migrate=migrate,
        )
        self.retention_ttl = retention
        self._sessions = Sessions(self._db, retention)
        self._sink = Sink(self._db, retention)
        self._lease = TierLease(self._db)
        self._resolver = Resolver(self._db, retention)
        self._locks = TurnLocks(self._db, self._sessions, lock_lease)
        self._maintenance = Maintenance(self._db)
        self.catalog = Catalog(self._db)
        metrics.track(
            self,
            functools.partial(_counters, self._sessions, self._locks, self._sink, self._db),
            "postgres",
        )

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: Any) -> PostgresStore:
        """Build a store from :class:`~vel.settings.Settings` (keyword arguments override).

        Raises:
            ConfigurationError: ``settings.postgres_dsn`` is unset and no ``pool`` is given.
        """
        return cls(settings=settings, **kwargs)

    @property
    def where(self) -> str:
        """The server, for messages (never with credentials)."""
        return self._db.where

    def __repr__(self) -> str:
        where = redact(self._db.dsn) if self._db.dsn else "<caller's pool>"
        schema = f", schema={self._db.schema!r}" if self._db.schema else ""
        return f"PostgresStore({where!r}{schema})"

    @property
    def schema(self) -> str | None:
        """The schema holding this store's tables (None: the connection's search_path)."""
        return self._db.schema

    @property
    def connector(self) -> Connector:
        """The pools and deadlines every part of this store runs its SQL through."""
        return self._db

    @property
    def op_timeout(self) -> float:
        """Seconds one call may take, connecting included."""
        return self._db.op_timeout

    @property
    def lock_lease(self) -> float:
        """Seconds a turn lock outlives its holder (renewed while held)."""
        return self._locks.lease

    # --- lifecycle -----------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect (on the running event loop) and check the schema. Idempotent.

        Raises:
            ConfigurationError: bad DSN or credentials, or the schema is missing or outdated
                and ``migrate`` is off (run ``vel migrate``).
            StoreUnavailableError: Postgres cannot be reached in time.
        """
        await self._db.open()

    async def aclose(self) -> None:
        """Close this event loop's pool (not a caller's pool) and its turn-lock listener
        connection. Idempotent.

        The store stays usable: a later call opens a new pool.
        """
        try:
            await self._locks.aclose()
        finally:
            await self._db.aclose()

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # --- SessionStore ----------------------------------------------------------------------------

    async def append(
        self,
        session_id: str,
        messages: Sequence[Message],
        message_ids: Sequence[str] | None = None,
    ) -> int:
        """Atomically append ``messages``; return the session's new last seq.

        Replaying an append with the same ``message_ids`` stores nothing and returns the seq
        of the last of those messages. Appending to an expired session starts a new history.

        Args:
            session_id: the session.
            messages: OpenAI-format message dicts (empty: nothing is written).
            message_ids: one unique id per message, kept across retries; generated if None.

        Returns:
            The seq of the last message of the session after the append.

        Raises:
            InvalidInputError: bad id or message, or ids already used by other messages.
            TierLeaseError: the session is held by the Redis tier (use 'redis' mode).
            StoreError: Postgres failed; retry with the same ``message_ids``.
        """
        with observed(APPEND, "append", session_id):
            return await self._sessions.append(session_id, messages, message_ids)

    async def load(self, session_id: str, limit: int | None = None) -> list[Message]:
        """Return the last ``limit`` messages (all when None), oldest first.

        Cost depends on ``limit``, not on the session's length. Unknown, cleared and expired
        sessions are empty.

        Raises:
            InvalidInputError: bad session id or limit.
            StoreError: Postgres failed.
        """
        with observed(LOAD, "load", session_id):
            return await self._sessions.load(session_id, limit)

    async def pop(self, session_id: str) -> Message | None:
        """Atomically remove and return the newest message (None for an unknown, empty or
        expired session); one transaction whose ``DELETE ... RETURNING`` takes the message.

        The session's generation moves on, as with :meth:`clear`, so a Redis copy made
        before the pop is never flushed back over it.

        Raises:
            InvalidInputError: bad session id.
            StoreError: Postgres failed; nothing changed (unless it failed while
                committing: then the message may be gone).
        """
        return await self._sessions.pop(session_id)

    async def replace(
        self,
        session_id: str,
        messages: Sequence[Message],
        message_ids: Sequence[str] | None = None,
    ) -> None:
        """Atomically replace the whole history with ``messages`` (seqs restart at 1).

        Any length up to ``MAX_MESSAGES_PER_REPLACE``, written in chunks inside one
        transaction (readers see the old history or the new one).

        Args:
            session_id: the session.
            messages: the new history.
            message_ids: one unique id per message (generated when None).

        Raises:
            InvalidInputError: bad id or message; nothing changed.
            TierLeaseError: the session is held by the Redis tier; nothing changed.
            StoreError: Postgres failed; nothing changed.
        """
        await self._sessions.replace(session_id, messages, message_ids)

    async def clear(self, session_id: str) -> None:
        """Delete the session's history; a no-op for an unknown session.

        The session row stays behind (with ``last_seq`` 0) so that its generation outlives
        the messages; :meth:`purge_expired` removes it an hour later.

        Raises:
            InvalidInputError: bad session id.
            TierLeaseError: the session is held by the Redis tier; nothing changed.
            StoreError: Postgres failed; nothing changed.
        """
        await self._sessions.clear(session_id)

    async def import_sessions(
        self, entries: Sequence[ImportEntry], *, replace: bool = False
    ) -> ImportCounts:
        """Write a whole import in one transaction: every session of it, or none.

        A session that already has messages is skipped, or with ``replace`` its history is
        replaced; new sessions get the entries' histories with their message ids.

        Raises:
            InvalidInputError: a session listed twice; nothing was written.
            TierLeaseError: one of the sessions is held by the Redis tier; nothing was
                written (import with 'redis' storage instead).
            StoreError: Postgres failed; nothing was written.
        """
        return await self._sessions.import_sessions(entries, replace=replace)

    async def list_sessions(
        self, inactive_for: float | None = None, limit: int = 1000
    ) -> list[SessionInfo]:
        """Sessions that have messages and have not expired, least recently updated first.

        Args:
            inactive_for: only sessions not updated for at least this many seconds.
            limit: at most this many.

        Returns:
            One :class:`SessionInfo` per session (``message_count`` is its last seq).

        Raises:
            InvalidInputError: a negative argument.
            StoreError: Postgres failed.
        """
        return await self._maintenance.list_sessions(inactive_for, limit)

    # --- organising sessions (vel.stores.listing.SessionCatalog) ---------------------------------

    async def session_details(self, session_id: str) -> SessionDetails | None:
        """The session's owner, metadata, size and times; None without messages.

        Raises:
            InvalidInputError: bad session id.
            StoreError: Postgres failed.
        """
        return await self.catalog.session_details(session_id)

    async def set_details(
        self, session_id: str, owner: str | _Unset | None, metadata: dict[str, Any] | _Unset
    ) -> None:
        """Set the owner and/or metadata (UNSET: kept). Not a write of the history: allowed
        while the Redis tier holds the session, and its ``updated_at`` does not move.

        Raises:
            InvalidInputError: bad id, owner or metadata.
            StoreError: Postgres failed; nothing changed.
        """
        await self.catalog.set_details(session_id, owner, metadata)

    async def find_sessions(self, query: Query) -> SessionPage:
        """One page of a listing by index (see :mod:`vel.stores.listing`).

        Raises:
            InvalidInputError: a cursor that is not vel's.
            StoreError: Postgres failed.
        """
        return await self.catalog.find_sessions(query)

    async def history_page(
        self, session_id: str, before: int | None, after: int | None, limit: int
    ) -> HistoryPage:
        """Messages with ``after < seq < before`` (the newest ``limit``, or the oldest when
        only ``after`` is given), read by the primary key's range scan.

        Raises:
            InvalidInputError: bad session id.
            StoreError: Postgres failed.
        """
        return await self.catalog.history_page(session_id, before, after, limit)

    async def delete_owner(self, owner: str) -> int:
        """Delete every session of ``owner``: its history (as :meth:`clear` does, leaving a
        tombstone that carries the generation) and its owner and metadata.

        Returns:
            How many sessions the owner had.

        Raises:
            TierLeaseError: a session is held by the Redis tier (use 'redis' storage); the
                sessions before it are deleted.
            StoreError: Postgres failed; run it again to finish.
        """
        deleted, after = 0, ""
        while ids := await self.catalog.owned(owner, after, 500):
            for session_id in ids:
                await self._sessions.clear(session_id)
            await self.catalog.forget_details(owner, ids)
            deleted += len(ids)
            after = ids[-1]
        return deleted

    async def purge_expired(self) -> int:
        """Delete expired sessions (messages included) and cleared sessions idle for an hour.

        Works in batches of 500 sessions, each within its own ``op_timeout``.

        Returns:
            How many sessions that still had messages were deleted.

        Raises:
            StoreError: Postgres failed (batches already done stay done).
        """
        return await self._maintenance.purge_expired()

    def turn_lock(
        self, session_id: str, timeout: float | None = None
    ) -> AbstractAsyncContextManager[None]:
        """Hold the session's turn lock, a lease row shared by every process.

        The lease is renewed in the background every ``lock_lease / 3`` seconds while held
        and released on exit; a holder that dies loses it after ``lock_lease`` seconds.
        No connection is held in between.

        Args:
            session_id: the session.
            timeout: seconds to wait for the lock (default 30; 0 tries once).

        Raises:
            SessionLockedError: another holder kept the lock for ``timeout`` seconds.
            StoreError: Postgres failed while acquiring.
        """
        return self._locks.hold(session_id, timeout)

    def turn(
        self, session_id: str, limit: int | None = None, timeout: float | None = None
    ) -> AbstractAsyncContextManager[PostgresTurn]:
        """A turn under the session's turn lock, in two round trips: the lock is taken with
        the window read and released by :meth:`PostgresTurn.commit
        <vel.stores.postgres.locks.PostgresTurn.commit>` in the append's own transaction
        (the Agent runs its turns this way).

        ``turn.window`` holds the last ``limit`` messages (all when None), oldest first. Leaving
        the block without committing releases the lock and stores nothing. The lease is
        renewed while a turn outlives a sixth of ``lock_lease``; a holder that dies loses it
        after ``lock_lease`` seconds.

        Args:
            session_id: the session.
            limit: the window's size (None: the whole history).
            timeout: seconds to wait for the lock (default 30; 0 tries once).

        Raises:
            SessionLockedError: another holder kept the lock for ``timeout`` seconds.
            InvalidInputError: bad session id or limit.
            StoreError: Postgres failed.
        """
        return self._locks.turn(session_id, limit, timeout)

    async def stats(self) -> dict[str, float]:
        """Counters of this store object and gauges of the database.

        Returns:
            ``sessions`` and ``messages`` (live, database-wide), ``pool_size`` and
            ``pool_idle`` (this event loop's pool), and this object's counters: ``appends``,
            ``append_retries_deduplicated``, ``lock_waits``, ``flushes``,
            ``flush_duplicates``, ``flush_stale``, ``failures``.

        Raises:
            StoreError: Postgres failed.
        """
        result = await self._maintenance.gauges()
        result.update(_counters(self._sessions, self._locks, self._sink, self._db))
        return result

    # --- durable tier of the two-tier store ------------------------------------------------------

    async def last_seq(self, session_id: str) -> tuple[int, int]:
        """Return ``(generation, last_seq)``; ``(0, 0)`` for an unknown or expired session.

        Raises:
            InvalidInputError: bad session id.
            StoreError: Postgres failed.
        """
        return await self._sessions.last_seq(session_id)


def _counters(sessions: Sessions, locks: TurnLocks, sink: Sink, db: Connector) -> dict[str, float]:
    """This store's counters, from its parts (not from the store: tracking them must not
    keep it alive)."""
    return {
        **sessions.counters(),
        "lock_waits": float(locks.waits),
        **sink.counters(),
        "failures": float(db.failures),
    }
