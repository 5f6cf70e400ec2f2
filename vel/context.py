"""Context managers: what part of a session the model sees, and plain session operations.

The Agent asks its context manager to *prepare* a run (one awaited store read of the
window), then calls :meth:`ContextManager.messages_for_llm` synchronously at every model
step. Subclasses override ``messages_for_llm`` exactly as the spec shows, calling ``super()``
and editing the returned list, which is always a fresh copy.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

from vel._sync import run_sync
from vel.bounds import AGE_HOURS, COUNT, age_arg
from vel.catalog_ops import SessionCatalogOps
from vel.errors import ConfigurationError, InvalidInputError
from vel.messages import Message, validate_message, validate_session_id
from vel.stores.base import SessionInfo, SessionStore
from vel.stores.memory import MemoryStore


@dataclass
class _Run:
    session_id: str | None
    history: list[Message]
    turn: list[Message] = field(default_factory=list)


def trim_window(messages: list[Message]) -> list[Message]:
    """Drop leading ``tool`` messages whose assistant ``tool_calls`` parent was cut off.

    The OpenAI API rejects a ``tool`` message that does not follow its parent, so a window
    must never start on one.
    """
    start = 0
    while start < len(messages) and messages[start].get("role") == "tool":
        start += 1
    return messages[start:]


class ContextManager(SessionCatalogOps):
    """Full (default) or windowed session memory.

    Args:
        max_history: send at most this many stored messages to the model (the most recent
            ones); None sends the whole history. The store reads only this window.
        summarize: reserved for summarisation of older messages; not implemented yet, so
            True is refused rather than silently ignored.

    Session operations come in plain form (``get_session_context``, ``clear_session``,
    ``set_session_context``, ``get_inactive_sessions``), usable from any code, and async twins
    prefixed with ``a`` for code that runs on an event loop; so do the calls that organise
    sessions (owner, metadata, listings, history pages: see :mod:`vel.catalog_ops`).
    """

    stores_history = True

    def __init__(self, max_history: int | None = None, summarize: bool = False) -> None:
        checked = COUNT.check_optional("max_history", max_history)
        max_history = None if checked is None else int(checked)
        if summarize:
            raise ConfigurationError("summarize=True is not supported yet; use max_history")
        self.max_history = max_history
        self.summarize = summarize
        self._store: SessionStore | None = None
        self._runs: dict[str, _Run] = {}

    # -- binding -----------------------------------------------------------------------

    @property
    def store(self) -> SessionStore:
        """The session store this context manager reads and writes (the Agent's)."""
        if self._store is None:
            self._store = MemoryStore()
        return self._store

    def bind(self, store: SessionStore) -> None:
        if self._store is not None and self._store is not store:
            raise ConfigurationError(
                "this context manager already serves another agent's store; "
                "give each Agent its own ContextManager"
            )
        self._store = store

    # -- runs (called by the Agent) ------------------------------------------------------

    async def aprepare_run(
        self,
        run_id: str,
        session_id: str | None,
        new_messages: Sequence[Message],
        window: list[Message] | None = None,
    ) -> None:
        """Load the session's window for ``run_id`` and record the turn's first messages.

        ``window``: the last ``max_history`` messages, already read by the caller (the Agent
        reads them together with the turn lock); nothing is loaded then.
        """
        history: list[Message] = []
        if session_id is not None and self.stores_history and self.max_history != 0:
            if window is None:
                window = await self.store.load(session_id, limit=self.max_history)
            history = trim_window(window)
        self._runs[run_id] = _Run(session_id, history, list(new_messages))

    def record(self, run_id: str, messages: Sequence[Message]) -> None:
        """Add messages produced during the run (assistant tool calls, tool results)."""
        self._runs[run_id].turn.extend(messages)

    def turn_messages(self, run_id: str) -> list[Message]:
        return copy.deepcopy(self._runs[run_id].turn)

    def end_run(self, run_id: str) -> None:
        self._runs.pop(run_id, None)

    def messages_for_llm(self, run_id: str, session_id: str | None = None) -> list[Message]:
        """The conversation to send for ``run_id``: the history window, then this turn.

        The system prompt is added by the Agent and is never part of the session. The list
        returned is a fresh copy: subclasses may insert or remove messages freely.
        """
        run = self._runs.get(run_id)
        if run is None:
            raise InvalidInputError(f"unknown run_id {run_id!r}")
        return copy.deepcopy(run.history + run.turn)

    # -- session operations ------------------------------------------------------------

    async def aget_session_context(self, session_id: str) -> list[Message]:
        """The stored history of ``session_id`` (a copy; empty if unknown)."""
        return await self.store.load(validate_session_id(session_id))

    async def aclear_session(self, session_id: str) -> None:
        """Forget ``session_id``'s history."""
        await self.store.clear(validate_session_id(session_id))

    async def aset_session_context(self, session_id: str, messages: Sequence[Message]) -> None:
        """Replace ``session_id``'s history with ``messages`` (atomically)."""
        if isinstance(messages, (str, bytes, dict)):
            raise InvalidInputError("messages must be a list of message dicts")
        checked = [validate_message(m) for m in messages]
        await self.store.replace(validate_session_id(session_id), checked)

    async def aget_inactive_sessions(
        self,
        max_age_hours: float | None = None,
        *,
        max_age_seconds: float | None = None,
        limit: int = 1000,
    ) -> list[str]:
        """Ids of sessions not updated for at least the given age (hours or seconds)."""
        return [
            s.session_id
            for s in await self.alist_sessions(
                max_age_hours=max_age_hours, max_age_seconds=max_age_seconds, limit=limit
            )
        ]

    async def alist_sessions(
        self,
        max_age_hours: float | None = None,
        *,
        max_age_seconds: float | None = None,
        limit: int = 1000,
    ) -> list[SessionInfo]:
        """Sessions (with their sizes and timestamps), least recently updated first."""
        if max_age_hours is not None and max_age_seconds is not None:
            raise InvalidInputError("give max_age_hours or max_age_seconds, not both")
        age = age_arg(max_age_seconds, "max_age_seconds")
        if max_age_hours is not None:
            age = AGE_HOURS.check("max_age_hours", max_age_hours, InvalidInputError) * 3600.0
        limit = COUNT.check_int("limit", limit, InvalidInputError)
        return await self.store.list_sessions(inactive_for=age, limit=limit)

    def get_session_context(self, session_id: str) -> list[Message]:
        """Plain twin of :meth:`aget_session_context`."""
        return run_sync(self.aget_session_context, session_id)

    def clear_session(self, session_id: str) -> None:
        """Plain twin of :meth:`aclear_session`."""
        run_sync(self.aclear_session, session_id)

    def set_session_context(self, session_id: str, messages: Sequence[Message]) -> None:
        """Plain twin of :meth:`aset_session_context`."""
        run_sync(self.aset_session_context, session_id, messages)

    def get_inactive_sessions(
        self,
        max_age_hours: float | None = None,
        *,
        max_age_seconds: float | None = None,
        limit: int = 1000,
    ) -> list[str]:
        """Plain twin of :meth:`aget_inactive_sessions`."""
        return run_sync(
            lambda: self.aget_inactive_sessions(
                max_age_hours, max_age_seconds=max_age_seconds, limit=limit
            )
        )


class StatelessContextManager(ContextManager):
    """No memory: every call is independent, and nothing is stored."""

    stores_history = False

    def __init__(self) -> None:
        super().__init__(max_history=0)
