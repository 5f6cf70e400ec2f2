"""Session data in Redis: window reads, appends, pops, replaces, and the warm's seed and
extension.

Each write is one Lua script (:mod:`vel.stores.redis.scripts`) touching one hash slot, so an
append assigns its seqs, stores its messages and, in write-behind mode, marks the session dirty
and removes its TTL in one atomic step (DESIGN.md 3.1 atomic appends, 3.2 dirty data never
expires). The seed installs a Postgres window only if the session is still absent and the
warm lease is still held (3.4); a copy may hold only its newest messages (3.10), and
:meth:`Sessions.extend` prepends older ones only onto the copy they were read for. A long
history is pushed in chunks under a staging key, then swapped in by one script, so readers
see the old history or the new one whole. How a message is stored, and the shapes a read
returns, are in :mod:`vel.stores.redis.items`.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
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
    decode_items,
    decode_message,
    validate_session_id,
)
from vel.stores.redis.client import Client, Connector, ms, now_ms
from vel.stores.redis.items import Copy, Window, split
from vel.stores.redis.keys import KeyLayout, SessionKeys
from vel.stores.redis.scripts import BACKPRESSURE, DAMAGED, MISS, REPLAY
from vel.stores.redis.windowread import read_window

# Histories longer than this are pushed to a staging key in chunks before the swap.
STAGE_ITEMS = 1000
# One staging round trip carries at most this many bytes of items.
STAGE_BYTES = 4 * 1024 * 1024
# A staging key left by a writer that died expires on its own.
STAGE_TTL = 600.0


def _chunks(items: Sequence[str]) -> list[list[str]]:
    groups: list[list[str]] = []
    size = 0
    for item in items:
        if not groups or len(groups[-1]) >= STAGE_ITEMS or size + len(item) > STAGE_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += len(item)
    return groups


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
        retention_ttl: float | None,
        lease_margin: float,
        max_unflushed: int,
        backpressure_wait: float,
        flush_delay: float,
        lock_lease: float,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._counters = counters
        self.write_behind = write_behind
        self.hot_ttl = hot_ttl
        self.retention_ttl = retention_ttl
        self.lease_margin = lease_margin
        self._max_unflushed = max_unflushed
        self._backpressure_wait = backpressure_wait
        self._flush_delay = flush_delay
        self.lock_lease = lock_lease
        self._settings_args: tuple[int, str, int] | None = None
        self._append_args: tuple[int, int, int] | None = None

    def common(self, session_id: str, now: int | None = None) -> list[Any]:
        """ARGV 1..5 of the session scripts."""
        if self._settings_args is None:
            # Set once (the settings never change after construction), not per call.
            self._settings_args = (
                ms(self.hot_ttl),
                "1" if self.write_behind else "0",
                ms(self.retention_ttl),
            )
        return [session_id, now_ms() if now is None else now, *self._settings_args]

    # -- reads -----------------------------------------------------------------------------

    async def read(self, session_id: str, limit: int | None = None) -> Window | None:
        """The window, or None when the copy is absent or unusable (a miss)."""
        keys = self._keys.session(validate_session_id(session_id))
        limit = limit_arg(limit)
        args = [*self.common(session_id), -1 if limit is None else limit, 0]
        reply = await self._redis.call(
            "load",
            lambda c: read_window(c.head, c.load, keys.layout, args, args[5]),
            idempotent=True,
        )
        return self.window(session_id, reply)

    def window(self, session_id: str, reply: list[Any]) -> Window | None:
        """Decode a LOAD / LOCK_LOAD reply: the window, or None on a miss.

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
        rev = int(reply[3])
        # The bytes after each id are decoded as they are: no split, no decode to str.
        return Window(
            seq=head,
            base=int(reply[1]),
            gen=int(reply[2]),
            rev=None if rev < 0 else rev,
            messages=decode_items(reply[4:]),
        )

    async def read_copy(self, session_id: str) -> Copy | None:
        """The whole copy (meta and every message it holds), read in one script."""
        keys = self._keys.session(validate_session_id(session_id))
        reply: list[Any] = await self._redis.call(
            "read copy", lambda c: c.copy(keys=[keys.meta, keys.messages], args=[])
        )
        if not reply:
            return None
        n = int(reply[0])
        pairs, items = reply[1 : 1 + n], reply[1 + n :]
        fields = {pairs[i].decode(): pairs[i + 1].decode() for i in range(0, n, 2)}
        return Copy(
            seq=int(fields.get("seq", 0)),
            flushed=int(fields.get("flushed", 0)),
            base=int(fields.get("base", 0)),
            gen=int(fields.get("gen", 0)),
            fgen=int(fields.get("fgen", 0)),
            conflict=fields.get("conflict"),
            items=[split(item) for item in items],
        )

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
        if self._append_args is None:
            per_bucket = max(1, -(-self._max_unflushed // self._keys.buckets))
            self._append_args = (ms(self.lease_margin), ms(self._flush_delay), per_bucket)
        args: list[Any] = [
            *self.common(session_id),
            *self._append_args,
            first_id,
            unlock,
            ms(self.lock_lease),
            *items,
        ]
        names = keys.layout
        if unlock:
            names += (keys.turn_lock, keys.wake)
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

    async def _stage(self, key: str, items: Sequence[str]) -> None:
        """Push ``items`` to ``key`` in chunks (each round trip bounded in bytes)."""
        await self._redis.call("stage", lambda c: c.redis.delete(key))
        for group in _chunks(items):

            async def push(c: Client, group: list[str] = group) -> Any:
                pipe = c.redis.pipeline(transaction=False)
                pipe.rpush(key, *group)
                pipe.pexpire(key, ms(STAGE_TTL))
                return await pipe.execute()

            await self._redis.call("stage", push)

    async def try_replace(self, session_id: str, items: Sequence[str]) -> int:
        """Replace the history (no items: clear). Returns the new generation, MISS or
        UNSTAGED."""
        keys = self._keys.session(session_id)
        names = keys.layout
        staged = len(items) > STAGE_ITEMS
        if staged:
            staging = keys.staging(uuid.uuid4().hex)
            names.append(staging)
            await self._stage(staging, items)
        args: list[Any] = [
            *self.common(session_id),
            ms(self.lease_margin),
            len(items),
            "1" if staged else "0",
            *([] if staged else items),
        ]
        try:
            reply = await self._redis.call("replace", lambda c: c.replace(keys=names, args=args))
        finally:
            if staged:
                # Gone already when the swap consumed it; otherwise no longer needed. It
                # expires by itself, so a failure here must not replace the exception in
                # flight (a cancellation above all).
                with contextlib.suppress(StoreError):
                    await self._redis.call("unstage", lambda c: c.redis.delete(names[-1]))
        return int(reply[0])

    async def try_pop(self, session_id: str) -> tuple[int, Message | None]:
        """Run the pop script once: (0, message or None) or (MISS | OLDER, None)."""
        keys = self._keys.session(session_id)
        args: list[Any] = [
            *self.common(session_id),
            ms(self._flush_delay),
            ms(self.lease_margin),
        ]
        reply = await self._redis.call("pop", lambda c: c.pop(keys=keys.layout, args=args))
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
        *,
        gen: int,
        rev: int,
        last_seq: int,
        rows: Sequence[tuple[int, str, str]],
        created_ms: int,
        updated_ms: int,
        expires_ms: int | None,
        lease_until_ms: int,
    ) -> int:
        keys = self._keys.session(session_id)
        args: list[Any] = [
            *self.common(session_id),
            token,
            gen,
            rev,
            last_seq,
            created_ms,
            updated_ms,
            expires_ms or 0,
            lease_until_ms,
        ]
        args += [f"{mid}\n{text}" for _, mid, text in rows]
        # Idempotent: a replayed seed finds the session present (0).
        reply = await self._redis.call(
            "seed",
            lambda c: c.seed(keys=[*keys.layout, keys.warm_lock], args=args),
            idempotent=True,
        )
        return int(reply)

    async def extend(
        self,
        session_id: str,
        gen: int,
        rev: int | None,
        base: int,
        rows: Sequence[tuple[int, str, str]],
    ) -> int:
        """Prepend ``rows`` (seqs ``base - len(rows) + 1 .. base``) to the copy read at
        ``(gen, rev, base)``; returns its new base, or -1 if the copy changed meanwhile."""
        keys: SessionKeys = self._keys.session(session_id)
        args: list[Any] = [gen, -1 if rev is None else rev, base]
        args += [f"{mid}\n{text}" for _, mid, text in rows]
        reply = await self._redis.call(
            "extend", lambda c: c.extend(keys=list(keys.data), args=args), idempotent=True
        )
        return int(reply)
