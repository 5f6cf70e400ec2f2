"""The one place a Postgres connection lives and every Postgres call is bounded.

:class:`Connector` owns the per-event-loop pools (or the caller's pool), opens them (checking,
or migrating, the schema), and runs every operation of the store's parts through
:meth:`Connector.run`: one overall deadline (``op_timeout``) covering pool creation, connection
acquisition and every round trip. On expiry the connection in use is terminated rather than
returned to the pool, because its protocol state is unknown. Backend errors are translated to
:mod:`vel.errors` exactly once, in :meth:`Connector.deadline`, by the mapping of
:mod:`vel.stores.postgres.errormap` (DESIGN.md 3.7: timeouts on every network call; a frozen
Postgres must not hang a worker).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeAlias, TypeVar

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from vel._loops import CallerOwned, PerLoop
from vel._shield import CancelWatch
from vel.errors import (
    AccessDeniedError,
    ConfigurationError,
    VelError,
)
from vel.logs import get_logger
from vel.redaction import redact
from vel.stores.postgres import errormap
from vel.stores.postgres.errormap import poisons_connection
from vel.stores.postgres.migrate import (
    CONNECT_ERRORS,
    connect_error,
    discard,
    latest_version,
    migrate,
    schema_refused,
    schema_version,
)

# One logger for the whole Postgres tier, whichever part logs.
log = get_logger("vel.stores.postgres")

T = TypeVar("T")
# Strings: asyncpg's classes are generic only in its type stubs.
Pool: TypeAlias = "asyncpg.Pool[asyncpg.Record]"
Conn: TypeAlias = "PoolConnectionProxy[asyncpg.Record]"

# The unique constraint on (session_id, message_id): a replayed or misplaced message.
MESSAGE_ID_KEY = "vel_messages_message_id_key"
# Seconds a cancelled statement's cancel request is given before its connection is
# terminated (see _let_cancel_land); short, as it delays the cancellation's propagation.
CANCEL_GRACE = 0.25


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool reset hook: nothing to undo, so no reset query round trip per release.

    vel keeps no session state on a connection (no LISTEN, cursors or SET; settings
    come with the connection, locks and search_path are transaction-scoped, and the migration's
    session lock is released, or its connection terminated, before it returns),
    and asyncpg still rolls back a transaction left open before calling this.
    """


def check_injected_pool(pool: object) -> None:
    """Refuse a caller's pool vel cannot use, naming the fix.

    Raises:
        ConfigurationError: not an ``asyncpg.Pool``.
    """
    if not isinstance(pool, asyncpg.Pool):
        raise ConfigurationError(
            f"PostgresStore(pool=...) takes an asyncpg.Pool, got {type(pool).__name__}: "
            "pass dsn= instead"
        )


@asynccontextmanager
async def transaction(conn: Conn) -> AsyncIterator[None]:
    """A transaction that never waits on a connection that may be dead.

    asyncpg's own context manager always sends ROLLBACK on error, which against a frozen
    server would wait past the deadline. On an error that poisons the connection nothing is
    sent: :meth:`Connector.use`, the one place a connection is discarded, terminates it,
    which rolls back just as well.
    """
    tx = conn.transaction()
    await tx.start()
    try:
        yield
    except BaseException as exc:
        if not poisons_connection(exc):
            await tx.rollback()
        raise
    else:
        await tx.commit()


async def _let_cancel_land(conn: Conn) -> None:
    """Give asyncpg's cancel request for the statement cut off on ``conn`` a moment
    (CANCEL_GRACE) to reach the server before the connection is terminated.

    Terminating stops that request; the server, which does not watch the socket while a
    statement waits (on a row lock, say), would then keep the statement, and the locks its
    transaction holds, until ``statement_timeout``. asyncpg exposes its pending requests
    only as a private attribute, so this is best effort.
    """
    raw = getattr(conn, "_con", None)  # the proxy's connection (None once released)
    pending = [t for t in getattr(raw, "_cancellations", ()) if not t.done()]
    if not pending:
        return
    # Cancelled once more (an anyio scope): the connection is terminated now, and the
    # exception already in flight, a cancellation too, propagates.
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait(pending, timeout=CANCEL_GRACE)


