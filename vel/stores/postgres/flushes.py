"""A flush as the durable tier takes it: one session's :class:`FlushBatch` (what to write and
what Postgres must still hold for it to apply), the :class:`FlushResult` it gets back, and the
reasons a batch is refused as a conflict (:data:`CHANGED`, :data:`DELETED`; DESIGN.md 3.8).
:class:`~vel.stores.postgres.sink.Sink` applies them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from vel.stores.postgres.sql import Row

# Conflict reasons (FlushResult.conflict): why a batch was not applied.
CHANGED = "changed"  # Postgres' revision differs: a write outside the tier since the load
DELETED = "deleted"  # the row the Redis copy was loaded from is gone


@dataclass(frozen=True, slots=True)
class FlushBatch:
    """One session's batch of a flush, with what the flush checks it against.

    Attributes:
        session_id, generation, rows: what to write (rows possibly empty, to record a
            newer generation only).
        revision: the revision the Redis copy was loaded at (None: not checked).
        written_ms: when the session was last written (Unix ms; None: now). Retention
            counts from it.
        had_postgres_rows: the Redis copy was loaded from, or already flushed to, Postgres
            rows; a missing row then means it was deleted behind the tier.
        truncate: ``(from_generation, keep)`` after pops: a row at ``from_generation`` or
            later (below ``generation``) reaches it by dropping the seqs above ``keep``.
    """

    session_id: str
    generation: int
    rows: Sequence[Row]
    revision: int | None = None
    written_ms: int | None = None
    had_postgres_rows: bool = False
    truncate: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True)
class FlushResult:
    """Outcome of :meth:`PostgresStore.apply_flush`.

    Attributes:
        inserted: rows newly written.
        duplicates: rows already present with the same message id (a replayed batch).
        stale: the batch was not applied: Postgres holds a newer generation, or (with
            ``conflict`` set) the history changed behind the tier.
        conflict: None, or why the batch cannot be applied (``"changed"``, ``"deleted"``).
        lease_ms: milliseconds left on the session's tier lease after the flush.
    """

    inserted: int
    duplicates: int
    stale: bool = False
    conflict: str | None = None
    lease_ms: int | None = field(default=None, compare=False)


def as_batch(batch: FlushBatch | tuple[str, int, Sequence[Row]]) -> FlushBatch:
    """A batch given as ``(session_id, generation, rows)`` as a :class:`FlushBatch`."""
    if isinstance(batch, FlushBatch):
        return batch
    session_id, generation, rows = batch
    return FlushBatch(session_id, generation, rows)
