"""Exceptions raised by vel.

Every error vel raises derives from :class:`VelError`; backend errors (asyncpg, redis, openai)
are wrapped once at the boundary with ``raise ... from exc`` so the cause stays inspectable::

    VelError
    ├── ConfigurationError        bad DSN/URL, missing API key, unknown storage mode,
    │   │                         refused credentials or certificate, missing tables
    │   └── AccessDeniedError         the backend refused an operation for lack of permission
    ├── InvalidInputError         bad session id, message or run input (nothing was stored)
    ├── StoreError                a session store failed
    │   ├── StoreUnavailableError     connection refused / reset / timed out
    │   ├── StoreTimeoutError         a call exceeded its deadline (subclass of the above)
    │   ├── BackpressureError         too many unflushed messages; try again later
    │   ├── StoreFullError            Redis is out of memory (OOM); nothing was stored
    │   ├── FlushConflictError        the two tiers hold different messages at one seq
    │   ├── TierLeaseError            a 'database'-mode write to a session the Redis tier holds
    │   └── SessionLockedError        another turn of this session holds its lock
    ├── ProviderError             the model provider failed (HTTP error, bad response)
    ├── TurnCancelledError        ``run()`` was cancelled through its ``cancel_token``
    └── ToolError                 a tool could not be resolved or its arguments were invalid
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

__all__ = [
    "AccessDeniedError",
    "BackpressureError",
    "ConfigurationError",
    "FlushConflictError",
    "InvalidInputError",
    "ProviderError",
    "SessionLockedError",
    "StoreError",
    "StoreFullError",
    "StoreTimeoutError",
    "StoreUnavailableError",
    "TierLeaseError",
    "ToolError",
    "TurnCancelledError",
    "VelError",
]


class VelError(Exception):
    """Root of every exception vel raises."""


class ConfigurationError(VelError):
    """The configuration is unusable (bad URL or DSN, missing key, unknown mode, refused
    credentials or certificate, missing tables): retrying cannot help until it is fixed."""


class AccessDeniedError(ConfigurationError):
    """The backend refused an operation for lack of permission: a Redis ACL (``NOPERM``) or a
    Postgres grant (``insufficient_privilege``). Retrying cannot help; the message names the
    permission (docs/operations.md lists what vel needs)."""


class InvalidInputError(VelError, ValueError):
    """An argument was rejected before anything was stored."""


class StoreError(VelError):
    """A session store operation failed."""


class StoreUnavailableError(StoreError):
    """The backend could not be reached, or the connection broke mid-call."""


class StoreTimeoutError(StoreUnavailableError):
    """A backend call exceeded its deadline."""


class BackpressureError(StoreError):
    """Too many messages are waiting to be written to Postgres; retry later."""


class StoreFullError(StoreError):
    """Redis refused the write because it is out of memory; nothing was stored."""


class FlushConflictError(StoreError):
    """Postgres already holds different messages at the seqs a flush tried to write.

    The two tiers' histories diverged (a bug or manual tampering); nothing of the batch was
    written. Attributes: ``session_id`` and the conflicting ``seqs``.
    """

    def __init__(self, session_id: str, seqs: Sequence[int]) -> None:
        self.session_id = session_id
        self.seqs = list(seqs)
        shown = ", ".join(map(str, self.seqs[:10])) + (", ..." if len(self.seqs) > 10 else "")
        super().__init__(
            f"session {session_id!r}: Postgres holds other messages at seq {shown}; "
            "refusing to overwrite a divergent history"
        )


class TierLeaseError(StoreError):
    """A write outside the Redis tier to a session the tier holds (DESIGN.md 3.8).

    A session used by ``session_storage='redis'`` workers carries a tier lease in Postgres
    while Redis may hold a copy of it; a 'database'-mode write then could be overwritten or
    lost, so it is refused. Attributes: ``session_id`` and ``until`` (when the lease ends,
    a timezone-aware datetime, unless a 'redis' worker uses the session again).
    """

    def __init__(self, session_id: str, until: datetime) -> None:
        self.session_id = session_id
        self.until = until
        super().__init__(
            f"session {session_id!r} is held by the Redis tier until "
            f"{until.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC (a session_storage='redis' worker "
            "used it): write it with session_storage='redis' (`--storage redis` for the vel "
            "command), or run `vel sessions release` on it first"
        )


class SessionLockedError(StoreError):
    """Another turn of the same session holds the session's turn lock."""


class ProviderError(VelError):
    """The model provider failed."""


class AgentClosedError(VelError, RuntimeError):
    """The Agent was closed (``Agent.aclose()``): a turn started after it, or a turn still
    running when ``aclose()`` stopped waiting for it (the cause is what then failed)."""


class ToolError(VelError):
    """A tool could not be described or called."""


class TurnCancelledError(VelError):
    """``Agent.run`` was cancelled through its ``cancel_token``; the session is unchanged."""