class Connector:
    """Pools per event loop (or the caller's pool), the deadline and the error translation.

    Takes settings already validated by :class:`~vel.stores.postgres.PostgresStore`: ``dsn``
    None exactly when ``pool`` is given; ``schema`` a checked name or None.
    """

    def __init__(
        self,
        dsn: str | None,
        *,
        pool: Pool | None,
        schema: str | None,
        placement: str = "the search_path",
        pool_min: int,
        pool_max: int,
        op_timeout: float,
        connect_timeout: float,
        migrate: bool,
    ) -> None:
        self.dsn = dsn
        self.schema = schema
        self.op_timeout = op_timeout
        self._pool_min = pool_min
        self._pool_max = pool_max
        self._connect_timeout = connect_timeout
        self._migrate = migrate
        self.placement = placement
        self._injected = pool
        self._injected_ready = False
        self._owner = (
            None
            if pool is None
            else CallerOwned(
                "PostgresStore(pool=...)",
                "give PostgresStore a dsn= instead (vel then opens a pool per event loop)",
                loop=getattr(pool, "_loop", None),
            )
        )
        self._pools: PerLoop[Pool] = PerLoop(self._create_pool, self._close_pool)
        self.failures = 0

    @property
    def where(self) -> str:
        return redact(self.dsn) if self.dsn else "the caller's pool"

    def current_pool(self) -> Pool | None:
        """This event loop's pool if it is open (the caller's pool if one was given)."""
        return self._injected if self._injected is not None else self._pools.current()

    # --- lifecycle -----------------------------------------------------------------------------

    async def open(self) -> None:
        if self._owner is not None and not self._owner.is_home():
            await self._owner.run(self.open)
            return
        async with self.deadline("open", self._connect_timeout + self.op_timeout):
            await self._get_pool()

    async def aclose(self) -> None:
        await self._pools.aclose()

    async def _create_pool(self) -> Pool:
        assert self.dsn is not None
        server_settings = {
            "application_name": "vel",
            # Server-side backstops for what the client deadline cannot reach: a statement
            # left running by a client that gave up, and a frozen client (SIGSTOP, GC pause)
            # sitting in a transaction with a session row locked.
            "statement_timeout": str(int(self.op_timeout * 1000) + 1000),
            "idle_in_transaction_session_timeout": str(int(max(10.0, 2 * self.op_timeout) * 1000)),
        }
        if self.schema is not None:
            server_settings["search_path"] = f'"{self.schema}"'
        try:
            pool: Pool = await asyncpg.create_pool(
                self.dsn,
                min_size=self._pool_min,
                max_size=self._pool_max,
                timeout=self._connect_timeout,
                # No command_timeout, and no timeout on acquire (see use): every call runs
                # inside run()'s deadline, which bounds both; asyncpg's own would add a timer
                # per statement and a task per acquire to every round trip.
                max_inactive_connection_lifetime=300.0,
                server_settings=server_settings,
                reset=_keep_session,
            )
        except CONNECT_ERRORS as exc:
            raise connect_error(exc, self.dsn) from exc
        try:
            # The first connection is opened here even with pool_min=0, so a bad DSN or
            # wrong password is reported as such when the store opens.
            try:
                conn = await pool.acquire(timeout=self._connect_timeout)
            except CONNECT_ERRORS as exc:
                raise connect_error(exc, self.dsn) from exc
            await pool.release(conn)
            await self._check_schema(pool)
        except Exception:
            pool.terminate()
            # asyncpg closes the sockets (of a refused connection too) at the loop's next
            # turn: let it, so a caller who gives up now and closes leaves none open.
            await asyncio.sleep(0)
            raise
        except BaseException:
            pool.terminate()
            raise
        return pool

    @property
    def can_listen(self) -> bool:
        """Whether :meth:`listener` can open a connection (not with a caller's pool)."""
        return self.dsn is not None

    async def listener(self) -> asyncpg.Connection:
        """A connection of its own, outside the pool, for LISTEN (the turn lock's handoff:
        one per event loop that waited for a lock); bounded by ``connect_timeout``.

        Raises:
            Exception: whatever connecting raised (the caller falls back to polling).
        """
        assert self.dsn is not None
        conn: asyncpg.Connection = await asyncpg.connect(
            self.dsn,
            timeout=self._connect_timeout,
            server_settings={"application_name": "vel-listener"},
        )
        return conn

    async def _close_pool(self, pool: Pool) -> None:
        try:
            await asyncio.wait_for(pool.close(), self.op_timeout)
        except asyncio.CancelledError:
            pool.terminate()
            raise
        except Exception as exc:
            # A frozen server or a connection still in use: closing must not hang or fail.
            pool.terminate()
            log.warning(
                "Postgres pool at %s closed forcibly: %s", self.where, errormap.one_line(exc)
            )

    async def _check_schema(self, pool: Pool) -> None:
        """Refuse to run against a missing or outdated schema (or migrate it, if allowed)."""
        need = latest_version()
        version = await self.use(pool, schema_version)
        if version >= need:
            return
        schema = self.schema
        if version == 0 and schema is not None:
            role = await self.use(pool, lambda conn: schema_refused(conn, schema))
            if role is not None:
                # A schema the role may not use looks empty to it: say what is missing.
                raise AccessDeniedError(
                    f"Postgres refused role {role!r} the use of {self.placement} at "
                    f"{self.where} for lack of permission (no USAGE on the schema; "
                    "insufficient_privilege): grant the role the privileges listed in "
                    "docs/operations.md (Postgres grants)"
                )
        if self._migrate:
            await self.use(pool, lambda conn: migrate(conn, self.schema))
            return
        state = "has no vel tables" if version == 0 else f"is at version {version}, need {need}"
        raise ConfigurationError(
            f"Postgres {self.placement} at {self.where} {state}: run `vel migrate` with the "
            "same settings (or set VEL_MIGRATE=1 to migrate at start-up)"
        )

    async def _get_pool(self) -> Pool:
        if self._injected is None:
            return await self._pools.get()
        assert self._owner is not None
        self._owner.check_process()
        if not self._injected_ready:
            await self._check_schema(self._injected)
            self._injected_ready = True
        return self._injected

    # --- the one place backend errors are handled --------------------------------------------

    async def use(self, pool: Pool, op: Callable[[Conn], Awaitable[T]]) -> T:
        """Run ``op`` on a connection of ``pool``, discarding the connection if it is poisoned.

        The caller bounds it (:meth:`run` and :meth:`open` run it inside :meth:`deadline`).
        """
        conn = await pool.acquire()
        try:
            return await op(conn)
        except BaseException as exc:
            if poisons_connection(exc):
                if isinstance(exc, asyncio.CancelledError | TimeoutError):
                    await _let_cancel_land(conn)
                # Released below as closed, so the pool opens a fresh one next time.
                discard(conn)
            raise
        finally:
            await pool.release(conn)

    async def run(
        self, action: str, op: Callable[[Conn], Awaitable[T]], *, statements: int = 1
    ) -> T:
        """Run ``op`` within ``op_timeout``, connecting if need be; errors become vel's.

        ``statements``: for an ``op`` that sends that many bounded statements (a long
        history written in chunks), the deadline is ``op_timeout`` per statement.

        Raises:
            StoreTimeoutError, StoreUnavailableError, ConfigurationError, InvalidInputError,
            StoreError: as :meth:`translate` maps the backend's error (``action`` names it).
        """
        if self._owner is not None and not self._owner.is_home():
            return await self._owner.run(lambda: self.run(action, op, statements=statements))
        async with self.deadline(action, self.op_timeout * max(1, statements)):
            return await self.use(await self._get_pool(), op)

    @asynccontextmanager
    async def deadline(self, action: str, seconds: float) -> AsyncIterator[None]:
        """Bound the block by ``seconds`` and translate what it raises, once.

        A cancellation of the caller passes through unchanged, even when a driver turned it
        into an error of its own (asyncpg raises InterfaceError or ConnectionDoesNotExistError
        from a connection it was cut off on): it is raised as CancelledError, never
        reported as an outage.
        """
        watch = CancelWatch()
        timeout = asyncio.timeout(seconds)
        try:
            async with timeout:
                yield
        except VelError:
            raise
        except Exception as exc:
            if watch.requested():
                raise asyncio.CancelledError(f"Postgres {action} was cancelled") from exc
            self.failures += 1
            if timeout.expired() and not isinstance(exc, TimeoutError):
                # Our own deadline cut the call off and the driver said so in its own words.
                exc = TimeoutError(f"{type(exc).__name__}: {exc}")
            raise self.translate(action, exc, seconds) from exc

    def translate(self, action: str, exc: Exception, seconds: float) -> VelError:
        return errormap.translate(action, exc, seconds, where=self.where, placement=self.placement)
