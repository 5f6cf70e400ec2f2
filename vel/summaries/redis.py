"""Summaries in the Redis hot tier (``session_storage='redis'``), written through to Postgres.

The summary is a hash beside the session's keys, under the same hash tag, so one script
checks it against the session's copy: its generation (moved on by every clear, replace and
pop) and, when the copy holds it, the id of the message it says it covers. Its TTL follows
the session's, renewed as the session is read, so it lives and goes with the window.

Durability: after the Redis compare-and-set accepts a summary, the same task writes it to
Postgres (``vel_summaries``) before it ends. That is write-*through* from a task that is
already behind the turn, rather than the messages' dirty set: a summary is derived data, one
per K messages, and losing the newest one costs one model call, never a message; so no turn
pays for it and the flusher's scripts stay as they are. A session warmed from Postgres gets
its summary read from Postgres on first use (checked against Postgres' messages) and seeded
into Redis: warmed with the window.
"""

from __future__ import annotations

import time
import weakref
from typing import Any

from vel.errors import VelError
from vel.logs import get_logger
from vel.messages import decode_message
from vel.stores.redis import RedisStore
from vel.stores.redis.client import Client, ms
from vel.summaries.base import Entry, History, Summary
from vel.summaries.postgres import PostgresSummaries

log = get_logger("vel.summaries")

# Shared: KEYS[1] meta, KEYS[2] messages, KEYS[3] summary. ok(s) tells whether summary
# fields s (text, covered, cid, gen) still match the copy; nil: the copy is absent.
_CHECK = """
local function matches(covered, cid, gen)
  local m = redis.call('HMGET', KEYS[1], 'seq', 'base', 'gen')
  if not m[1] then return nil end
  if tostring(m[3] or '0') ~= gen or covered > tonumber(m[1]) then return false end
  local base = tonumber(m[2] or '0')
  if covered > base then
    local item = redis.call('LINDEX', KEYS[2], covered - base - 1)
    if not item or string.sub(item, 1, #cid + 1) ~= cid .. '\\n' then return false end
  end
  return true
end
-- The session's TTL; a dirty session has none, and then the hot TTL (hot ms, 0: none) keeps
-- a summary that nobody reads from staying forever (Postgres holds it, or the session
-- itself ends).
local function follow_ttl(hot)
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl <= 0 then ttl = hot end
  if ttl > 0 then redis.call('PEXPIRE', KEYS[3], ttl) else redis.call('PERSIST', KEYS[3]) end
end
"""

# ARGV 1: hot TTL ms. Returns {2, text, covered, cid, updated}, {1} (not in Redis: ask
# Postgres) or {0}.
_GET = (
    _CHECK
    + """
local s = redis.call('HMGET', KEYS[3], 'text', 'covered', 'cid', 'gen', 'updated')
if not s[1] then return {1} end
local ok = matches(tonumber(s[2]), s[3], s[4])
if ok == nil then return {1} end
if not ok then
  redis.call('DEL', KEYS[3])
  return {0}
end
follow_ttl(tonumber(ARGV[1]))
return {2, s[1], s[2], s[3], s[5]}
"""
)

# ARGV 1: after, 2: limit. Returns {seq, base, gen, items...} (items: seqs after+1 .., at most
# limit, those the copy holds) or {-1} (no copy).
_HISTORY = """
local m = redis.call('HMGET', KEYS[1], 'seq', 'base', 'gen')
if not m[1] then return {-1} end
local base = tonumber(m[2] or '0')
local from = math.max(tonumber(ARGV[1]) - base, 0)
local items = redis.call('LRANGE', KEYS[2], from, from + tonumber(ARGV[2]) - 1)
table.insert(items, 1, tonumber(m[3] or '0'))
table.insert(items, 1, base)
table.insert(items, 1, tonumber(m[1]))
return items
"""

