"""Every Redis key vel uses, defined in one place.

Sessions are spread over ``buckets`` hash slots: all keys of a session, and its bucket's dirty
set and backlog counter, share the hash tag ``{<bucket>}``, so every Lua script touches one slot
(Redis Cluster accepts it) and flushers can walk the buckets shard by shard. The session id is
placed after the tag and after a fixed-length type marker, so no id, whatever characters it
holds (braces, colons, ``*``, newlines), can produce another id's key or move the tag.

The bucket count is part of the data layout: every process sharing a Redis must use the same
value (it is fixed per key prefix).
"""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass

from vel.bounds import BUCKETS
from vel.namespace import check_prefix

DEFAULT_BUCKETS = 16


@dataclass(frozen=True, slots=True)
class SessionKeys:
    meta: str  # hash: seq, flushed, gen, fgen, created, updated, base, lease, expires, rev,
    # pgrows, conflict (+ tgen, tseq after a pop; see vel.stores.redis.scripts)
    messages: str  # list: "<message id>\n<json>" per message, seq base+1 at index 0
    replays: str  # zset: first message id of recent appends (or of the last 64 messages of a
    # warmed session) -> the seq of that message
    warm_lock: str  # string: token of the process warming this session from Postgres
    turn_lock: str  # string: token of the turn holding this session ('token!' while turns
    # wait for it, '~token' an abandoned attempt: see vel.stores.redis.scripts)
    wake: str  # list: the wake-up a released turn lock leaves for a waiting turn
    dirty: str  # zset (per bucket): session id -> due time in ms
    dirty_since: str  # zset (per bucket): session id -> when it first became dirty, ms
    backlog: str  # integer (per bucket): messages not yet written to Postgres
    conflicts: str  # zset (per bucket): session id -> when a flush of it could not be applied
    details: str  # hash (Redis-only mode): owner, metadata (JSON); see vel.stores.redis.catalog
    tag: str  # the hash tag every key above shares
    session_id: str

    @property
    def data(self) -> tuple[str, str, str]:
        """The keys that hold the session itself (they share one TTL)."""
        return (self.meta, self.messages, self.replays)

    @property
    def layout(self) -> list[str]:
        """KEYS 1..7 of the session scripts (see :mod:`vel.stores.redis.scripts`)."""
        return [*self.data, self.dirty, self.dirty_since, self.backlog, self.conflicts]

    def staging(self, token: str) -> str:
        """list: a long history pushed in chunks before one script swaps it in. ``token``
        is fixed-length hex, placed before the id, so no id can produce another's key."""
        return f"{self.tag}:s:{token}:{self.session_id}"


@dataclass(frozen=True, slots=True)
class KeyLayout:
    prefix: str = "vel"
    buckets: int = DEFAULT_BUCKETS

    def __post_init__(self) -> None:
        check_prefix(self.prefix, "Redis key prefix")
        BUCKETS.check("bucket count", self.buckets)

    def bucket_of(self, session_id: str) -> int:
        return zlib.crc32(session_id.encode("utf-8")) % self.buckets

    def tag(self, bucket: int) -> str:
        return f"{self.prefix}:{{{bucket}}}"

    def bucket_keys(self, bucket: int) -> tuple[str, str, str]:
        """(dirty, dirty_since, backlog) of one bucket."""
        tag = self.tag(bucket)
        return (f"{tag}:dirty", f"{tag}:since", f"{tag}:backlog")

    def conflicts(self, bucket: int) -> str:
        """zset: the bucket's sessions whose flush could not be applied (DESIGN.md 3.8)."""
        return f"{self.tag(bucket)}:conflicts"

    def prefixes(self, bucket: int) -> tuple[str, str, str]:
        """The (meta, messages, replays) key prefixes of a bucket's sessions: a session's
        key is its prefix followed by its id (the flusher's scripts build them so)."""
        tag = self.tag(bucket)
        return (f"{tag}:h:", f"{tag}:m:", f"{tag}:r:")

    def session(self, session_id: str) -> SessionKeys:
        # Built once per session and kept (a turn needs them several times; the strings
        # cost more than the rest of a turn's bookkeeping).
        return _session_keys(self, session_id)

    def _build(self, session_id: str) -> SessionKeys:
        bucket = self.bucket_of(session_id)
        tag = self.tag(bucket)
        dirty, since, backlog = self.bucket_keys(bucket)
        meta, messages, replays = self.prefixes(bucket)
        return SessionKeys(
            meta=meta + session_id,
            messages=messages + session_id,
            replays=replays + session_id,
            warm_lock=f"{tag}:w:{session_id}",
            turn_lock=f"{tag}:l:{session_id}",
            wake=f"{tag}:k:{session_id}",
            dirty=dirty,
            dirty_since=since,
            backlog=backlog,
            conflicts=self.conflicts(bucket),
            details=f"{tag}:d:{session_id}",
            tag=tag,
            session_id=session_id,
        )

    def summary(self, session_id: str) -> tuple[str, str]:
        """(hash: the session's summary, string: its summariser's lease), under the
        session's hash tag so a script can check the summary against the session's copy."""
        tag = self.tag(self.bucket_of(session_id))
        return f"{tag}:y:{session_id}", f"{tag}:yl:{session_id}"

    @property
    def summary_lags(self) -> str:
        """zset: session id -> messages older than its window its summary does not cover
        (as a summariser last saw it; ``vel stats``)."""
        return f"{self.prefix}:{{summaries}}:lag"

    def sweep(self, bucket: int) -> str:
        """string: a bucket's sweep turn, held by one flusher for the sweep interval."""
        return f"{self.tag(bucket)}:sweep"

    @property
    def last_sweep(self) -> str:
        """string: when a flusher last swept every bucket, ms (one server only: flushers
        sharing it space their sweeps by it)."""
        return f"{self.prefix}:{{sweeps}}:last"

    @property
    def meta_pattern(self) -> str:
        """SCAN pattern matching every session's meta key (and, rarely, other keys: check
        each match with :meth:`session_id_of`)."""
        return f"{self.prefix}:{{*}}:h:*"

    @property
    def totals(self) -> str:
        """hash: cumulative counters of every process sharing this prefix (``vel stats``)."""
        return f"{self.prefix}:{{totals}}:counters"

    def flushed_in(self, second: int) -> str:
        """integer: messages flushed during one Unix second (expires after a few minutes)."""
        return f"{self.prefix}:{{totals}}:flushed:{second}"

    @property
    def details_pattern(self) -> str:
        """SCAN pattern matching every session's details key (Redis-only mode)."""
        return f"{self.prefix}:{{*}}:d:*"

    def session_id_of(self, meta_key: str) -> str | None:
        """Invert :meth:`session` for a meta key (used by listing tools)."""
        head, sep, sid = meta_key.partition("}:h:")
        return sid if sep and head.startswith(f"{self.prefix}:{{") else None


@functools.lru_cache(maxsize=16384)
def _session_keys(layout: KeyLayout, session_id: str) -> SessionKeys:
    return layout._build(session_id)
