"""Versioned schema migrations for the Postgres tier, plus the connection helpers they share.

Migrations are the numbered ``NNNN_name.sql`` files of :mod:`vel.stores.postgres.migrations`.
Migrators take one advisory lock, then run each file in its own transaction, so any number
of processes (``vel migrate``, workers started with ``VEL_MIGRATE=1``) may migrate at once:
one applies each file, the others wait and then find nothing left to do (every check of the
version happens under the lock, in a transaction begun after it was granted). Applied
versions are recorded in ``vel_schema_version``. The hot path never runs DDL; stores only read
the version.
"""

from __future__ import annotations

import contextlib
import re
import ssl
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from vel.bounds import TIMEOUT
from vel.errors import (
    AccessDeniedError,
    ConfigurationError,
    StoreTimeoutError,
    StoreUnavailableError,
    VelError,
)
from vel.namespace import check_schema_name
from vel.redaction import normalize_userinfo, redact, remember

__all__ = [
    "CONNECT_ERRORS",
    "Migration",
    "connect_error",
    "discard",
    "latest_version",
    "load_migrations",
    "migrate",
    "schema_refused",
    "schema_version",
    "validate_schema_name",
]

# Strings: asyncpg's classes are generic only in its type stubs.
Connection: TypeAlias = "asyncpg.Connection[Any] | PoolConnectionProxy[Any]"


def discard(conn: Connection) -> None:
    """Terminate ``conn`` so that it is never used again; idempotent.

    A pool's connection is handed back to its pool by its first terminate, after which
    asyncpg refuses a second one with InterfaceError; raised from an ``except`` or
    ``finally`` block, that error would replace the exception in flight (a cancellation
    would become an outage: StoreUnavailableError).
    """
    with contextlib.suppress(asyncpg.InterfaceError):
        conn.terminate()


MIGRATIONS_PACKAGE = "vel.stores.postgres.migrations"
# Any constant works as long as every vel process agrees on it ("vel_migr" in ASCII).
_LOCK_KEY = 0x76656C5F6D696772
_FILE_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
# What opening a connection can raise; connect_error() turns each into a vel error.
CONNECT_ERRORS = (
    OSError,
    TimeoutError,
    ValueError,
    OverflowError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
)
# Errors a server reports while it is (re)starting or overloaded: try again later.
_TRANSIENT_CLASSES = frozenset({"08", "53", "57", "58"})


@dataclass(frozen=True, slots=True)
class Migration:
    """One numbered SQL file."""

    version: int
    name: str
    sql: str


@cache
def load_migrations() -> tuple[Migration, ...]:
    """Return the packaged migrations, oldest first.

    Raises:
        ConfigurationError: two files share a number, or a number is skipped (a packaging
            mistake that would otherwise apply a partial schema).
    """
    found: list[Migration] = []
    for entry in resources.files(MIGRATIONS_PACKAGE).iterdir():
        match = _FILE_RE.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    if [m.version for m in found] != list(range(1, len(found) + 1)):
        raise ConfigurationError(
            f"vel migrations must be numbered 1..n without gaps, got {[m.version for m in found]}"
        )
    return tuple(found)


def latest_version() -> int:
    """Return the schema version this code expects (the highest migration number)."""
    return load_migrations()[-1].version


def validate_schema_name(schema: str) -> str:
    """Return ``schema`` if it is a plain identifier (see
    :func:`vel.namespace.check_schema_name`).

    Raises:
        ConfigurationError: anything else, since the name is placed in ``search_path``.
    """
    return check_schema_name(schema)


def _scrub(text: str) -> str:
    return " ".join(redact(text).split())


def connect_error(exc: BaseException, dsn: str | None) -> VelError:
    """Translate a failure to open a connection into one clear, password-free vel error.

    Args:
        exc: what asyncpg (or the OS) raised while connecting.
        dsn: the DSN that was used, or None for a caller's pool.

    Returns:
        ConfigurationError for what retrying cannot fix (bad DSN, credentials, database),
        StoreTimeoutError / StoreUnavailableError for an unreachable or struggling server.
    """
    if dsn:
        remember(dsn)
    where = redact(dsn) if dsn else "the given pool"
    detail = _scrub(f"{type(exc).__name__}: {exc}")
    if isinstance(exc, TimeoutError):
        return StoreTimeoutError(f"Postgres at {where} did not answer in time ({detail})")
    if isinstance(exc, ValueError | OverflowError):
        # asyncpg reports DSN syntax problems (bad port, unknown sslmode...) as ValueError,
        # and a port outside 0-65535 as the socket's OverflowError.
        return ConfigurationError(f"POSTGRES_DSN {where} is not usable: {detail}")
    if isinstance(exc, asyncpg.PostgresError):
        if exc.sqlstate[:2] in _TRANSIENT_CLASSES:
            return StoreUnavailableError(f"Postgres at {where} is unavailable: {detail}")
        if isinstance(exc, asyncpg.InsufficientPrivilegeError):
            return AccessDeniedError(
                f"Postgres at {where} refused the connection for lack of permission "
                f"({detail}; insufficient_privilege): GRANT CONNECT ON DATABASE to the role"
            )
        return ConfigurationError(f"Postgres at {where} refused the connection: {detail}")
    if isinstance(exc, ssl.SSLCertVerificationError):
        return ConfigurationError(
            f"Postgres at {where}: the server's certificate was not accepted ({detail}) -- "
            "give its CA with ?sslrootcert=/path/ca.pem in POSTGRES_DSN"
        )
    return StoreUnavailableError(f"cannot connect to Postgres at {where}: {detail}")


