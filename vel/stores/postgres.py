"""PostgresStore: sessions kept in Postgres.

Used directly for ``session_storage='database'`` (write-through) and as the durable tier of the
two-tier store, whose flusher calls :meth:`PostgresStore.apply_flush`,
:meth:`PostgresStore.apply_clear` and :meth:`PostgresStore.load_snapshot`.

Layout (see ``migrations/0001_initial.sql``): one ``vel_sessions`` row per session carrying
``last_seq`` and a ``generation`` counter, and an append-only ``vel_messages`` table keyed by
``(session_id, seq)``. Every writer first takes the session row's lock (an upsert), which is what
serialises concurrent appends, flushes, clears and replaces of one session across processes.

Each call has one overall deadline (``op_timeout``) covering pool creation, connection
acquisition and every round trip; on expiry the connection in use is terminated rather than
returned to the pool, because its protocol state is unknown. Backend errors are translated to
:mod:`vel.errors` exactly once, in :meth:`PostgresStore._deadline`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self, TypeAlias, TypeVar

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from vel import failpoints
from vel._lease import LeaseKeeper
from vel._loops import PerLoop
from vel.errors import (
    ConfigurationError,
    FlushConflictError,
    InvalidInputError,
    SessionLockedError,
    StoreError,
    StoreTimeoutError,
    StoreUnavailableError,
    VelError,
)
from vel.messages import (
    Message,
    check_message_ids,
    decode_message,
    encode_messages,
    validate_session_id,
)
from vel.settings import Settings, load_settings
from vel.stores.base import SessionInfo
from vel.stores.migrate import (
    CONNECT_ERRORS,
    connect_error,
    latest_version,
    migrate,
    redact_dsn,
    schema_version,
    validate_schema_name,
)

__all__ = ["FlushConflictError", "FlushResult", "PostgresStore", "Snapshot"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
# Strings: asyncpg's classes are generic only in its type stubs.
Pool: TypeAlias = "asyncpg.Pool[asyncpg.Record]"
Conn: TypeAlias = "PoolConnectionProxy[asyncpg.Record]"

DEFAULT_LOCK_TIMEOUT = 30.0
# Cleared sessions keep their row (a tombstone carrying the generation) this long, so a flush
# that was in flight when the session was cleared still finds the newer generation.
TOMBSTONE_TTL = "1 hour"
PURGE_BATCH = 500
# SQLSTATE classes meaning the connection or server is in trouble rather than the statement:
# 08 connection exception, 53 insufficient resources, 57 operator intervention (shutdown,
# cancel), 58 system error, XX internal error.
_TROUBLE_CLASSES = frozenset({"08", "53", "57", "58", "XX"})
_MESSAGE_ID_KEY = "vel_messages_message_id_key"

# --- SQL -------------------------------------------------------------------------------------
# Retention is passed as float8 seconds or NULL; now() + NULL * interval is NULL (never expires).

# One round trip: the upsert takes the session row lock (serialising concurrent appends), bumps
# last_seq by k and hands the new value to the insert, which numbers the batch last_seq-k+1 ..
# last_seq. An expired session matches the upsert's WHERE nowhere and returns no row: the caller
# then deletes it and retries, so it starts a fresh history. A session with last_seq = 0 (new or
# cleared) restarts created_at.
_APPEND = """
WITH sess AS (
    INSERT INTO vel_sessions AS s (id, last_seq, expires_at)
    VALUES ($1, cardinality($2::text[]), now() + $4::float8 * interval '1 second')
    ON CONFLICT (id) DO UPDATE
       SET last_seq = s.last_seq + EXCLUDED.last_seq,
           updated_at = now(),
           expires_at = EXCLUDED.expires_at,
           created_at = CASE WHEN s.last_seq = 0 THEN now() ELSE s.created_at END
     WHERE s.expires_at IS NULL OR s.expires_at > now()
    RETURNING s.last_seq
), ins AS (
    INSERT INTO vel_messages (session_id, seq, message_id, message)
    SELECT $1, sess.last_seq - cardinality($2::text[]) + m.ord, m.message_id, m.message::jsonb
      FROM sess, unnest($2::text[], $3::text[]) WITH ORDINALITY AS m (message_id, message, ord)
)
SELECT last_seq FROM sess
"""
_DELETE_EXPIRED = "DELETE FROM vel_sessions WHERE id = $1 AND expires_at <= now()"
_REPLAYED = """
SELECT count(*) AS found, coalesce(max(seq), 0) AS last_seq
  FROM vel_messages
 WHERE session_id = $1 AND message_id = ANY($2::text[])
"""
_LAST_SEQ = """
SELECT generation, last_seq
  FROM vel_sessions
 WHERE id = $1 AND (expires_at IS NULL OR expires_at > now())
