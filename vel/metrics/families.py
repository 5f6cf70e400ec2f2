"""Every metric vel exports, named by the Prometheus conventions, and where its value comes from.

Stores and the flusher count under short keys (their ``stats()`` and the shared Redis totals
that ``vel stats`` reads keep those keys, so processes of different versions still add up).
:data:`STATS` maps each key to its exported family and labels: units in the name
(``_seconds``), counters ending in ``_total``, outcomes as one family with a label
(``vel_flush_batches_total{outcome="ok"}``), and a ``tier`` label on what more than one store
kind counts (``vel_appends_total{tier="postgres"}``). A ``postgres_``-prefixed key is the
Postgres tier's counter inside the two-tier store.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["COUNTER", "GAUGE", "HISTOGRAM", "STATS", "Family", "family_of"]

COUNTER = "counter"
GAUGE = "gauge"
HISTOGRAM = "histogram"


@dataclass(frozen=True, slots=True)
class Family:
    """One exported metric family.

    Attributes:
        name: the name after the ``vel_`` prefix, without ``_total`` (added for counters).
        kind: ``counter``, ``gauge`` or ``histogram``.
        help: the HELP text.
        tiered: samples carry the ``tier`` label (memory, redis or postgres).
    """

    name: str
    kind: str
    help: str
    tiered: bool = False


def _counter(name: str, text: str, *, tiered: bool = False) -> Family:
    return Family(name, COUNTER, text, tiered)


def _gauge(name: str, text: str, *, tiered: bool = False) -> Family:
    return Family(name, GAUGE, text, tiered)


FLUSH_BATCHES = _counter("flush_batches", "Flush batches by outcome (a failed one is retried).")
WARM_LOADS = _counter(
    "warm_loads",
    "Warms by outcome: ok (loaded from Postgres), exists (found in Redis already), "
    "stale (abandoned: the warm lease was lost).",
)
REDIS_LOOKUPS = _counter(
    "redis_lookups", "Reads and appends by whether Redis held the session (miss: warmed)."
)
APPENDS = _counter("appends", "Appends stored (a turn's commit is one).", tiered=True)
DUPLICATES = _counter(
    "duplicates_suppressed",
    "Retried appends recognised by their message ids and not stored twice.",
    tiered=True,
)
OLDER_READS = _counter(
    "older_reads",
    "Reads below what a partial Redis copy holds, served from Postgres by outcome: ok, or "
    "stale (the history the copy was loaded from had changed; read again).",
)
SESSIONS = _gauge("sessions", "Live sessions in the store.", tiered=True)
MESSAGES = _gauge("messages", "Messages of live sessions in the store.", tiered=True)

# stats key -> (family, labels)
STATS: dict[str, tuple[Family, tuple[tuple[str, str], ...]]] = {
    "unflushed_messages": (
        _gauge("unflushed_messages", "Messages in Redis not yet written to Postgres."),
        (),
    ),
    "oldest_dirty_age": (
        _gauge("oldest_dirty_age_seconds", "Age of the oldest unflushed session's backlog."),
        (),
    ),
    "dirty_sessions": (_gauge("dirty_sessions", "Sessions with unflushed messages."), ()),
    "conflict_sessions": (
        _gauge(
            "conflict_sessions",
            "Sessions whose flush Postgres could not apply, kept in Redis until resolved.",
        ),
        (),
    ),
    "flush_batches_ok": (FLUSH_BATCHES, (("outcome", "ok"),)),
    "flush_batches_failed": (FLUSH_BATCHES, (("outcome", "failed"),)),
    "flush_retries": (_counter("flush_retries", "Flusher sweeps retried after an error."), ()),
    "flushed_messages": (
        _counter("flushed_messages", "Messages written to Postgres by the flusher."),
        (),
    ),
    "flush_duplicates_suppressed": (
        _counter("flush_duplicates_suppressed", "Flushed rows Postgres already had."),
        (),
    ),
    "flush_stale_generations": (
        _counter(
            "flush_stale_generations",
            "Flushes not written: Postgres held a newer generation of the session.",
        ),
        (),
    ),
    "flush_conflicts": (
        _counter("flush_conflicts", "Sessions set aside because Redis and Postgres diverged."),
        (),
    ),
    "older_reads": (OLDER_READS, (("outcome", "ok"),)),
    "older_reads_stale": (OLDER_READS, (("outcome", "stale"),)),
    "flush_sweeps_skipped": (
        _counter("flush_sweeps_skipped", "Bucket sweeps left to another flusher."),
        (),
    ),
    "warm_loads_ok": (WARM_LOADS, (("outcome", "ok"),)),
    "warm_loads_exists": (WARM_LOADS, (("outcome", "exists"),)),
    "warm_loads_stale": (WARM_LOADS, (("outcome", "stale"),)),
    "warm_waits": (_counter("warm_waits", "Reads that waited for another task's warm."), ()),
    "postgres_loads": (
        _counter("postgres_snapshot_loads", "Session snapshots read from Postgres to warm."),
        (),
    ),
    "redis_hits": (REDIS_LOOKUPS, (("result", "hit"),)),
    "redis_misses": (REDIS_LOOKUPS, (("result", "miss"),)),
    "evictions_seen": (
        _counter("evictions_seen", "Sessions Postgres had that Redis had lost or expired."),
        (),
    ),
    "appends": (APPENDS, ()),
    "duplicates_suppressed": (DUPLICATES, ()),
    "append_retries_deduplicated": (DUPLICATES, ()),
    "backpressure_rejections": (
        _counter("backpressure_rejections", "Appends refused because the backlog was full."),
        (),
    ),
    "lock_waits": (
        _counter("lock_waits", "Turns that had to wait for their session's lock.", tiered=True),
        (),
    ),
    "damaged_reads": (
        _counter("damaged_reads", "Stored messages that could not be decoded."),
        (),
    ),
    "sessions": (SESSIONS, ()),
    "messages": (MESSAGES, ()),
    "pool_size": (
        _gauge("postgres_pool_connections", "Connections of this process's Postgres pool."),
        (),
    ),
    "pool_idle": (
        _gauge("postgres_pool_idle_connections", "Idle connections of the Postgres pool."),
        (),
    ),
    "flushes": (
        _counter("postgres_flush_transactions", "Flush transactions Postgres applied."),
        (),
    ),
    "flush_duplicates": (
        _counter("postgres_flush_duplicate_rows", "Flushed rows Postgres already held."),
        (),
    ),
    "flush_stale": (
        _counter(
            "postgres_flush_stale_sessions",
            "Flushed sessions refused for an older generation.",
        ),
        (),
    ),
    "flush_conflicted": (
        _counter(
            "postgres_flush_conflicted_sessions",
            "Flushed sessions refused: their history changed outside the Redis tier.",
        ),
        (),
    ),
    "failures": (
        _counter("backend_failures", "Backend calls that failed.", tiered=True),
        (),
    ),
    "summary_calls": (
        _counter(
            "summary_calls", "Summariser calls (ContextManager(summarize=True)), retries included."
        ),
        (),
    ),
    "summary_failures": (
        _counter(
            "summary_failures", "Summariser calls that failed (logged, retried with backoff)."
        ),
        (),
    ),
    "summaries_written": (
        _counter("summaries_written", "Summaries stored (each covers at least K new messages)."),
        (),
    ),
    "summary_runs_skipped": (
        _counter(
            "summary_runs_skipped",
            "Summarisations left to the process holding the session's summary lease.",
        ),
        (),
    ),
    "summary_lag_messages": (
        _gauge(
            "summary_lag_messages",
            "Messages older than the window no summary covers yet (sessions this process "
            "served last).",
        ),
        (),
    ),
    "summary_sessions_behind": (
        _gauge(
            "summary_sessions_behind",
            "Sessions whose summary is due (K uncovered messages) and not written yet.",
        ),
        (),
    ),
    "summary_max_lag": (
        _gauge("summary_max_lag_messages", "The largest lag of a session whose summary is due."),
        (),
    ),
}

_TIER_PREFIX = "postgres_"


def family_of(key: str, tier: str | None) -> tuple[Family, tuple[tuple[str, str], ...]]:
    """The family and labels of a ``stats()`` key, counted by a store of ``tier``.

    A ``postgres_``-prefixed key not in :data:`STATS` is the Postgres tier's own (the two-tier
    store prefixes them). A key nobody declared is exported as a gauge (a value read now),
    so every family stays typed.
    """
    if key in STATS:
        family, labels = STATS[key]
    elif key.startswith(_TIER_PREFIX) and key[len(_TIER_PREFIX) :] in STATS:
        family, labels = STATS[key[len(_TIER_PREFIX) :]]
        tier = "postgres"
    else:
        name = "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in key)
        return Family(name, GAUGE, f"vel {key}."), ()
    if family.tiered and tier is not None:
        labels = (*labels, ("tier", tier))
    return family, labels
