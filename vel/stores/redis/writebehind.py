"""The source side of write-behind: what a flusher claims, reads and acknowledges in Redis.

Dirty sessions sit in their bucket's due-time ZSET. A flusher claims due ones with a lease (a
visibility timeout: the claim pushes their due time past the lease), reads what each still has
to copy (:class:`Pending`), writes it to Postgres, then acknowledges: ``flushed`` only ever
rises, and a session gets its TTL back only once clean (DESIGN.md 3.2 and 3.3). A flush that
Postgres cannot apply (its history changed behind the tier) is never acknowledged: the session
moves to its bucket's conflict set, keeps no TTL, and waits for :meth:`WriteBehind.resolved`
(DESIGN.md 3.8).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from vel.stores.redis.client import Client, Connector, ms, now_ms
from vel.stores.redis.items import split
from vel.stores.redis.keys import KeyLayout
from vel.stores.redis.sessions import Sessions
from vel.stores.redis.wbscripts import PENDING_HEADER


@dataclass(frozen=True, slots=True)
class Pending:
    """What a flusher has to copy for one session.

    ``rev`` is the Postgres revision the copy was loaded at (None: unknown), ``updated_ms``
    when it was last written, ``had_postgres_rows`` whether Postgres held messages of it.
    ``truncate`` is ``(tgen, tseq)`` after pops: Postgres at generation ``tgen`` or later
    (but older than ``gen``) reaches ``gen`` by dropping the seqs above ``tseq``; None: a
    Postgres older than ``gen`` starts it afresh.
    """

    session_id: str
    gen: int
    fgen: int
    flushed: int
    seq: int
    rows: list[tuple[int, str, str]]  # (seq, message id, message JSON)
    rev: int | None = None
    updated_ms: int | None = None
    had_postgres_rows: bool = False
    truncate: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True)
class Conflict:
    """A session whose flush could not be applied (see ``vel sessions conflicts``)."""

    session_id: str
    reason: str
    since_ms: int
    seq: int
    flushed: int
    base: int
    gen: int
    fgen: int


@dataclass(slots=True)
class Claim:
    """A flusher's claim on due sessions of one bucket, held until ``until_ms``."""

    bucket: int
    session_ids: list[str]
    until_ms: int


