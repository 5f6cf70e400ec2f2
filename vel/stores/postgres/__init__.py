"""The Postgres tier: :class:`PostgresStore` and the types of its durable-tier calls.

The store is a facade (:mod:`.store`) over parts that each hold one responsibility:
:mod:`.connector` (pools, deadlines, error translation), :mod:`.sessions` (write-through
reads and writes), :mod:`.sink` (the two-tier store's durable side), :mod:`.locks` (turn
locks), :mod:`.maintenance` (listing, purge, gauges); :mod:`.migrate` applies the schema.
"""

from vel.errors import FlushConflictError
from vel.stores.postgres.sessions import ImportCounts, ImportEntry
from vel.stores.postgres.sink import FlushBatch, FlushResult, Snapshot
from vel.stores.postgres.store import PostgresStore

__all__ = [
    "FlushBatch",
    "FlushConflictError",
    "FlushResult",
    "ImportCounts",
    "ImportEntry",
    "PostgresStore",
    "Snapshot",
]
