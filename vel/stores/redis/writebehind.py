"""The source side of write-behind: what a flusher claims, reads and acknowledges in Redis.

Dirty sessions sit in their bucket's due-time ZSET. A flusher claims due ones with a lease (a
visibility timeout: the claim pushes their due time past the lease), reads what each still has
to copy (:class:`Pending`), writes it to Postgres, then acknowledges: ``flushed`` only ever
rises, and a session gets its TTL back only once clean (DESIGN.md 3.2 and 3.3).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vel.stores.redis.client import Client, Connector, ms, now_ms
from vel.stores.redis.keys import KeyLayout
from vel.stores.redis.scripts import MISS


@dataclass(frozen=True, slots=True)
class Pending:
    """What a flusher has to copy for one session.

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
    truncate: tuple[int, int] | None = None


@dataclass(slots=True)
class Claim:
    """A flusher's claim on due sessions of one bucket, held until ``until_ms``."""

    bucket: int
    session_ids: list[str]
    until_ms: int


def _split(item: bytes) -> tuple[str, str]:
    mid, _, text = item.partition(b"\n")
    return mid.decode(), text.decode()


class WriteBehind:
    """Claims, pending reads, acknowledgements and the backlog; ``hot_ttl`` is the TTL a
    session gets back once clean."""

    def __init__(self, redis: Connector, keys: KeyLayout, *, hot_ttl: float) -> None:
        self._redis = redis
        self._keys = keys
        self._hot_ttl = hot_ttl

    async def claim(self, bucket: int, lease: float, limit: int) -> Claim:
        dirty = self._keys.bucket_keys(bucket)[0]
        now = now_ms()
        # Retried through a failover: a replay after a lost reply finds the first attempt's
        # sessions claimed (not due), which holds them back one lease at most.
        reply = await self._redis.call(
            "claim",
            lambda c: c.claim(keys=[dirty], args=[now, ms(lease), limit]),
            idempotent=True,
        )
        return Claim(bucket, [sid.decode() for sid in reply], now + ms(lease))

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
        async def fill(c: Client, pipe: Any) -> None:
            for sid in session_ids:
                keys = self._keys.session(sid)
                await c.queue(pipe, c.pending, [keys.meta, keys.messages], [max_rows])

        replies = await self._redis.call(
            "pending", lambda c: self._redis.pipelined(c, fill), idempotent=True
        )
        result: list[Pending | None] = []
        for sid, reply in zip(session_ids, replies, strict=True):
            if int(reply[0]) == MISS and len(reply) == 1:
                result.append(None)
                continue
            gen, fgen, flushed, seq, tgen, tseq = (int(x) for x in reply[:6])
            rows = []
            for offset, item in enumerate(reply[6:], start=1):
                mid, text = _split(item)
                rows.append((flushed + offset, mid, text))
            truncate = (tgen, tseq) if tgen >= 0 else None
            result.append(Pending(sid, gen, fgen, flushed, seq, rows, truncate))
        return result

    async def ack(self, acks: Sequence[tuple[str, int, int]]) -> list[int]:
        now = now_ms()

        async def fill(c: Client, pipe: Any) -> None:
            for sid, gen, upto in acks:
                keys = self._keys.session(sid)
                await c.queue(
                    pipe,
                    c.ack,
                    [*keys.data, keys.dirty, keys.dirty_since, keys.backlog],
                    [sid, gen, upto, now, ms(self._hot_ttl)],
                )

        replies = await self._redis.call(
            "ack", lambda c: self._redis.pipelined(c, fill), idempotent=True
        )
        return [int(r) for r in replies]

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

    async def drop_clean(self, session_ids: Sequence[str]) -> int:
        async def fill(c: Client, pipe: Any) -> None:
            for sid in session_ids:
                keys = self._keys.session(sid)
                await c.queue(pipe, c.drop_clean, [*keys.data, keys.dirty], [sid])

        if not session_ids:
            return 0
        replies = await self._redis.call(
            "drop clean", lambda c: self._redis.pipelined(c, fill), idempotent=True
        )
        return sum(int(r) for r in replies)
