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
    │   └── SessionLockedError        another turn of this session holds its lock
    ├── ProviderError             the model provider failed (HTTP error, bad response)
    ├── TurnCancelledError        ``run()`` was cancelled through its ``cancel_token``
    └── ToolError                 a tool could not be resolved or its arguments were invalid
"""

from __future__ import annotations

from collections.abc import Sequence

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


class SessionLockedError(StoreError):
    """Another turn of the same session holds the session's turn lock."""


class ProviderError(VelError):
    """The model provider failed."""


class ToolError(VelError):
    """A tool could not be described or called."""


class TurnCancelledError(VelError):
    """``Agent.run`` was cancelled through its ``cancel_token``; the session is unchanged."""