# ARGV 1 text, 2 covered, 3 cid, 4 gen the history was read at, 5 updated, 6 previous
# covered (0: none), 7 '1' to seed (a summary read from Postgres: only if none is there),
# 8 hot TTL ms.
# Returns 1 when stored.
_PUT = (
    _CHECK
    + """
local covered = tonumber(ARGV[2])
if matches(covered, ARGV[3], ARGV[4]) ~= true then return 0 end
local s = redis.call('HMGET', KEYS[3], 'covered', 'cid', 'gen')
if s[1] and matches(tonumber(s[1]), s[2], s[3]) then
  if ARGV[7] == '1' or tonumber(s[1]) ~= tonumber(ARGV[6]) then return 0 end
end
redis.call('HSET', KEYS[3], 'text', ARGV[1], 'covered', covered, 'cid', ARGV[3],
  'gen', ARGV[4], 'updated', ARGV[5])
follow_ttl(tonumber(ARGV[8]))
return 1
"""
)

_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""


class _Scripts:
    def __init__(self, c: Client) -> None:
        self.get = c.redis.register_script(_GET)
        self.history = c.redis.register_script(_HISTORY)
        self.put = c.redis.register_script(_PUT)
        self.renew = c.redis.register_script(_RENEW)
        self.release = c.redis.register_script(_RELEASE)