class WriteBehind:
    """Claims, pending reads, acknowledgements, conflicts and the backlog; ``sessions``
    supplies the scripts' common arguments (hot TTL, retention)."""

    def __init__(self, redis: Connector, keys: KeyLayout, *, sessions: Sessions) -> None:
        self._redis = redis
        self._keys = keys
        self._sessions = sessions

    async def sweep(
        self,
        buckets: Sequence[int],
        hold: float,
        lease: float,
        limit: int,
        max_rows: int,
        gap: float = 0.0,
    ) -> tuple[list[tuple[Claim, list[Pending | None]]] | None, int]:
        """Claim the sessions of ``buckets`` due ``hold`` seconds ago or earlier (up to
        ``limit`` per bucket) for ``lease`` seconds, and read what each has to copy (at most
        ``max_rows`` messages), in one step: the buckets that held any, with their claim.

        On one server every bucket goes in one call, and with ``gap`` (seconds) it is
        skipped (None) when any flusher swept less than ``gap`` ago; on a cluster, one call
        per bucket (each a slot of its own), never skipped. The second value is when the
        sweep before this one was (ms; -1: unknown). Retried through a failover: a replay
        after a lost reply finds the first attempt's sessions claimed (not due), which
        holds them back one lease at most.
        """
        now = now_ms()
        until = now + ms(lease)
        head = [
            *self._sessions.common("", now)[1:4],
            now - ms(hold),
            ms(lease),
            limit,
            max_rows,
            ms(gap),
        ]
        cluster = self._redis.is_cluster
        groups = [[b] for b in buckets] if cluster else [list(buckets)]
        found: list[tuple[Claim, list[Pending | None]]] = []
        last = -1
        for group in groups:
            keys = [k for b in group for k in self._bucket_keys(b)]
            if gap > 0 and not cluster:
                keys.append(self._keys.last_sweep)
            args = head + [p for b in group for p in self._keys.prefixes(b)]
            reply = await self._redis.call("flush read", self._read(keys, args), idempotent=True)
            last = int(reply[0])
            if len(reply) == 1 and group:
                return None, last  # another flusher swept less than a gap ago
            for bucket, entries in zip(group, reply[1:], strict=True):
                if entries:
                    read = [_pending(entry) for entry in entries]
                    claim = Claim(bucket, [sid for sid, _ in read], until)
                    found.append((claim, [item for _, item in read]))
        return found, last

    @staticmethod
    def _read(keys: list[str], args: list[Any]) -> Callable[[Client], Awaitable[Any]]:
        async def run(c: Client) -> Any:
            return await c.flush_read(keys=keys, args=args)

        return run

    def _bucket_keys(self, bucket: int) -> list[str]:
        """KEYS of one bucket in the flusher's scripts (see vel.stores.redis.wbscripts)."""
        return [*self._keys.bucket_keys(bucket), self._keys.conflicts(bucket)]

    async def renew_claim(self, claim: Claim, lease: float) -> bool:
        dirty = self._keys.bucket_keys(claim.bucket)[0]
        until = now_ms() + ms(lease)
        args: list[Any] = [claim.until_ms, until, *claim.session_ids]
        renewed = await self._redis.call(
            "renew claim", lambda c: c.renew_claims(keys=[dirty], args=args), idempotent=True
        )
        claim.until_ms = until
        return int(renewed) > 0

    async def try_sweep(self, bucket: int, interval: float) -> bool:
        key = self._keys.sweep(bucket)
        return bool(
            await self._redis.call("sweep", lambda c: c.redis.set(key, 1, nx=True, px=ms(interval)))
        )

    async def reschedule(self, bucket: int, session_ids: Sequence[str], delay: float) -> None:
        dirty = self._keys.bucket_keys(bucket)[0]
        due = now_ms() + ms(delay)
        mapping: dict[str, float] = {sid: due for sid in session_ids}
        await self._redis.call(
            "reschedule", lambda c: c.redis.zadd(dirty, mapping, xx=True), idempotent=True
        )

    async def pending(self, session_ids: Sequence[str], max_rows: int) -> list[Pending | None]:
        """What each session has to copy (None: gone, or in conflict), claiming nothing;
        one pipelined round trip."""
        now = now_ms()
        head = [*self._sessions.common("", now)[1:4], 0, 0, 0, max_rows, 0]
        by_bucket = self._by_bucket(session_ids)

        async def fill(c: Client, pipe: Any) -> None:
            for bucket, sids in by_bucket.items():
                args = [*head, *self._keys.prefixes(bucket), *sids]
                c.queue(pipe, c.flush_read, self._bucket_keys(bucket), args)

        replies = await self._redis.call(
            "pending", lambda c: self._redis.pipelined(c, fill), idempotent=True
        )
        read = dict(_pending(e) for reply in replies for e in reply[1])
        return [read[sid] for sid in session_ids]

    def _by_bucket(self, session_ids: Sequence[str]) -> dict[int, list[str]]:
        by_bucket: dict[int, list[str]] = {}
        for sid in dict.fromkeys(session_ids):
            by_bucket.setdefault(self._keys.bucket_of(sid), []).append(sid)
        return by_bucket

    async def ack(
        self, acks: Sequence[tuple[str, int, int] | tuple[str, int, int, int]]
    ) -> list[int]:
        """Acknowledge ``(session id, generation, flushed up to seq[, tier lease end ms])``,
        each session at most once; one code per ack (see ``ACK`` in
        :mod:`vel.stores.redis.wbscripts`). One call per bucket on a cluster (pipelined),
        one for all of them on one server."""
        if not acks:
            return []
        by_bucket: dict[int, list[Any]] = {}
        order: list[tuple[int, int]] = []
        for ack in acks:
            bucket = self._keys.bucket_of(ack[0])
            values = by_bucket.setdefault(bucket, [])
            order.append((bucket, len(values) // 4))
            values += (ack[0], ack[1], ack[2], ack[3] if len(ack) > 3 else 0)
        head = self._sessions.common("", now_ms())[1:4]
        groups = [[b] for b in by_bucket] if self._redis.is_cluster else [list(by_bucket)]
        calls = []
        for group in groups:
            keys = [k for b in group for k in self._bucket_keys(b)]
            args = list(head)
            for b in group:
                args += (*self._keys.prefixes(b), len(by_bucket[b]) // 4, *by_bucket[b])
            calls.append((keys, args))

        async def fill(c: Client, pipe: Any) -> None:
            for keys, args in calls:
                c.queue(pipe, c.flush_ack, keys, args)

        async def run(c: Client) -> list[Any]:
            if len(calls) == 1:
                keys, args = calls[0]
                return [await c.flush_ack(keys=keys, args=args)]
            return await self._redis.pipelined(c, fill)

        replies = await self._redis.call("ack", run, idempotent=True)
        codes = {
            b: [int(x) for x in codes]
            for group, reply in zip(groups, replies, strict=True)
            for b, codes in zip(group, reply, strict=True)
        }
        return [codes[b][i] for b, i in order]

    async def conflict(self, session_id: str, gen: int, rev: int | None, reason: str) -> bool:
        """Set aside a session whose flush of ``(gen, rev)`` Postgres could not apply,
        unless the copy moved on since; True when it is now in conflict."""
        keys = self._keys.session(session_id)
        args = [*self._sessions.common(session_id), gen, -1 if rev is None else rev, reason]
        reply = await self._redis.call(
            "conflict", lambda c: c.conflict(keys=keys.layout, args=args)
        )
        return bool(int(reply))

    async def resolved(self, session_id: str, seq: int, gen: int) -> bool:
        """Drop a resolved session's copy if it is still at ``(seq, gen)``; True if dropped
        (False: it took writes meanwhile and must be resolved again)."""
        keys = self._keys.session(session_id)
        args = [*self._sessions.common(session_id), seq, gen]
        reply = await self._redis.call(
            "resolved", lambda c: c.resolved(keys=keys.layout, args=args)
        )
        return bool(int(reply))

    async def conflicts(self, limit: int = 1000) -> list[Conflict]:
        """Sessions in conflict, oldest first (at most ``limit``)."""

        async def run(c: Client) -> list[tuple[str, float, list[Any]]]:
            found: list[tuple[str, float, list[Any]]] = []
            for b in range(self._keys.buckets):
                members: list[Any] = await c.redis.zrange(
                    self._keys.conflicts(b), 0, limit - 1, withscores=True
                )
                for raw, score in members:
                    sid = raw.decode()
                    fields: list[Any] = await c.redis.hmget(
                        self._keys.session(sid).meta,
                        "conflict",
                        "seq",
                        "flushed",
                        "base",
                        "gen",
                        "fgen",
                    )
                    found.append((sid, score, fields))
            return found

        result = [
            Conflict(
                session_id=sid,
                reason=(fields[0] or b"?").decode(),
                since_ms=int(score),
                seq=int(fields[1] or 0),
                flushed=int(fields[2] or 0),
                base=int(fields[3] or 0),
                gen=int(fields[4] or 0),
                fgen=int(fields[5] or 0),
            )
            for sid, score, fields in await self._redis.call("conflicts", run)
        ]
        result.sort(key=lambda c: c.since_ms)
        return result[:limit]

    async def conflict_count(self) -> int:
        async def run(c: Client) -> list[Any]:
            pipe = c.redis.pipeline(transaction=False)
            for b in range(self._keys.buckets):
                pipe.zcard(self._keys.conflicts(b))
            return list(await pipe.execute())

        return sum(int(n) for n in await self._redis.call("conflicts", run))

    async def backlog(self) -> tuple[int, float, int]:
        async def run(c: Client) -> list[Any]:
            pipe = c.redis.pipeline(transaction=False)
            for b in range(self._keys.buckets):
                dirty, since, backlog = self._keys.bucket_keys(b)
                pipe.get(backlog)
                pipe.zrange(since, 0, 0, withscores=True)
                pipe.zcard(dirty)
            return list(await pipe.execute())

        replies = await self._redis.call("backlog", run, idempotent=True)
        total, oldest, sessions = 0, None, 0
        for i in range(0, len(replies), 3):
            total += int(replies[i] or 0)
            if replies[i + 1]:
                first = float(replies[i + 1][0][1])
                oldest = first if oldest is None else min(oldest, first)
            sessions += int(replies[i + 2])
        age = 0.0 if oldest is None else max(0.0, (now_ms() - oldest) / 1000)
        return total, age, sessions

    async def drop_clean(self, session_ids: Sequence[str]) -> list[int]:
        """Per session: 1 its copy was dropped, 0 it had none, -1 it was kept (dirty or in
        conflict)."""

        async def fill(c: Client, pipe: Any) -> None:
            for sid in session_ids:
                keys = self._keys.session(sid)
                c.queue(pipe, c.drop_clean, [*keys.data, keys.dirty, keys.conflicts], [sid])

        if not session_ids:
            return []
        replies = await self._redis.call(
            "drop clean", lambda c: self._redis.pipelined(c, fill), idempotent=True
        )
        return [int(r) for r in replies]


def _pending(entry: list[Any]) -> tuple[str, Pending | None]:
    """One session of READ's reply (see :mod:`vel.stores.redis.wbscripts`)."""
    sid = entry[0].decode()
    if len(entry) == 2:
        return sid, None  # gone, or in conflict
    gen, fgen, flushed, seq, rev, updated, pgrows, tgen, tseq = map(int, entry[1:PENDING_HEADER])
    return sid, Pending(
        sid,
        gen,
        fgen,
        flushed,
        seq,
        [(flushed + i, *split(item)) for i, item in enumerate(entry[PENDING_HEADER:], start=1)],
        rev=None if rev < 0 else rev,
        updated_ms=updated or None,
        had_postgres_rows=bool(pgrows),
        truncate=(tgen, tseq) if tgen >= 0 else None,
    )
