"""A prototype of the minimal locked Redis turn (issue 14, phase 2), measured, not shipped.

The turn the Agent needs, in two round trips and six Redis commands when the session is hot
and its lock free:

1. ``SET lock token NX PX lease`` and ``LRANGE messages -limit -1``, pipelined (the window is
   used only if the lock was taken);
2. one script: ``GETDEL lock`` (ours: the lock is released, and this commit is the first of
   its token, so no replay check is needed), ``RPUSH`` (the new length is the last seq),
   ``ZADD dirty NX`` (the write-behind mark).

Only the uncommon paths cost more: a lock that is no longer ours is put back and the tail of
the list is searched for the commit's first id (a retried commit is a replay); an empty window
would ask whether the session is in Redis at all. What it leaves out, to be priced in phase 2:
Postgres warming on a miss, the backlog bound, TTLs, the ``seq``/``updated`` fields and a
flusher (the ``redis-lock`` mode's embedded flusher is measured in docs/benchmarks.md).

Client side: key strings built once per session, ids from a per-process random prefix and a
counter (no ``uuid4``), one deadline per round trip, a non-blocking pool gated by a semaphore
(the connection budget of vel's ``BlockingConnectionPool`` without its condition variable),
and a fast JSON codec (orjson if installed, else the stdlib).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import redis.asyncio as aioredis

from vel.messages import Message
from vel.stores.redis.keys import KeyLayout

try:
    import orjson

    def _dumps(message: Message) -> bytes:
        return orjson.dumps(message)

    _loads: Callable[[bytes], Any] = orjson.loads
except ImportError:  # the bench extra brings orjson

    def _dumps(message: Message) -> bytes:
        return json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode()

    _loads = json.loads

# KEYS: lock, messages, dirty. ARGV: 1 token, 2 due ms, 3 session id, 4 lease ms, 5.. items.
# Returns the last seq, or {-2, seq of the first id} for a replayed commit.
COMMIT = """
local v = redis.call('GETDEL', KEYS[1])
if v ~= ARGV[1] then
  if v then redis.call('SET', KEYS[1], v, 'PX', ARGV[4]) end
  local id = ARGV[5]:sub(1, ARGV[5]:find('\\n', 1, true))
  local n = redis.call('LLEN', KEYS[2])
  local tail = redis.call('LRANGE', KEYS[2], -64, -1)
  for i, item in ipairs(tail) do
    if item:sub(1, #id) == id then return {-2, n - #tail + i} end
  end
end
local seq = redis.call('RPUSH', KEYS[2], unpack(ARGV, 5))
redis.call('ZADD', KEYS[3], 'NX', ARGV[2], ARGV[3])
return seq
"""


def decode_window(items: list[bytes]) -> list[Message]:
    """The messages of stored ``<id>\\n<json>`` items."""
    return [_loads(item[item.index(b"\n") + 1 :]) for item in items]


class ProtoRedisDriver:
    """The prototype turn, as a bench driver (locked turns only)."""

    def __init__(self, url: str, prefix: str, pool_max: int, lease: float = 10.0) -> None:
        self.redis = aioredis.Redis(
            connection_pool=aioredis.ConnectionPool.from_url(url, max_connections=pool_max)
        )
        self.gate = asyncio.Semaphore(pool_max)
        self.layout = KeyLayout(prefix)
        self.keys: dict[str, tuple[str, str, str]] = {}
        self.lease_ms = int(lease * 1000)
        self.timeout = 5.0
        self.flush_delay_ms = 50
        self.commit = self.redis.register_script(COMMIT)
        self._ids = itertools.count()
        self._prefix = os.urandom(6).hex()

    def _keys_of(self, session_id: str) -> tuple[str, str, str]:
        keys = self.keys.get(session_id)
        if keys is None:
            k = self.layout.session(session_id)
            keys = self.keys[session_id] = (k.turn_lock, k.messages, k.dirty)
        return keys

    def _id(self) -> str:
        return f"{self._prefix}{next(self._ids):x}"

    async def open(self) -> None:
        # Loaded before the clock starts, so the first commit needs no NOSCRIPT round trip.
        await self.redis.script_load(COMMIT)

    async def turn(self, session_id: str, messages: Sequence[Message], limit: int) -> int:
        raise NotImplementedError("the prototype runs locked turns only")

    async def locked_turn(self, session_id: str, messages: Sequence[Message], limit: int) -> str:
        lock, msgs, dirty = self._keys_of(session_id)
        token = self._id()
        delay = 0.002
        while True:
            async with self.gate, asyncio.timeout(self.timeout):
                pipe = self.redis.pipeline(transaction=False)
                pipe.set(lock, token, nx=True, px=self.lease_ms)
                pipe.lrange(msgs, -limit, -1)
                got, items = await pipe.execute()
            if got:
                break
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.2)
        window = decode_window(items)
        encoded = self.encode_items(messages)
        due = int(time.time() * 1000) + self.flush_delay_ms
        async with self.gate, asyncio.timeout(self.timeout):
            await self.commit(
                keys=[lock, msgs, dirty], args=[token, due, session_id, self.lease_ms, *encoded]
            )
        return str(window[-1]["content"]) if window else ""

    def encode_items(self, messages: Sequence[Message]) -> list[bytes]:
        """``<id>\\n<json>`` per message, as vel stores them."""
        return [f"{self._id()}\n".encode() + _dumps(m) for m in messages]

    async def history(self, session_id: str) -> list[Message]:
        items = cast(list[bytes], await self.redis.lrange(self._keys_of(session_id)[1], 0, -1))
        return decode_window(items)

    async def aclose(self) -> None:
        await self.redis.aclose()
