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

- :mod:`~vel.stores.postgres.connector`: pools, the per-call deadline;
- :mod:`~vel.stores.postgres.errormap`: error translation, which errors poison a connection;
- :mod:`~vel.stores.postgres.sessions`: write-through append, load, replace, clear;
- :mod:`~vel.stores.postgres.sink`: the two-tier store's flushes and clears;
- :mod:`~vel.stores.postgres.flushes`: what a flush carries and gets back;
- :mod:`~vel.stores.postgres.lease`: the tier lease and the warm's reads;
- :mod:`~vel.stores.postgres.resolve`: resolutions of flush conflicts;
- :mod:`~vel.stores.postgres.locks`: turn-lock lease rows;
- :mod:`~vel.stores.postgres.catalog`: owner and metadata, listings, pages of a history;
- :mod:`~vel.stores.postgres.maintenance`: listing, purge, database gauges.

The public calls, each group a mixin documented in one module:

- :mod:`~vel.stores.postgres.writethrough`: append, load, pop, replace, clear, import;
- :mod:`~vel.stores.postgres.turns`: the turn lock and the locked turn;
- :mod:`~vel.stores.postgres.organise`: the session catalog's calls;
- :mod:`~vel.stores.postgres.operations`: listing, purge, stats;
- :mod:`~vel.stores.postgres.tier`: the two-tier store's calls (sink, lease, resolve, last seq).

This module validates the constructor's arguments, builds the parts and owns their lifecycle.
"""

from __future__ import annotations

import functools
from types import TracebackType
from typing import Any, Self

from vel import metrics
from vel.bounds import LEASE, POOL, POOL_MIN, TIMEOUT, TTL
from vel.errors import ConfigurationError
from vel.namespace import Placement, place
from vel.redaction import normalize_userinfo, redact, remember
from vel.settings import Settings, load_settings
from vel.stores.postgres.catalog import Catalog
from vel.stores.postgres.connector import Connector, Pool, check_injected_pool
from vel.stores.postgres.lease import TierLease
from vel.stores.postgres.locks import TurnLocks
from vel.stores.postgres.maintenance import Maintenance
from vel.stores.postgres.operations import Operations, store_counters
from vel.stores.postgres.organise import Organising
from vel.stores.postgres.resolve import Resolver
from vel.stores.postgres.sessions import Sessions
from vel.stores.postgres.sink import Sink
from vel.stores.postgres.tier import DurableTier
from vel.stores.postgres.turns import TurnEntry
from vel.stores.postgres.writethrough import WriteThrough


class PostgresStore(WriteThrough, TurnEntry, Organising, Operations, DurableTier):
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
            functools.partial(store_counters, self._sessions, self._locks, self._sink, self._db),
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
