"""Summaries of what falls out of a session's window (``ContextManager(summarize=True)``).

- :mod:`vel.summaries.policy`: when a summary is due and which messages it covers.
- :mod:`vel.summaries.prompt`: the default summariser (the Agent's model) and its prompt.
- :mod:`vel.summaries.runner`: background, single-flight, resumable summarisation.
- one backend per storage mode: :mod:`~vel.summaries.memory`, :mod:`~vel.summaries.postgres`
  (table ``vel_summaries``), :mod:`~vel.summaries.redis` (the hot tier, written through to
  Postgres when there is one).
"""

from __future__ import annotations

from typing import Any

from vel.errors import ConfigurationError
from vel.summaries.base import Entry, History, Summary, SummaryBackend
from vel.summaries.policy import SummaryPolicy
from vel.summaries.prompt import ModelSummarizer, Summarizer
from vel.summaries.runner import Summaries

__all__ = [
    "Entry",
    "History",
    "ModelSummarizer",
    "Summaries",
    "Summarizer",
    "Summary",
    "SummaryBackend",
    "SummaryPolicy",
    "backend_for",
]


def backend_for(store: Any) -> SummaryBackend:
    """The summary backend of a vel store (the same mode, the same servers).

    Raises:
        ConfigurationError: a store vel did not build (summaries need its seqs and ids).
    """
    from vel.stores.memory import MemoryStore

    if isinstance(store, MemoryStore):
        from vel.summaries.memory import MemorySummaries

        return MemorySummaries(store)
    from vel.stores.redis import RedisStore
    from vel.stores.tiered import TieredStore

    if isinstance(store, TieredStore):
        from vel.summaries.postgres import PostgresSummaries
        from vel.summaries.redis import RedisSummaries

        return RedisSummaries(store.hot, PostgresSummaries(store.cold, check_history=False))
    if isinstance(store, RedisStore):
        from vel.summaries.redis import RedisSummaries

        return RedisSummaries(store, None)
    from vel.stores.postgres import PostgresStore

    if isinstance(store, PostgresStore):
        from vel.summaries.postgres import PostgresSummaries

        return PostgresSummaries(store)
    raise ConfigurationError(
        f"summarize=True works with vel's stores ('memory', 'database', 'redis'), "
        f"not {type(store).__name__}"
    )