async def schema_version(conn: Connection) -> int:
    """Return the schema version visible through ``conn``'s search_path (0 if none).

    Args:
        conn: any asyncpg connection (or pooled connection).
    """
    exists = await conn.fetchval("SELECT to_regclass('vel_schema_version') IS NOT NULL")
    if not exists:
        return 0
    version = await conn.fetchval("SELECT coalesce(max(version), 0) FROM vel_schema_version")
    return int(version)


async def schema_refused(conn: Connection, schema: str) -> str | None:
    """The role's name when ``schema`` exists but the role lacks USAGE on it (its tables are
    then invisible, not missing); None otherwise."""
    row = await conn.fetchrow(
        "SELECT has_schema_privilege(oid, 'USAGE') AS usage, current_user AS role "
        "FROM pg_namespace WHERE nspname = $1",
        schema,
    )
    return None if row is None or row["usage"] else str(row["role"])


async def _enter_schema(conn: Connection, schema: str | None) -> None:
    """Point this transaction at ``schema``, creating the schema and the version table."""
    if schema is not None:
        await conn.execute("SELECT set_config('search_path', $1, true)", f'"{schema}"')
        # Checked first: CREATE SCHEMA IF NOT EXISTS still needs the CREATE privilege.
        if not await conn.fetchval("SELECT 1 FROM pg_namespace WHERE nspname = $1", schema):
            await conn.execute(f'CREATE SCHEMA "{schema}"')
    if not await conn.fetchval("SELECT to_regclass('vel_schema_version') IS NOT NULL"):
        await conn.execute(
            "CREATE TABLE vel_schema_version ("
            " version integer PRIMARY KEY,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )


async def _migrate_connection(conn: Connection, schema: str | None) -> int:
    """Apply what is pending, one file per transaction, under the migration lock.

    The lock is a session-level advisory lock taken before any transaction starts, so every
    check (schema, version table, version) runs in a transaction that began after the lock
    was granted, and so after the previous holder committed. A transaction-scoped lock would
    not do: a backend checks names against its catalog cache, which it refreshes when a
    transaction starts, not when a lock it waited for is granted, so a check made after the
    wait could still miss the tables the previous holder had just created.
    """
    migrations = load_migrations()
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
    try:
        while True:
            async with conn.transaction():
                await _enter_schema(conn, schema)
                current = await schema_version(conn)
                pending = [m for m in migrations if m.version > current]
                if not pending:
                    return current
                # One file per transaction: a failure leaves the schema at the last good
                # version.
                await conn.execute(pending[0].sql)
                await conn.execute(
                    "INSERT INTO vel_schema_version (version) VALUES ($1)", pending[0].version
                )
    finally:
        try:
            await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
        except BaseException:
            # A connection that cannot run the unlock (broken, cancelled mid-query) must not
            # go back to a pool still holding the lock: closing it releases the lock.
            discard(conn)
            raise


async def migrate(
    conn_or_dsn: Connection | str,
    schema: str | None = None,
    *,
    connect_timeout: float = 10.0,
) -> int:
    """Apply every pending migration, in order; safe to run from many processes at once.

    Args:
        conn_or_dsn: an open connection (left open, its session settings untouched) or a
            DSN to connect to for the duration of the call.
        schema: the schema to migrate (created when missing); default: the connection's
            search_path.
        connect_timeout: seconds allowed to connect when given a DSN.

    Returns:
        The schema version afterwards.

    Raises:
        ConfigurationError: bad DSN, credentials or schema name.
        StoreUnavailableError: Postgres could not be reached.
        asyncpg.PostgresError: a migration failed (its transaction was rolled back).
    """
    if schema is not None:
        validate_schema_name(schema)
    connect_timeout = TIMEOUT.check("connect_timeout", connect_timeout)
    if not isinstance(conn_or_dsn, str):
        return await _migrate_connection(conn_or_dsn, schema)
    dsn = conn_or_dsn
    remember(dsn)
    try:
        conn = await asyncpg.connect(normalize_userinfo(dsn), timeout=connect_timeout)
    except CONNECT_ERRORS as exc:
        raise connect_error(exc, dsn) from exc
    try:
        return await _migrate_connection(conn, schema)
    finally:
        await conn.close()
