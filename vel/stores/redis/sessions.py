"""Session data in Redis: window reads, appends, pops, replaces and the warm's seed.

Each write is one Lua script (:mod:`vel.stores.redis.scripts`) touching one hash slot, so an
append assigns its seqs, stores its messages and, in write-behind mode, marks the session dirty
and removes its TTL in one atomic step (DESIGN.md 3.1 atomic appends, 3.2 dirty data never
expires). The seed installs a Postgres snapshot only if the session is still absent and the
warm lease is still held (3.4). Messages are stored as ``"<message id>\\n<json>"`` items.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from vel import failpoints
from vel.bounds import limit_arg
from vel.errors import (
    BackpressureError,
    StoreError,
    StoreTimeoutError,
    StoreUnavailableError,
)
from vel.messages import (
    Message,
    check_message_ids,
    decode_message,
    encode_messages,
    validate_session_id,
)
from vel.stores.redis.client import Connector, ms, now_ms
from vel.stores.redis.keys import KeyLayout
from vel.stores.redis.scripts import BACKPRESSURE, DAMAGED, MISS, REPLAY


def encode(messages: Sequence[Message], message_ids: Sequence[str] | None) -> list[str]:
    """Messages as stored items, ``"<message id>\\n<json>"`` (ids generated if None)."""
    texts = encode_messages(messages)
    ids = check_message_ids(message_ids, len(texts))
    return [f"{mid}\n{text}" for mid, text in zip(ids, texts, strict=True)]


class Sessions:
    """Reads and writes of session data; the settings are the RedisStore's (documented
    there), ``counters`` its counters dict (shared, updated in place)."""

    def __init__(
        self,
        redis: Connector,
        keys: KeyLayout,
        counters: dict[str, float],
        *,
        write_behind: bool,
        hot_ttl: float,
        max_unflushed: int,
        backpressure_wait: float,
        flush_delay: float,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._counters = counters
        self.write_behind = write_behind
        self.hot_ttl = hot_ttl
        self._max_unflushed = max_unflushed
        self._backpressure_wait = backpressure_wait
        self._flush_delay = flush_delay

    # -- reads -----------------------------------------------------------------------------

    async def read(self, session_id: str, limit: int | None = None) -> list[Message] | None:
        keys = self._keys.session(validate_session_id(session_id))
        limit = limit_arg(limit)
        args = [
            -1 if limit is None else limit,
            ms(self.hot_ttl),
            "1" if self.write_behind else "0",
        ]
        reply: list[Any] = await self._redis.call(
            "load", lambda c: c.load(keys=list(keys.data), args=args), idempotent=True
        )
        return self.window(session_id, reply)

    def window(self, session_id: str, reply: list[Any]) -> list[Message] | None:
        """Decode a LOAD / LOCK_LOAD reply: the messages, or None on a miss.

        Raises:
            StoreError: the session's Redis copy is damaged (part evicted while unflushed).
        """
        head = int(reply[0])
        if head == MISS:
            return None
        if head == DAMAGED:
            self._counters["damaged_reads"] += 1
            raise StoreError(
                f"session {session_id!r} lost part of its data in Redis while unflushed; "
                "check maxmemory-policy (never allkeys-*) with `vel doctor`"
            )
        # json.loads takes the bytes after the id as they are: no split, no decode to str.
        return [decode_message(item[item.index(b"\n") + 1 :]) for item in reply[1:]]

    async def exists(self, session_id: str) -> bool:
        keys = self._keys.session(session_id)
        return bool(
            await self._redis.call("exists", lambda c: c.redis.exists(keys.meta), idempotent=True)
        )

    async def last_seq(self, session_id: str) -> int:
        keys = self._keys.session(validate_session_id(session_id))
        raw = await self._redis.call(
            "hget", lambda c: c.redis.hget(keys.meta, "seq"), idempotent=True
        )
        return int(raw or 0)

    # -- writes ----------------------------------------------------------------------------

    async def try_append(
        self, session_id: str, items: Sequence[str], first_id: str, unlock: str = ""
    ) -> tuple[int, int]:
        keys = self._keys.session(session_id)
        per_bucket = max(1, -(-self._max_unflushed // self._keys.buckets))
        args: list[Any] = [
            now_ms(),
            "wb" if self.write_behind else "ro",
            ms(self.hot_ttl),
            ms(self._flush_delay),
            per_bucket,
            session_id,
            first_id,
            unlock,
            *items,
        ]
        names = [*keys.data, keys.dirty, keys.dirty_since, keys.backlog]
        if unlock:
            names.append(keys.turn_lock)
        # Idempotent: the first message id makes a replayed append return the original seq.
        reply = await self._redis.call(
            "append", lambda c: c.append(keys=names, args=args), idempotent=True
        )
        head = int(reply[0])
        if head >= 0:
            self._counters["appends"] += 1
            await failpoints.hit("after_append_script")
            return 0, head
        return head, int(reply[1]) if len(reply) > 1 else 0

    async def append_items(
        self,
        session_id: str,
        items: Sequence[str],
        first_id: str,
        on_miss: Callable[[], Awaitable[None]] | None = None,
        unlock: str = "",
    ) -> int:
        deadline = time.monotonic() + self._backpressure_wait
        delay = 0.01
        for attempt in range(1000):
            try:
                code, value = await self.try_append(session_id, items, first_id, unlock)
            except StoreUnavailableError as exc:
                # Safe to retry: the first message id makes a replayed append a no-op. A
                # timeout is not retried, so a frozen Redis costs one op_timeout, not three.
                if attempt >= 2 or isinstance(exc, StoreTimeoutError):
                    raise
                await asyncio.sleep(0.05 * (attempt + 1))
                continue
            if code == 0:
                return value
            if code == REPLAY:
                self._counters["duplicates_suppressed"] += 1
                return value
            if code == MISS:
                if on_miss is None:
                    raise StoreError("append found no session and has no way to create it")
                await on_miss()
                continue
            if code == BACKPRESSURE:
                if time.monotonic() >= deadline:
                    self._counters["backpressure_rejections"] += 1
                    raise BackpressureError(
                        f"{value} messages are waiting for Postgres in this bucket "
                        f"(bound {self._max_unflushed} in all); retry later"
                    )
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 0.5)
                continue
            if code == DAMAGED:
                self._counters["damaged_reads"] += 1
                raise StoreError(
                    f"session {session_id!r} lost part of its data in Redis while unflushed; "
                    "check maxmemory-policy (never allkeys-*) with `vel doctor`"
                )
            raise StoreError(f"unexpected append reply {code}")
        raise StoreError("append did not settle after 1000 attempts")

    async def try_replace(self, session_id: str, items: Sequence[str]) -> int:
        keys = self._keys.session(session_id)
        args: list[Any] = [
            now_ms(),
            "wb" if self.write_behind else "ro",
            ms(self.hot_ttl),
            session_id,
            *items,
        ]
        reply = await self._redis.call(
            "replace",
            lambda c: c.replace(
                keys=[*keys.data, keys.dirty, keys.dirty_since, keys.backlog], args=args
            ),
        )
        return int(reply[0])

    async def try_pop(self, session_id: str) -> tuple[int, Message | None]:
        """Run the pop script once: (0, message or None) or (MISS | DAMAGED, None)."""
        keys = self._keys.session(session_id)
        args: list[Any] = [
            now_ms(),
            "wb" if self.write_behind else "ro",
            ms(self.hot_ttl),
            ms(self._flush_delay),
            session_id,
        ]
        names = [*keys.data, keys.dirty, keys.dirty_since, keys.backlog]
        reply = await self._redis.call("pop", lambda c: c.pop(keys=names, args=args))
        head = int(reply[0])
        if head == 1:
            item: bytes = reply[1]
            return 0, decode_message(item[item.index(b"\n") + 1 :])
        if head == DAMAGED:
            self._counters["damaged_reads"] += 1
            raise StoreError(
                f"session {session_id!r} lost part of its data in Redis while unflushed; "
                "check maxmemory-policy (never allkeys-*) with `vel doctor`"
            )
        return head, None

    async def seed(
        self,
        session_id: str,
        token: str,
        gen: int,
        last_seq: int,
        rows: Sequence[tuple[int, str, str]],
        created_ms: int,
        updated_ms: int,
    ) -> int:
        keys = self._keys.session(session_id)
        args: list[Any] = [token, ms(self.hot_ttl), gen, last_seq, created_ms, updated_ms]
        args += [f"{mid}\n{text}" for _, mid, text in rows]
        # Idempotent: a replayed seed finds the session present (0).
        reply = await self._redis.call(
            "seed",
            lambda c: c.seed(keys=[*keys.data, keys.warm_lock], args=args),
            idempotent=True,
        )
        return int(reply)