"""
# The EXISTS is uncorrelated, so it runs once as a one-time filter; the window is a backward
# scan of the primary key that stops after $2 rows (LIMIT NULL = all).
_LOAD = """
SELECT m.message::text
  FROM vel_messages m
 WHERE m.session_id = $1
   AND EXISTS (SELECT 1 FROM vel_sessions s
                WHERE s.id = $1 AND s.last_seq > 0
                  AND (s.expires_at IS NULL OR s.expires_at > now()))
 ORDER BY m.seq DESC
 LIMIT $2::bigint
"""
_REPLACE_SESSION = """
INSERT INTO vel_sessions AS s (id, last_seq, expires_at)
VALUES ($1, $2::bigint, now() + $3::float8 * interval '1 second')
ON CONFLICT (id) DO UPDATE
   SET generation = s.generation + 1,
       last_seq = EXCLUDED.last_seq,
       updated_at = now(),
       expires_at = EXCLUDED.expires_at,
       created_at = CASE WHEN s.last_seq = 0 OR s.expires_at <= now()
                         THEN now() ELSE s.created_at END
"""
# Deletes run as statements of their own, after the row lock is held: a DELETE sharing a
# statement with the lock would use a snapshot from before the wait and miss rows committed
# meanwhile by the writer it waited for.
_DELETE_MESSAGES = "DELETE FROM vel_messages WHERE session_id = $1"
_INSERT_FROM_ONE = """
INSERT INTO vel_messages (session_id, seq, message_id, message)
SELECT $1, m.ord, m.message_id, m.message::jsonb
  FROM unnest($2::text[], $3::text[]) WITH ORDINALITY AS m (message_id, message, ord)
"""
_CLEAR_SESSION = """
UPDATE vel_sessions
   SET generation = generation + 1, last_seq = 0, updated_at = now()
 WHERE id = $1
RETURNING id
"""
_LIST = """
SELECT id, last_seq, created_at, updated_at, expires_at
  FROM vel_sessions
 WHERE last_seq > 0
   AND (expires_at IS NULL OR expires_at > now())
   AND ($1::float8 IS NULL OR updated_at <= now() - $1::float8 * interval '1 second')
 ORDER BY updated_at, id
 LIMIT $2
"""
# FOR UPDATE re-checks the condition on the newest row version, so a session renewed by a
# concurrent append is spared; SKIP LOCKED keeps purging from queueing behind live writers.
_PURGE = f"""
WITH doomed AS (
    SELECT id FROM vel_sessions
     WHERE expires_at <= now()
        OR (last_seq = 0 AND updated_at < now() - interval '{TOMBSTONE_TTL}')
     LIMIT $1
       FOR UPDATE SKIP LOCKED
), gone AS (
    DELETE FROM vel_sessions s USING doomed d WHERE s.id = d.id RETURNING s.last_seq
)
SELECT count(*) AS deleted, count(*) FILTER (WHERE last_seq > 0) AS with_messages FROM gone
"""
_PURGE_LOCKS = "DELETE FROM vel_locks WHERE expires_at < now() - interval '1 hour'"
# sum(last_seq) counts live messages without scanning vel_messages (seqs are gap-free).
_STATS = """
SELECT count(*) AS sessions, coalesce(sum(last_seq), 0) AS messages
  FROM vel_sessions
 WHERE last_seq > 0 AND (expires_at IS NULL OR expires_at > now())
"""
# One statement, hence one snapshot: the header and the rows always agree.
_SNAPSHOT = """
SELECT s.generation, s.last_seq,
       floor(extract(epoch FROM s.created_at) * 1000)::bigint AS created_ms,
       floor(extract(epoch FROM s.updated_at) * 1000)::bigint AS updated_ms,
       floor(extract(epoch FROM s.expires_at) * 1000)::bigint AS expires_ms,
       m.seq, m.message_id, m.message::text AS message
  FROM vel_sessions s
  LEFT JOIN vel_messages m ON m.session_id = s.id
 WHERE s.id = $1 AND (s.expires_at IS NULL OR s.expires_at > now())
 ORDER BY m.seq
"""
# Creates the rows (with the caller's generations) or locks the existing ones, in id order so
# that concurrent flushers of overlapping batches cannot deadlock. The no-op SET is what makes
# ON CONFLICT lock and return the newest version of each row.
_LOCK_SESSIONS = """
INSERT INTO vel_sessions AS s (id, generation, expires_at)
SELECT u.id, u.generation, now() + $3::float8 * interval '1 second'
  FROM unnest($1::text[], $2::bigint[]) AS u (id, generation)
 ORDER BY u.id
ON CONFLICT (id) DO UPDATE SET last_seq = s.last_seq
RETURNING s.id, s.generation, coalesce(s.expires_at <= now(), false) AS expired
"""
# Runs with the row locks held, so its snapshot already holds every message of the sessions.
_RESET_SESSIONS = """
WITH target AS (
    SELECT u.id, u.generation FROM unnest($1::text[], $2::bigint[]) AS u (id, generation)
), gone AS (
    DELETE FROM vel_messages WHERE session_id = ANY($1::text[])
)
UPDATE vel_sessions s
   SET generation = t.generation,
       last_seq = 0,
       updated_at = now(),
       created_at = CASE WHEN s.expires_at <= now() THEN now() ELSE s.created_at END,
       expires_at = now() + $3::float8 * interval '1 second'
  FROM target t
 WHERE s.id = t.id
