"""Exceptions raised by vel.

Every error vel raises derives from :class:`VelError`; backend errors (asyncpg, redis, openai)
are wrapped once at the boundary with ``raise ... from exc`` so the cause stays inspectable::

    VelError
    ├── ConfigurationError        bad DSN/URL, missing API key, unknown storage mode
    ├── InvalidInputError         bad session id, message or run input (nothing was stored)
    ├── StoreError                a session store failed
    │   ├── StoreUnavailableError     connection refused / reset / timed out
    │   ├── StoreTimeoutError         a call exceeded its deadline (subclass of the above)
    │   ├── BackpressureError         too many unflushed messages; try again later
    │   ├── StoreFullError            Redis is out of memory (OOM); nothing was stored
    │   └── SessionLockedError        another turn of this session holds its lock
    ├── ProviderError             the model provider failed (HTTP error, bad response)
    ├── TurnCancelledError        ``run()`` was cancelled through its ``cancel_token``
    └── ToolError                 a tool could not be resolved or its arguments were invalid
"""

from __future__ import annotations

__all__ = [
    "BackpressureError",
    "ConfigurationError",
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
    """The configuration is unusable (bad URL or DSN, missing key, unknown mode)."""


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


class SessionLockedError(StoreError):
    """Another turn of the same session holds the session's turn lock."""


class ProviderError(VelError):
    """The model provider failed."""


class ToolError(VelError):
    """A tool could not be described or called."""


class TurnCancelledError(VelError):
    """``Agent.run`` was cancelled through its ``cancel_token``; the session is unchanged."""
