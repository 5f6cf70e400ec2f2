"""What a Postgres backend error means for vel: whether the connection that raised it can be
reused, and the vel error it becomes (the one translation, applied by
:meth:`Connector.deadline <vel.stores.postgres.connector.Connector.deadline>`).

Only errors the server reported about a statement leave a connection usable
(:func:`poisons_connection`); a SQLSTATE class of connection or server trouble becomes
:class:`~vel.errors.StoreUnavailableError`, as an I/O or driver error does. Each vel error names
the fix where there is one.
"""

from __future__ import annotations

import ssl

import asyncpg

from vel.errors import (
    AccessDeniedError,
    ConfigurationError,
    InvalidInputError,
    StoreError,
    StoreTimeoutError,
    StoreUnavailableError,
    VelError,
)
from vel.redaction import redact

# SQLSTATE classes meaning the connection or server is in trouble rather than the statement:
# 08 connection exception, 53 insufficient resources, 57 operator intervention (shutdown,
# cancel), 58 system error, XX internal error.
_TROUBLE_CLASSES = frozenset({"08", "53", "57", "58", "XX"})


def poisons_connection(exc: BaseException) -> bool:
    """Whether a connection that raised ``exc`` must be discarded rather than reused.

    Only errors the server reported about the statement itself leave the protocol in a known
    state; timeouts, cancellations, I/O and driver errors may leave a half-read reply behind.
    """
    if isinstance(exc, VelError):
        return False
    if isinstance(exc, asyncpg.PostgresError):
        return exc.sqlstate[:2] in _TROUBLE_CLASSES
    return True


def one_line(exc: BaseException) -> str:
    """``exc`` as one line of text, its type first (for messages and logs)."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def translate(
    action: str, exc: Exception, seconds: float, *, where: str, placement: str
) -> VelError:
    """The vel error for a backend error raised during ``action``, cut off after ``seconds``;
    ``where`` names the server (never with credentials), ``placement`` where vel's tables
    are."""
    detail = redact(one_line(exc))
    if isinstance(exc, TimeoutError | asyncpg.QueryCanceledError):
        return StoreTimeoutError(f"Postgres {action} did not finish within {seconds:g}s ({where})")
    if isinstance(exc, asyncpg.InsufficientPrivilegeError):
        return AccessDeniedError(
            f"Postgres refused {action} for lack of permission ({detail}; "
            f"insufficient_privilege) in {placement}: grant the role the privileges "
            "listed in docs/operations.md (Postgres grants)"
        )
    if isinstance(exc, asyncpg.UndefinedTableError | asyncpg.InvalidSchemaNameError):
        return ConfigurationError(
            f"vel tables are missing in {placement} at {where} ({detail}): run "
            "`vel migrate` with the same settings"
        )
    if isinstance(exc, asyncpg.DataError):
        return InvalidInputError(f"Postgres rejected the data of {action}: {detail}")
    if isinstance(exc, asyncpg.PostgresError):
        if exc.sqlstate[:2] in _TROUBLE_CLASSES:
            return StoreUnavailableError(f"Postgres {action} failed ({where}): {detail}")
        return StoreError(f"Postgres {action} failed: {detail}")
    if isinstance(exc, ssl.SSLCertVerificationError):
        return ConfigurationError(
            f"Postgres at {where}: the server's certificate was not accepted "
            f"({detail}) -- give its CA with ?sslrootcert=/path/ca.pem in POSTGRES_DSN"
        )
    if isinstance(exc, OSError | asyncpg.InterfaceError):
        return StoreUnavailableError(
            f"Postgres connection failed during {action} ({where}): {detail}"
        )
    return StoreError(f"Postgres {action} failed: {detail}")