"""
# With the row locks held, "clash" sees exactly the rows that existed before this batch: a seq
# already stored under another message id means the two tiers' histories diverged. A message
# id already stored under another seq fails the insert itself (unique violation). $5 lists
# every session of the batch, rows or not, so each gets updated_at and one result row.
_FLUSH = """
WITH batch AS (
    SELECT b.session_id, b.seq, b.message_id, b.message
      FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[])
           AS b (session_id, seq, message_id, message)
), ins AS (
    INSERT INTO vel_messages (session_id, seq, message_id, message)
    SELECT session_id, seq, message_id, message::jsonb FROM batch
    ON CONFLICT (session_id, seq) DO NOTHING
    RETURNING session_id
), clash AS (
    SELECT b.session_id, b.seq
      FROM batch b
      JOIN vel_messages m ON m.session_id = b.session_id AND m.seq = b.seq
     WHERE m.message_id <> b.message_id
), upd AS (
    UPDATE vel_sessions s
       SET last_seq = greatest(s.last_seq, t.max_seq),
           updated_at = now(),
           expires_at = now() + $6::float8 * interval '1 second'
      FROM (SELECT k.id, max(b.seq) AS max_seq
              FROM unnest($5::text[]) AS k (id)
              LEFT JOIN batch b ON b.session_id = k.id
             GROUP BY k.id) t
     WHERE s.id = t.id
)
SELECT k.id AS session_id, coalesce(i.n, 0) AS inserted, c.seqs AS clashes
  FROM unnest($5::text[]) AS k (id)
  LEFT JOIN (SELECT session_id, count(*) AS n FROM ins GROUP BY session_id) i
         ON i.session_id = k.id
  LEFT JOIN (SELECT session_id, array_agg(seq ORDER BY seq) AS seqs FROM clash
              GROUP BY session_id) c
         ON c.session_id = k.id
"""
# After a unique violation on the message id: which of our ids sit at another seq.
_MISPLACED_IDS = """
SELECT m.session_id, m.seq
  FROM unnest($1::text[], $2::bigint[], $3::text[]) AS b (session_id, seq, message_id)
  JOIN vel_messages m ON m.session_id = b.session_id AND m.message_id = b.message_id
 WHERE m.seq <> b.seq
 ORDER BY m.session_id, m.seq
"""
# Takes the lease if nobody holds it or the holder's lease ran out (a crashed holder).
_LOCK_ACQUIRE = """
INSERT INTO vel_locks AS l (session_id, token, expires_at)
VALUES ($1, $2, now() + $3::float8 * interval '1 second')
ON CONFLICT (session_id) DO UPDATE
   SET token = EXCLUDED.token, expires_at = EXCLUDED.expires_at
 WHERE l.expires_at < now()
RETURNING token
"""
_LOCK_RENEW = """
UPDATE vel_locks SET expires_at = now() + $3::float8 * interval '1 second'
 WHERE session_id = $1 AND token = $2
RETURNING token
"""
_LOCK_RELEASE = "DELETE FROM vel_locks WHERE session_id = $1 AND token = $2"


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A session as Postgres holds it (what the two-tier store warms Redis from).

    Attributes:
        generation: bumped by every clear/replace.
        last_seq: seq of the newest message (0 for a cleared session).
        rows: ``(seq, message_id, message JSON text)``, oldest first, text as stored.
        created_ms, updated_ms, expires_ms: Unix times in milliseconds (``expires_ms`` None
            when the session never expires).
    """

    generation: int
    last_seq: int
    rows: list[tuple[int, str, str]]
    created_ms: int
    updated_ms: int
    expires_ms: int | None


@dataclass(frozen=True, slots=True)
class FlushResult:
    """Outcome of :meth:`PostgresStore.apply_flush`.

    Attributes:
        inserted: rows newly written.
        duplicates: rows already present with the same message id (a replayed batch).
        stale: the batch belonged to an older generation and was ignored.
    """

    inserted: int
    duplicates: int
    stale: bool = False


def _poisons_connection(exc: BaseException) -> bool:
    """Whether a connection that raised ``exc`` must be discarded rather than reused.

    Only errors the server reported about the statement itself leave the protocol in a known
    state; timeouts, cancellations, I/O and driver errors may leave a half-read reply behind.
    """
    if isinstance(exc, VelError):
        return False
    if isinstance(exc, asyncpg.PostgresError):
        return exc.sqlstate[:2] in _TROUBLE_CLASSES
    return True


@asynccontextmanager
async def _transaction(conn: Conn) -> AsyncIterator[None]:
    """A transaction that never waits on a connection that may be dead.

    asyncpg's own context manager always sends ROLLBACK on error, which against a frozen
    server would wait past the deadline; terminating the connection rolls back just as well.
    """
    tx = conn.transaction()
    await tx.start()
    try:
        yield
    except BaseException as exc:
        if _poisons_connection(exc):
            conn.terminate()
        else:
            await tx.rollback()
        raise
    else:
        await tx.commit()


