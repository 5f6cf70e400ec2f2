"""vel's metrics by the Prometheus conventions: counters, backlog gauges and latency
histograms (turn, load, append, flush, warm, lock wait).

- :func:`render` writes a ``stats()`` mapping and the histograms in the text format;
  :func:`render_store` does it for a store (``await render_store(agent.store)`` from your
  own ``/metrics`` route).
- :class:`MetricsServer` serves such a collector on its own port (``vel flusher
  --metrics-port``).
- :class:`vel.metrics.prometheus.VelCollector` plugs into ``prometheus_client`` (the
  ``prometheus`` extra).

Every family is typed; the names, labels and their meaning are in
:mod:`vel.metrics.families` and ``docs/operations.md``.
"""

from __future__ import annotations

from typing import Any

from vel.metrics.exposition import CONTENT_TYPE, render
from vel.metrics.families import STATS, Family
from vel.metrics.histograms import HISTOGRAMS, Histogram
from vel.metrics.process import process_counters, track
from vel.metrics.server import MetricsServer

__all__ = [
    "CONTENT_TYPE",
    "HISTOGRAMS",
    "STATS",
    "Family",
    "Histogram",
    "MetricsServer",
    "process_counters",
    "render",
    "render_store",
    "tier_of",
    "track",
]


def tier_of(store: Any) -> str | None:
    """The ``tier`` label of a store's unprefixed ``stats()`` keys."""
    from vel.stores.memory import MemoryStore
    from vel.stores.postgres import PostgresStore
    from vel.stores.redis import RedisStore
    from vel.stores.tiered import TieredStore

    if isinstance(store, (TieredStore, RedisStore)):
        return "redis"
    if isinstance(store, PostgresStore):
        return "postgres"
    if isinstance(store, MemoryStore):
        return "memory"
    return None


async def render_store(store: Any, *, histograms: bool = True) -> str:
    """``await store.stats()`` and this process's histograms, in the Prometheus text format.

    Raises:
        StoreError: the store could not be read.
    """
    return render(await store.stats(), tier=tier_of(store), histograms=histograms)
