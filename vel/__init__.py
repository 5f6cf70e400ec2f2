"""vel: conversation memory for LLM agents, shared by every worker at Redis speed and written
behind to Postgres so it survives crashes."""

from __future__ import annotations

from vel.agent import Agent
from vel.context import ContextManager, StatelessContextManager
from vel.errors import (
    AccessDeniedError,
    BackpressureError,
    ConfigurationError,
    InvalidInputError,
    ProviderError,
    SessionLockedError,
    StoreError,
    StoreFullError,
    StoreTimeoutError,
    StoreUnavailableError,
    ToolError,
    TurnCancelledError,
    VelError,
)
from vel.stores.base import SessionInfo, SessionStore
from vel.stores.memory import MemoryStore
from vel.tools import Tool

__all__ = [
    "AccessDeniedError",
    "Agent",
    "BackpressureError",
    "ConfigurationError",
    "ContextManager",
    "InvalidInputError",
    "MemoryStore",
    "ProviderError",
    "SessionInfo",
    "SessionLockedError",
    "SessionStore",
    "StatelessContextManager",
    "StoreError",
    "StoreFullError",
    "StoreTimeoutError",
    "StoreUnavailableError",
    "Tool",
    "ToolError",
    "TurnCancelledError",
    "VelError",
]

__version__ = "0.1.0"