def _seconds(name: str, value: float, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationError(f"{name} must be a number of seconds, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigurationError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")
    return float(value)


def _non_negative(name: str, value: object, kind: type[int] | type[float]) -> Any:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float) if kind is float else int)
        or value < 0
    ):
        raise InvalidInputError(f"{name} must be a non-negative {kind.__name__}, got {value!r}")
    return value


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


class PostgresStore:
    """Session histories in Postgres, safe to share between tasks, event loops and processes.

    Args:
        dsn: ``postgresql://user:password@host:port/database``; default ``POSTGRES_DSN``.
        pool: an asyncpg pool to use instead of creating one. It stays the caller's: it is
            never closed here, and works only on the event loop it was made on.
        schema: Postgres schema holding vel's tables (put in ``search_path``); lets tenants or
            tests share a database. Not combinable with ``pool`` (configure that pool's
            ``server_settings`` instead).
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
            free again after this).
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
        pool_min: int = 0,
        pool_max: int | None = None,
        op_timeout: float | None = None,
        connect_timeout: float = 5.0,
        retention_ttl: float | None = None,
        migrate: bool | None = None,
        lock_lease: float = 60.0,
        settings: Settings | None = None,
    ) -> None:
        needs_env = (
            (dsn is None and pool is None)
            or pool_max is None
            or op_timeout is None
            or retention_ttl is None
            or migrate is None
        )
        env = settings if settings is not None else (load_settings() if needs_env else Settings())
        if pool is None:
            dsn = dsn or env.postgres_dsn
            if not dsn:
                raise ConfigurationError(
                    "POSTGRES_DSN is required for session_storage='database' "
                    "(e.g. postgresql://user:password@host:5432/dbname)"
                )
            if not dsn.startswith(("postgresql://", "postgres://")):
                raise ConfigurationError(
                    f"POSTGRES_DSN must start with postgresql://, got {redact_dsn(dsn)!r}"
                )
        elif schema is not None:
            raise ConfigurationError(
                "schema= cannot be combined with pool=: set search_path in that pool's "
                "server_settings instead"
            )
        self._dsn = dsn if pool is None else None
        self._schema = validate_schema_name(schema) if schema is not None else None
        pool_max = env.pg_pool_max if pool_max is None else pool_max
        if isinstance(pool_min, bool) or not isinstance(pool_min, int) or pool_min < 0:
            raise ConfigurationError(f"pool_min must be an int >= 0, got {pool_min!r}")
        if isinstance(pool_max, bool) or not isinstance(pool_max, int) or pool_max < 1:
            raise ConfigurationError(f"pool_max must be an int >= 1, got {pool_max!r}")
        if pool_min > pool_max:
            raise ConfigurationError(f"pool_min ({pool_min}) exceeds pool_max ({pool_max})")
        self._pool_min = pool_min
        self._pool_max = pool_max
        self._op_timeout = _seconds(
            "op_timeout", env.op_timeout if op_timeout is None else op_timeout
        )
        self._connect_timeout = _seconds("connect_timeout", connect_timeout)
        retention = env.retention_ttl if retention_ttl is None else retention_ttl
        self._retention = None if retention is None else _seconds("retention_ttl", retention)
        self._migrate = env.migrate_on_start if migrate is None else bool(migrate)
        self._lock_lease = _seconds("lock_lease", lock_lease)

        self._injected = pool
        self._injected_ready = False
        self._pools: PerLoop[Pool] = PerLoop(self._create_pool, self._close_pool)
        self._appends = 0
        self._deduplicated = 0
        self._lock_waits = 0
        self._flushes = 0
        self._flush_duplicates = 0
        self._flush_stale = 0
        self._failures = 0

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: Any) -> PostgresStore:
        """Build a store from :class:`~vel.settings.Settings` (keyword arguments override).

        Raises:
            ConfigurationError: ``settings.postgres_dsn`` is unset and no ``pool`` is given.
        """
        return cls(settings=settings, **kwargs)

    def __repr__(self) -> str:
        where = redact_dsn(self._dsn) if self._dsn else "<caller's pool>"
        schema = f", schema={self._schema!r}" if self._schema else ""
        return f"PostgresStore({where!r}{schema})"

    @property
    def op_timeout(self) -> float:
        """Seconds one call may take, connecting included."""
        return self._op_timeout

    @property
    def _where(self) -> str:
        return redact_dsn(self._dsn) if self._dsn else "the caller's pool"

    # --- lifecycle -----------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect (on the running event loop) and check the schema. Idempotent.

        Raises:
            ConfigurationError: bad DSN or credentials, or the schema is missing or outdated
                and ``migrate`` is off (run ``vel migrate``).
            StoreUnavailableError: Postgres cannot be reached in time.
        """
        async with self._deadline("open", self._connect_timeout + self._op_timeout):
            await self._get_pool()

    async def aclose(self) -> None:
        """Close this event loop's pool (not a caller's pool). Idempotent.

        The store stays usable: a later call opens a new pool.
        """
        await self._pools.aclose()

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

    async def _create_pool(self) -> Pool:
        assert self._dsn is not None
        server_settings = {
            "application_name": "vel",
            # Server-side backstops for what the client deadline cannot reach: a statement
            # left running by a client that gave up, and a frozen client (SIGSTOP, GC pause)
            # sitting in a transaction with a session row locked.
            "statement_timeout": str(int(self._op_timeout * 1000) + 1000),
            "idle_in_transaction_session_timeout": str(int(max(10.0, 2 * self._op_timeout) * 1000)),
        }
        if self._schema is not None:
            server_settings["search_path"] = f'"{self._schema}"'
        try:
            pool: Pool = await asyncpg.create_pool(
                self._dsn,
                min_size=self._pool_min,
                max_size=self._pool_max,
                timeout=self._connect_timeout,
                command_timeout=self._op_timeout,
                max_inactive_connection_lifetime=300.0,
                server_settings=server_settings,
            )
        except CONNECT_ERRORS as exc:
            raise connect_error(exc, self._dsn) from exc
        try:
            # The first connection is opened here even with pool_min=0, so a bad DSN or
            # wrong password is reported as such when the store opens.
            try:
                conn = await pool.acquire(timeout=self._connect_timeout)
            except CONNECT_ERRORS as exc:
                raise connect_error(exc, self._dsn) from exc
            await pool.release(conn)
            await self._check_schema(pool)
        except BaseException:
            pool.terminate()
            raise
        return pool

    async def _close_pool(self, pool: Pool) -> None:
        try:
            await asyncio.wait_for(pool.close(), self._op_timeout)
        except asyncio.CancelledError:
            pool.terminate()
            raise
        except Exception as exc:
            # A frozen server or a connection still in use: closing must not hang or fail.
            pool.terminate()
            logger.warning("Postgres pool at %s closed forcibly: %s", self._where, _one_line(exc))

    async def _check_schema(self, pool: Pool) -> None:
        """Refuse to run against a missing or outdated schema (or migrate it, if allowed)."""
        need = latest_version()
        version = await self._use(pool, schema_version)
        if version >= need:
            return
        if self._migrate:
            await self._use(pool, lambda conn: migrate(conn, self._schema))
            return
        where = f"schema {self._schema!r}" if self._schema else "the search_path"
        state = "has no vel tables" if version == 0 else f"is at version {version}, need {need}"
        raise ConfigurationError(
            f"Postgres {where} at {self._where} {state}: run `vel migrate` "
            "(or set VEL_MIGRATE=1 to migrate at start-up)"
        )

    async def _get_pool(self) -> Pool:
        if self._injected is None:
            return await self._pools.get()
        if not self._injected_ready:
            await self._check_schema(self._injected)
            self._injected_ready = True
        return self._injected

    # --- the one place backend errors are handled --------------------------------------------

    async def _use(self, pool: Pool, op: Callable[[Conn], Awaitable[T]]) -> T:
        conn = await pool.acquire(timeout=self._op_timeout)
        try:
            return await op(conn)
        except BaseException as exc:
            if _poisons_connection(exc):
                # Released below as closed, so the pool opens a fresh one next time.
                conn.terminate()
            raise
        finally:
            await pool.release(conn)

    async def _run(self, action: str, op: Callable[[Conn], Awaitable[T]]) -> T:
        async with self._deadline(action, self._op_timeout):
            return await self._use(await self._get_pool(), op)

    @asynccontextmanager
    async def _deadline(self, action: str, seconds: float) -> AsyncIterator[None]:
        try:
            async with asyncio.timeout(seconds):
                yield
        except VelError:
            raise
        except Exception as exc:
            self._failures += 1
            raise self._translate(action, exc, seconds) from exc

    def _translate(self, action: str, exc: Exception, seconds: float) -> VelError:
        detail = _one_line(exc)
        if isinstance(exc, TimeoutError | asyncpg.QueryCanceledError):
            return StoreTimeoutError(
                f"Postgres {action} did not finish within {seconds:g}s ({self._where})"
            )
        if isinstance(exc, asyncpg.UndefinedTableError):
            return ConfigurationError(
                f"vel tables are missing at {self._where} ({detail}): run `vel migrate`"
            )
        if isinstance(exc, asyncpg.DataError):
            return InvalidInputError(f"Postgres rejected the data of {action}: {detail}")
        if isinstance(exc, asyncpg.PostgresError):
            if exc.sqlstate[:2] in _TROUBLE_CLASSES:
                return StoreUnavailableError(f"Postgres {action} failed ({self._where}): {detail}")
            return StoreError(f"Postgres {action} failed: {detail}")
        if isinstance(exc, OSError | asyncpg.InterfaceError):
            return StoreUnavailableError(
                f"Postgres connection failed during {action} ({self._where}): {detail}"
            )
        return StoreError(f"Postgres {action} failed: {detail}")

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
            StoreError: Postgres failed; retry with the same ``message_ids``.
        """
        session_id = validate_session_id(session_id)
        encoded = encode_messages(messages)
        ids = check_message_ids(message_ids, len(encoded))
        if not encoded:
            current = await self._run("append", lambda c: c.fetchrow(_LAST_SEQ, session_id))
            return 0 if current is None else int(current["last_seq"])

        async def op(conn: Conn) -> int:
            # A replay can race with a clear that deletes the rows it collided with; then the
            # append is simply new again and the next round stores it.
            for _ in range(3):
                try:
                    last = await conn.fetchval(_APPEND, session_id, ids, encoded, self._retention)
                    if last is None:
                        async with _transaction(conn):
                            await conn.execute(_DELETE_EXPIRED, session_id)
                            last = await conn.fetchval(
                                _APPEND, session_id, ids, encoded, self._retention
                            )
                    if last is None:
                        raise StoreError(f"session {session_id!r}: append found no session row")
                    self._appends += 1
                    return int(last)
                except asyncpg.UniqueViolationError as exc:
                    if exc.constraint_name != _MESSAGE_ID_KEY:
                        raise
                replayed = await conn.fetchrow(_REPLAYED, session_id, ids)
                assert replayed is not None
                found = int(replayed["found"])
                if found == len(ids):
                    self._deduplicated += 1
                    return int(replayed["last_seq"])
                if found:
                    raise InvalidInputError(
                        f"session {session_id!r}: {found} of {len(ids)} message_ids already "
                        "belong to other stored messages"
                    )
            raise StoreError(f"session {session_id!r}: append kept colliding with clears")

        return await self._run("append", op)

    async def load(self, session_id: str, limit: int | None = None) -> list[Message]:
        """Return the last ``limit`` messages (all when None), oldest first.

        Cost depends on ``limit``, not on the session's length. Unknown, cleared and expired
        sessions are empty.

        Raises:
            InvalidInputError: bad session id or limit.
            StoreError: Postgres failed.
        """
        session_id = validate_session_id(session_id)
        if limit is not None:
            _non_negative("limit", limit, int)
            if limit == 0:
                return []
        rows = await self._run("load", lambda c: c.fetch(_LOAD, session_id, limit))
        return [decode_message(row[0]) for row in reversed(rows)]

    async def replace(self, session_id: str, messages: Sequence[Message]) -> None:
        """Atomically replace the whole history with ``messages`` (seqs restart at 1).

        Raises:
            InvalidInputError: bad id or message; nothing changed.
            StoreError: Postgres failed; nothing changed.
        """
        session_id = validate_session_id(session_id)
        encoded = encode_messages(messages)
        ids = check_message_ids(None, len(encoded))

        async def op(conn: Conn) -> None:
            async with _transaction(conn):
                await conn.execute(_REPLACE_SESSION, session_id, len(encoded), self._retention)
                await conn.execute(_DELETE_MESSAGES, session_id)
                if encoded:
                    await conn.execute(_INSERT_FROM_ONE, session_id, ids, encoded)

        await self._run("replace", op)

    async def clear(self, session_id: str) -> None:
        """Delete the session's history; a no-op for an unknown session.

        The session row stays behind (with ``last_seq`` 0) so that its generation outlives
        the messages; :meth:`purge_expired` removes it an hour later.

        Raises:
            InvalidInputError: bad session id.
            StoreError: Postgres failed; nothing changed.
        """
        session_id = validate_session_id(session_id)

        async def op(conn: Conn) -> None:
            async with _transaction(conn):
                if await conn.fetchval(_CLEAR_SESSION, session_id) is not None:
                    await conn.execute(_DELETE_MESSAGES, session_id)

        await self._run("clear", op)

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
        if inactive_for is not None:
            inactive_for = float(_non_negative("inactive_for", inactive_for, float))
        _non_negative("limit", limit, int)
        rows = await self._run("list_sessions", lambda c: c.fetch(_LIST, inactive_for, limit))
        return [
            SessionInfo(
                session_id=row["id"],
                message_count=row["last_seq"],
                created_at=row["created_at"],
                updated_at=row["updated_at"],
                expires_at=row["expires_at"],
            )
            for row in rows
        ]

    async def purge_expired(self) -> int:
        """Delete expired sessions (messages included) and cleared sessions idle for an hour.

        Works in batches of 500 sessions, each within its own ``op_timeout``.

        Returns:
            How many sessions that still had messages were deleted.

        Raises:
            StoreError: Postgres failed (batches already done stay done).
        """
        purged = 0
        while True:
            row = await self._run("purge_expired", lambda c: c.fetchrow(_PURGE, PURGE_BATCH))
            assert row is not None
            purged += int(row["with_messages"])
            if row["deleted"] < PURGE_BATCH:
                break
        await self._run("purge_expired", lambda c: c.execute(_PURGE_LOCKS))
        return purged

    @asynccontextmanager
    async def turn_lock(
        self,
        session_id: str,
        timeout: float | None = None,
    ) -> AsyncIterator[None]:
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
        session_id = validate_session_id(session_id)
        wait = (
            DEFAULT_LOCK_TIMEOUT
            if timeout is None
            else _seconds("timeout", timeout, allow_zero=True)
        )
        token = secrets.token_hex(16)
        await self._acquire_lock(session_id, token, wait)
        keeper = LeaseKeeper(
            lambda: self._renew_lock(session_id, token),
            self._lock_lease / 3,
            f"turn lock of session {session_id!r}",
        )
        try:
            yield
        finally:
            await keeper.stop()
            try:
                await self._run(
                    "release turn lock", lambda c: c.execute(_LOCK_RELEASE, session_id, token)
                )
            except StoreError as exc:
                # Not worth failing a finished turn over: the lease runs out by itself.
                logger.warning("could not release turn lock of session %r: %s", session_id, exc)

    async def _acquire_lock(self, session_id: str, token: str, wait: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        delay = 0.005
        waited = False
        while True:
            got = await self._run(
                "acquire turn lock",
                lambda c: c.fetchval(_LOCK_ACQUIRE, session_id, token, self._lock_lease),
            )
            if got is not None:
                return
            if not waited:
                waited = True
                self._lock_waits += 1
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise SessionLockedError(
                    f"session {session_id!r} is locked by another turn (waited {wait:g}s)"
                )
            # Jitter keeps waiters of one session from polling in lockstep.
            delay = min(delay * 2, 0.25)
            await asyncio.sleep(min(remaining, random.uniform(delay / 2, delay)))

    async def _renew_lock(self, session_id: str, token: str) -> bool:
        held = await self._run(
            "renew turn lock",
            lambda c: c.fetchval(_LOCK_RENEW, session_id, token, self._lock_lease),
        )
        return held is not None

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
        row = await self._run("stats", lambda c: c.fetchrow(_STATS))
        assert row is not None
        pool = self._injected if self._injected is not None else self._pools.current()
        return {
            "sessions": float(row["sessions"]),
            "messages": float(row["messages"]),
            "pool_size": float(pool.get_size()) if pool is not None else 0.0,
            "pool_idle": float(pool.get_idle_size()) if pool is not None else 0.0,
            "appends": float(self._appends),
            "append_retries_deduplicated": float(self._deduplicated),
            "lock_waits": float(self._lock_waits),
            "flushes": float(self._flushes),
            "flush_duplicates": float(self._flush_duplicates),
            "flush_stale": float(self._flush_stale),
            "failures": float(self._failures),
        }

    # --- durable tier of the two-tier store ------------------------------------------------------

    async def last_seq(self, session_id: str) -> tuple[int, int]:
        """Return ``(generation, last_seq)``; ``(0, 0)`` for an unknown or expired session.

        Raises:
            InvalidInputError: bad session id.
            StoreError: Postgres failed.
        """
        session_id = validate_session_id(session_id)
        row = await self._run("last_seq", lambda c: c.fetchrow(_LAST_SEQ, session_id))
        return (0, 0) if row is None else (int(row["generation"]), int(row["last_seq"]))

    async def load_snapshot(self, session_id: str) -> Snapshot | None:
        """Return the whole session as stored, in one consistent read.

        Returns:
            None for an unknown or expired session; a cleared session gives a snapshot with
            its generation and no rows.

        Raises:
            InvalidInputError: bad session id.
            StoreError: Postgres failed.
        """
        session_id = validate_session_id(session_id)
        records = await self._run("load_snapshot", lambda c: c.fetch(_SNAPSHOT, session_id))
        if not records:
            return None
        head = records[0]
        return Snapshot(
            generation=int(head["generation"]),
            last_seq=int(head["last_seq"]),
            rows=[
                (int(r["seq"]), r["message_id"], r["message"])
                for r in records
                if r["seq"] is not None
            ],
            created_ms=int(head["created_ms"]),
            updated_ms=int(head["updated_ms"]),
            expires_ms=None if head["expires_ms"] is None else int(head["expires_ms"]),
        )

    async def apply_flush(
        self, session_id: str, generation: int, rows: Sequence[tuple[int, str, str]]
    ) -> FlushResult:
        """Write one session's batch copied from the hot tier; see :meth:`apply_flushes`."""
        (result,) = await self.apply_flushes([(session_id, generation, rows)])
        return result

    async def apply_flushes(
        self, batches: Sequence[tuple[str, int, Sequence[tuple[int, str, str]]]]
    ) -> list[FlushResult]:
        """Write batches copied from the hot tier, idempotently, in one transaction.

        Per session: a batch of an older generation than Postgres holds is ignored (a clear
        or replace happened after it was read); a newer generation first wipes the stored
        messages (an expired session counts as absent, whatever its generation). Rows
        already stored with the same message id count as duplicates. The cost is a fixed
        four or five round trips, whatever the number of sessions and rows.

        Args:
            batches: ``(session_id, generation, rows)`` with each session at most once;
                ``rows`` are ``(seq, message_id, message JSON text)``, possibly empty (to
                record a newer generation only).

        Returns:
            One :class:`FlushResult` per batch, in order.

        Raises:
            InvalidInputError: malformed input; nothing was written.
            FlushConflictError: Postgres holds other messages at a session's seqs or ids;
                nothing of any batch was written (``exc.session_id`` names the session, so
                the others can be retried without it).
            StoreError: Postgres failed; nothing was written, the batches may be retried.
        """
        generations: dict[str, int] = {}
        flat_sids: list[str] = []
        flat_seqs: list[int] = []
        flat_ids: list[str] = []
        flat_texts: list[str] = []
        for session_id, generation, rows in batches:
            session_id = validate_session_id(session_id)
            if session_id in generations:
                raise InvalidInputError(f"session {session_id!r} appears twice in one flush")
            generations[session_id] = _non_negative("generation", generation, int)
            seqs = [row[0] for row in rows]
            for seq in seqs:
                if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
                    raise InvalidInputError(f"flush row seq must be a positive int, got {seq!r}")
            if len(set(seqs)) != len(seqs):
                raise InvalidInputError(f"session {session_id!r}: flush rows repeat a seq")
            texts = [row[2] for row in rows]
            if not all(isinstance(text, str) for text in texts):
                raise InvalidInputError("flush row messages must be JSON text")
            flat_ids += check_message_ids([row[1] for row in rows], len(rows))
            flat_sids += [session_id] * len(rows)
            flat_seqs += seqs
            flat_texts += texts
        if not generations:
            return []

        async def op(conn: Conn) -> dict[str, FlushResult]:
            results: dict[str, FlushResult] = {}
            try:
                async with _transaction(conn):
                    stale = await self._sync_generations(conn, generations)
                    results = {sid: FlushResult(0, 0, stale=True) for sid in stale}
                    keep = [i for i, sid in enumerate(flat_sids) if sid not in stale]
                    live = [sid for sid in generations if sid not in stale]
                    if not live:
                        return results
                    outcome = await conn.fetch(
                        _FLUSH,
                        [flat_sids[i] for i in keep],
                        [flat_seqs[i] for i in keep],
                        [flat_ids[i] for i in keep],
                        [flat_texts[i] for i in keep],
                        live,
                        self._retention,
                    )
                    for row in outcome:
                        if row["clashes"]:
                            raise FlushConflictError(row["session_id"], row["clashes"])
                    await failpoints.hit("flush_mid_transaction")
            except asyncpg.UniqueViolationError as exc:
                if exc.constraint_name != _MESSAGE_ID_KEY:
                    raise
                # Looked up after the rollback: the failed transaction accepts no queries.
                misplaced = await conn.fetch(_MISPLACED_IDS, flat_sids, flat_seqs, flat_ids)
                first = misplaced[0]["session_id"] if misplaced else flat_sids[0]
                seqs = [r["seq"] for r in misplaced if r["session_id"] == first]
                raise FlushConflictError(first, seqs) from exc
            sizes = {sid: 0 for sid in live}
            for sid in flat_sids:
                if sid in sizes:
                    sizes[sid] += 1
            for row in outcome:
                sid, inserted = row["session_id"], int(row["inserted"])
                results[sid] = FlushResult(inserted=inserted, duplicates=sizes[sid] - inserted)
            return results

        by_session = await self._run("apply_flush", op)
        results = [by_session[sid] for sid in generations]
        self._flushes += 1
        self._flush_duplicates += sum(r.duplicates for r in results)
        self._flush_stale += sum(r.stale for r in results)
        return results

    async def apply_clear(self, session_id: str, generation: int) -> None:
        """Record a clear made at ``generation``: wipe the messages unless Postgres is newer.

        A missing session gets an empty row carrying ``generation``, so that an older flush
        arriving later is recognised as stale.

        Raises:
            InvalidInputError: bad session id or generation.
            StoreError: Postgres failed; nothing changed.
        """
        wanted = {validate_session_id(session_id): _non_negative("generation", generation, int)}

        async def op(conn: Conn) -> None:
            async with _transaction(conn):
                await self._sync_generations(conn, wanted)

        await self._run("apply_clear", op)

    async def _sync_generations(self, conn: Conn, wanted: dict[str, int]) -> set[str]:
        """Lock (creating if need be) the sessions' rows and bring them to ``wanted``.

        Rows of an older generation, or expired ones (which count as absent), lose their
        messages and take the wanted generation. Returns the sessions for which Postgres
        already holds a newer generation.
        """
        ids = sorted(wanted)
        rows = await conn.fetch(_LOCK_SESSIONS, ids, [wanted[sid] for sid in ids], self._retention)
        stale: set[str] = set()
        reset: list[str] = []
        for row in rows:
            sid, stored = row["id"], row["generation"]
            if row["expired"] or stored < wanted[sid]:
                reset.append(sid)
            elif stored > wanted[sid]:
                stale.add(sid)
        if reset:
            await conn.execute(
                _RESET_SESSIONS, reset, [wanted[sid] for sid in reset], self._retention
            )
        return stale
