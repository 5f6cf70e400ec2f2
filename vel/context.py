"""Context managers: what part of a session the model sees, and plain session operations.

The Agent asks its context manager to *prepare* a run (one awaited store read of the
window), then calls :meth:`ContextManager.messages_for_llm` synchronously at every model
step. Subclasses override ``messages_for_llm`` exactly as the spec shows, calling ``super()``
and editing the returned list, which is always a fresh copy.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vel._sync import run_sync
from vel.bounds import AGE_HOURS, COUNT, age_arg
from vel.catalog_ops import SessionCatalogOps
from vel.errors import ConfigurationError, InvalidInputError
from vel.messages import Message, validate_message, validate_session_id
from vel.stores.base import SessionInfo, SessionStore
from vel.stores.memory import MemoryStore

if TYPE_CHECKING:
    from vel.summaries import Summaries, Summarizer, Summary, SummaryPolicy


@dataclass
class _Run:
    session_id: str | None
    history: list[Message]
    turn: list[Message] = field(default_factory=list)
    summary: Summary | None = None


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
        summarize: also show the model a summary of everything older than the window (one
            system message before it). The stored messages are never changed; the summary
            is kept beside them and brought up to date in the background after a turn's
            commit, never on the turn's path (see :mod:`vel.summaries`). Needs
            ``max_history``.
        summarize_every: K: a summarisation starts once K messages older than the window
            are not covered yet, so at most one summariser call per K new messages
            (default 10).
        summarizer: ``(previous summary or None, new messages) -> summary`` (plain or
            async); default: the Agent's own model with the prompt of
            :mod:`vel.summaries.prompt`.
        summary_policy: lease, retries and backoff of the background summariser
            (:class:`vel.SummaryPolicy`).

    Session operations come in plain form (``get_session_context``, ``clear_session``,
    ``set_session_context``, ``get_inactive_sessions``), usable from any code, and async twins
    prefixed with ``a`` for code that runs on an event loop; so do the calls that organise
    sessions (owner, metadata, listings, history pages: see :mod:`vel.catalog_ops`).
    """

    stores_history = True

    def __init__(
        self,
        max_history: int | None = None,
        summarize: bool = False,
        *,
        summarize_every: int | None = None,
        summarizer: Summarizer | None = None,
        summary_policy: SummaryPolicy | None = None,
    ) -> None:
        checked = COUNT.check_optional("max_history", max_history)
        max_history = None if checked is None else int(checked)
        if not isinstance(summarize, bool):
            raise ConfigurationError(f"summarize must be True or False, got {summarize!r}")
        if summarize and not max_history:
            raise ConfigurationError(
                "summarize=True summarises what falls out of the window: give max_history"
            )
        if summarizer is not None and not callable(summarizer):
            raise ConfigurationError("summarizer must be a callable (previous, messages)")
        from vel.summaries import SummaryPolicy

        policy = summary_policy if summary_policy is not None else SummaryPolicy()
        if not isinstance(policy, SummaryPolicy):
            raise ConfigurationError("summary_policy must be a vel.summaries.SummaryPolicy")
        if summarize_every is not None:
            policy = dataclasses.replace(policy, every=summarize_every)
        self.summary_policy = policy
        self.max_history = max_history
        self.summarize = summarize
        self.summarizer = summarizer
        self._store: SessionStore | None = None
        self._summaries: Summaries | None = None
        self._runs: dict[str, _Run] = {}
        self._prefetched: dict[str, asyncio.Task[Summary | None]] = {}

    # -- binding -----------------------------------------------------------------------

    @property
    def store(self) -> SessionStore:
        """The session store this context manager reads and writes (the Agent's)."""
        if self._store is None:
            self._store = MemoryStore()
        return self._store

    @property
    def summaries(self) -> Summaries | None:
        """The background summariser (None unless ``summarize=True`` and bound)."""
        return self._summaries

    def bind(self, store: SessionStore, model: Any = None) -> None:
        """Serve ``store``; ``model``: the Agent's provider, the default summariser."""
        if self._store is not None and self._store is not store:
            raise ConfigurationError(
                "this context manager already serves another agent's store; "
                "give each Agent its own ContextManager"
            )
        self._store = store
        if self.summarize and self._summaries is None:
            from vel.summaries import ModelSummarizer, Summaries, backend_for

            summarizer = self.summarizer
            if summarizer is None:
                if model is None:
                    raise ConfigurationError(
                        "summarize=True needs a summarizer, or an Agent (its model)"
                    )
                summarizer = ModelSummarizer(model)
            assert self.max_history is not None
            self._summaries = Summaries(
                backend_for(store), summarizer, self.max_history, self.summary_policy
            )

    async def aclose(self) -> None:
        """Let background summarisations end (bounded). Called by ``Agent.aclose``."""
        if self._summaries is not None:
            await self._summaries.aclose()

    # -- runs (called by the Agent) ------------------------------------------------------

    def prefetch(self, run_id: str, session_id: str | None) -> None:
        """Start reading the session's summary while the Agent takes the turn lock, so the
        summary costs the turn no round trip of its own (the newest one stored by then)."""
        if self._summaries is not None and session_id is not None and self.stores_history:
            self._prefetched[run_id] = asyncio.get_running_loop().create_task(
                self._summaries.get(session_id), name="vel-summary-read"
            )

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
        summary: Summary | None = None
        prefetched = self._prefetched.pop(run_id, None)
        if session_id is not None and self.stores_history and self.max_history != 0:
            summaries = self._summaries
            if prefetched is not None:
                if window is None:
                    window = await self.store.load(session_id, limit=self.max_history)
                summary = await prefetched
            elif window is None and summaries is not None:
                window, summary = await asyncio.gather(
                    self.store.load(session_id, limit=self.max_history),
                    summaries.get(session_id),
                )
            else:
                if window is None:
                    window = await self.store.load(session_id, limit=self.max_history)
                if summaries is not None:
                    summary = await summaries.get(session_id)
            assert window is not None
            history = trim_window(window)
        self._runs[run_id] = _Run(session_id, history, list(new_messages), summary)

    def committed(self, run_id: str, last_seq: int | None) -> None:
        """The run's messages are stored and the session ends at ``last_seq``: bring its
        summary up to date in the background if it lags by ``summarize_every`` or more."""
        run = self._runs.get(run_id)
        if self._summaries is None or run is None or run.session_id is None or not last_seq:
            return
        covered = run.summary.covered_seq if run.summary is not None else 0
        self._summaries.observe(run.session_id, last_seq, covered)

    def record(self, run_id: str, messages: Sequence[Message]) -> None:
        """Add messages produced during the run (assistant tool calls, tool results)."""
        self._runs[run_id].turn.extend(messages)

    def turn_messages(self, run_id: str) -> list[Message]:
        return copy.deepcopy(self._runs[run_id].turn)

    def end_run(self, run_id: str) -> None:
        self._runs.pop(run_id, None)
        prefetched = self._prefetched.pop(run_id, None)
        if prefetched is not None:  # the turn ended before it was prepared
            prefetched.cancel()

    def messages_for_llm(self, run_id: str, session_id: str | None = None) -> list[Message]:
        """The conversation to send for ``run_id``: the history window, then this turn.

        The system prompt is added by the Agent and is never part of the session. The list
        returned is a fresh copy: subclasses may insert or remove messages freely.
        """
        run = self._runs.get(run_id)
        if run is None:
            raise InvalidInputError(f"unknown run_id {run_id!r}")
        if run.summary is not None:
            from vel.summaries.prompt import summary_message

            return [summary_message(run.summary.text), *copy.deepcopy(run.history + run.turn)]
        return copy.deepcopy(run.history + run.turn)

    # -- session operations ------------------------------------------------------------

    async def aget_session_context(self, session_id: str) -> list[Message]:
        """The stored history of ``session_id`` (a copy; empty if unknown)."""
        return await self.store.load(validate_session_id(session_id))

    async def aclear_session(self, session_id: str) -> None:
        """Forget ``session_id``'s history (and its summary)."""
        await self.store.clear(validate_session_id(session_id))
        await self._drop_summary(session_id)

    async def _drop_summary(self, session_id: str) -> None:
        # A summary no longer matching the history is never served anyway (it names the id
        # of the last message it covers); dropping it here frees it at once.
        if self._summaries is not None:
            await self._summaries.backend.delete(session_id)

    async def aget_summary(self, session_id: str) -> Summary | None:
        """``session_id``'s current summary (None: none yet, or ``summarize`` is off)."""
        if self._summaries is None:
            return None
        return await self._summaries.backend.get(validate_session_id(session_id))

    def get_summary(self, session_id: str) -> Summary | None:
        """Plain twin of :meth:`aget_summary`."""
        return run_sync(self.aget_summary, session_id)

    async def aset_session_context(self, session_id: str, messages: Sequence[Message]) -> None:
        """Replace ``session_id``'s history with ``messages`` (atomically)."""
        if isinstance(messages, (str, bytes, dict)):
            raise InvalidInputError("messages must be a list of message dicts")
        checked = [validate_message(m) for m in messages]
        await self.store.replace(validate_session_id(session_id), checked)
        await self._drop_summary(session_id)

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
