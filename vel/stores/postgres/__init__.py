"""The Postgres tier: :class:`PostgresStore` and the types of its durable-tier calls.

The store is a facade (:mod:`.store`; its calls grouped in :mod:`.writethrough`, :mod:`.turns`,
:mod:`.organise`, :mod:`.operations` and, the durable-tier ones, :mod:`.tier`) over parts that
each hold one responsibility: :mod:`.connector` (pools, deadlines, error translation),
:mod:`.sessions` (write-through reads and writes), :mod:`.sink` (the flusher's writes),
:mod:`.lease` (the tier lease and the warm's reads), :mod:`.resolve` (conflict resolutions),
:mod:`.locks` (turn locks), :mod:`.catalog` (owners, listings, history pages),
:mod:`.maintenance` (listing, purge, gauges); :mod:`.sql` holds shared SQL pieces and
:mod:`.migrate` applies the schema.
"""

from vel.errors import FlushConflictError
from vel.stores.postgres.flushes import FlushBatch, FlushResult
from vel.stores.postgres.lease import Snapshot
from vel.stores.postgres.sessions import ImportCounts, ImportEntry
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
