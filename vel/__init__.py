"""vel: conversation memory for LLM agents, shared by every worker at Redis speed and written
behind to Postgres so it survives crashes."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from vel.agent import Agent
from vel.context import ContextManager, StatelessContextManager
from vel.errors import (
    AccessDeniedError,
    AgentClosedError,
    BackpressureError,
    ConfigurationError,
    InvalidInputError,
    ProviderError,
    SessionLockedError,
    StoreError,
    StoreFullError,
    StoreTimeoutError,
    StoreUnavailableError,
    TierLeaseError,
    ToolError,
    TurnCancelledError,
    VelError,
)
from vel.outcome import TurnReceipt, turn_committed
from vel.stores.base import SessionInfo, SessionStore
from vel.stores.listing import HistoryPage, SessionCatalog, SessionDetails, SessionPage
from vel.stores.memory import MemoryStore
from vel.summaries import Summary, SummaryPolicy
from vel.tools import Tool

__all__ = [
    "AccessDeniedError",
    "Agent",
    "AgentClosedError",
    "BackpressureError",
    "ConfigurationError",
    "ContextManager",
    "HistoryPage",
    "InvalidInputError",
    "MemoryStore",
    "ProviderError",
    "SessionCatalog",
    "SessionDetails",
    "SessionInfo",
    "SessionLockedError",
    "SessionPage",
    "SessionStore",
    "StatelessContextManager",
    "StoreError",
    "StoreFullError",
    "StoreTimeoutError",
    "StoreUnavailableError",
    "Summary",
    "SummaryPolicy",
    "TierLeaseError",
    "Tool",
    "ToolError",
    "TurnCancelledError",
    "TurnReceipt",
    "VelError",
    "turn_committed",
]

#: The distribution that installs this package (``pip install vel-memory``): ``vel`` on PyPI
#: is an unrelated project.
DISTRIBUTION = "vel-memory"

try:
    __version__ = version(DISTRIBUTION)  # one source of truth: pyproject.toml
except PackageNotFoundError:  # a source tree on sys.path, never installed
    __version__ = "0+unknown"