class RedisSummaries:
    """Summaries of a Redis store's sessions; ``cold``: the Postgres tier, if any."""

    def __init__(self, hot: RedisStore, cold: PostgresSummaries | None) -> None:
        self.hot = hot
        self.cold = cold
        self._scripts: weakref.WeakKeyDictionary[Client, _Scripts] = weakref.WeakKeyDictionary()
        self._hot_ms = ms(hot.hot_ttl) if hot.hot_ttl else 0

    def _of(self, c: Client) -> _Scripts:
        scripts = self._scripts.get(c)
        if scripts is None:
            scripts = self._scripts[c] = _Scripts(c)
        return scripts

    def _keys(self, session_id: str) -> list[str]:
        session = self.hot.keys.session(session_id)
        summary, _ = self.hot.keys.summary(session_id)
        return [session.meta, session.messages, summary]

    async def get(self, session_id: str) -> Summary | None:
        keys = self._keys(session_id)
        reply: list[Any] = await self.hot.call(
            "summary read",
            lambda c: self._of(c).get(keys=keys, args=[self._hot_ms]),
            idempotent=True,
        )
        if int(reply[0]) == 2:
            if int(reply[2]) == 0:
                return None  # Postgres had none either (see below)
            return Summary(
                reply[1].decode(), int(reply[2]), reply[3].decode(), float(reply[4] or 0)
            )
        if int(reply[0]) == 0 or self.cold is None:
            return None
        # Not in Redis: the durable copy, checked against Postgres' messages, then seeded;
        # "none" is seeded too (covering seq 0), so a session without a summary costs
        # Postgres one read per warm, not one per turn.
        summary = await self.cold.get(session_id)
        seed = summary if summary is not None else Summary("", 0, "", time.time())
        await self._write(session_id, seed, None, gen=None, seed=True)
        return summary

    async def history(self, session_id: str, after: int, limit: int) -> History:
        keys = self._keys(session_id)[:2]
        reply: list[Any] = await self.hot.call(
            "summary history",
            lambda c: self._of(c).history(keys=keys, args=[after, limit]),
            idempotent=True,
        )
        if int(reply[0]) < 0:
            return History(0, [])  # not in Redis: the next turn warms it and tries again
        seq, base, gen = int(reply[0]), int(reply[1]), int(reply[2])
        entries: list[Entry] = []
        if after < base:
            # A windowed copy: Postgres holds what is older (the copy was loaded from it).
            if self.cold is None:
                return History(0, [])
            older = await self.cold.history(session_id, after, min(limit, base - after))
            entries.extend(older.entries)
            if not entries or entries[-1].seq != base:
                return History(seq, entries, gen)  # Postgres moved on: not contiguous
        for i, item in enumerate(reply[3:], start=max(after, base) + 1):
            mid, _, text = bytes(item).partition(b"\n")
            entries.append(Entry(i, mid.decode(), decode_message(text)))
        return History(seq, entries[:limit], gen)

    async def _write(
        self, session_id: str, summary: Summary, previous: Summary | None, *, gen: Any, seed: bool
    ) -> bool:
        keys = self._keys(session_id)
        if gen is None:
            meta = keys[0]
            raw = await self.hot.call(
                "summary read", lambda c: c.redis.hget(meta, "gen"), idempotent=True
            )
            gen = int(raw or 0)
        args = [
            summary.text,
            summary.covered_seq,
            summary.covered_id,
            gen,
            summary.updated_at,
            previous.covered_seq if previous is not None else 0,
            "1" if seed else "0",
            self._hot_ms,
        ]
        done = await self.hot.call(
            "summary write", lambda c: self._of(c).put(keys=keys, args=args), idempotent=True
        )
        return bool(done)

    async def put(
        self, session_id: str, summary: Summary, previous: Summary | None, basis: History
    ) -> bool:
        if not await self._write(session_id, summary, previous, gen=basis.stamp, seed=False):
            return False
        if self.cold is not None:
            try:
                await self.cold.put(session_id, summary, previous, basis)
            except VelError as exc:
                log.warning(
                    "summary of %r kept in Redis only: %s",
                    session_id,
                    exc,
                    extra={"session_id": session_id},
                )
        return True

    async def delete(self, session_id: str) -> None:
        summary, _ = self.hot.keys.summary(session_id)
        lags = self.hot.keys.summary_lags

        async def op(c: Client) -> None:
            pipe = c.redis.pipeline(transaction=False)
            pipe.delete(summary)
            pipe.zrem(lags, session_id)
            await pipe.execute()

        await self.hot.call("summary delete", op, idempotent=True)
        if self.cold is not None:
            await self.cold.delete(session_id)

    async def try_lease(self, session_id: str, token: str, seconds: float) -> bool:
        _, lease = self.hot.keys.summary(session_id)
        done = await self.hot.call(
            "summary lease", lambda c: c.redis.set(lease, token, nx=True, px=ms(seconds))
        )
        return bool(done)

    async def renew_lease(self, session_id: str, token: str, seconds: float) -> bool:
        _, lease = self.hot.keys.summary(session_id)
        done = await self.hot.call(
            "summary lease",
            lambda c: self._of(c).renew(keys=[lease], args=[token, ms(seconds)]),
            idempotent=True,
        )
        return bool(done)

    async def release_lease(self, session_id: str, token: str) -> None:
        _, lease = self.hot.keys.summary(session_id)
        await self.hot.call(
            "summary lease",
            lambda c: self._of(c).release(keys=[lease], args=[token]),
            idempotent=True,
        )

    async def note(self, session_id: str, lag: int, *, calls: int = 0, failures: int = 0) -> None:
        keys = self.hot.keys

        async def op(c: Client) -> None:
            pipe = c.redis.pipeline(transaction=False)
            if lag > 0:
                pipe.zadd(keys.summary_lags, {session_id: lag})
            else:
                pipe.zrem(keys.summary_lags, session_id)
            if calls:
                pipe.hincrby(keys.totals, "summary_calls", calls)
            if failures:
                pipe.hincrby(keys.totals, "summary_failures", failures)
            await pipe.execute()

        await self.hot.call("summary note", op)

    async def figures(self) -> dict[str, float]:
        return await summary_figures(self.hot)

    async def aclose(self) -> None:
        return None  # the store owns the connections


async def summary_figures(hot: RedisStore) -> dict[str, float]:
    """Summary figures shared in Redis by every process of the prefix (``vel stats``)."""
    keys = hot.keys

    async def op(c: Client) -> list[Any]:
        pipe = c.redis.pipeline(transaction=False)
        pipe.hmget(keys.totals, ["summary_calls", "summary_failures"])
        pipe.zcard(keys.summary_lags)
        pipe.zrevrange(keys.summary_lags, 0, 0, withscores=True)
        return list(await pipe.execute())

    (calls, failures), behind, top = await hot.call("summary figures", op, idempotent=True)
    return {
        "summary_calls": float(calls or 0),
        "summary_failures": float(failures or 0),
        "summary_sessions_behind": float(behind),
        "summary_max_lag": float(top[0][1]) if top else 0.0,
    }
