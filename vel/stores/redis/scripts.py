"""Lua scripts of the Redis tier. Each runs atomically and touches keys of one hash slot.

This module holds what the session scripts share (the conventions below, ``_script``, the
session prologue, the window read, the lock handoff) and the read, append and seed scripts;
the lock scripts are in :mod:`vel.stores.redis.lockscripts`, the edits of a copy and its
conflict handling in :mod:`vel.stores.redis.editscripts`, the flusher's bucket scripts in
:mod:`vel.stores.redis.wbscripts`.

Conventions: times are integer milliseconds passed in by the caller (scripts never read the
clock, so replicas and AOF replay see the same values); a session exists while its meta hash
exists; its message list holds seqs ``base+1 .. seq`` (a warm loads only a window: DESIGN.md
3.10), so ``LLEN == seq - base`` is checked on reads to catch a list evicted without its meta;
"clean" means ``flushed == seq and fgen == gen``.

Meta fields: ``seq flushed gen fgen created updated`` as ever; ``base`` (0 when absent);
``lease``: when the tier lease recorded in Postgres ends (write-behind mode: a clean copy never
outlives it, DESIGN.md 3.8); ``expires``: the retention deadline, counted from the last write
(3.9; absent: never); ``rev``: the Postgres revision the copy was loaded at; ``pgrows``: 1 once
Postgres held messages of this copy; ``conflict``: why a flush could not be applied (the copy
then keeps no TTL and leaves the dirty set for the bucket's conflict set until resolved).

Session scripts share one layout: KEYS 1..7 = meta, messages, replays, dirty, dirty_since,
backlog, conflicts (a script's extra key comes 8th); ARGV 1..5 = session id, now, hot TTL ms
(0: none), '1' in write-behind mode, retention ms (0: none); their own arguments follow.

Generations: ``gen`` moves on with every replace, clear and pop, and ``fgen`` is the generation
Postgres was last brought to (by a warm or an acknowledged flush), so a flush that read the
session before one of them can never write old messages back (DESIGN.md 3.5). A replace or a
clear makes Postgres start the new generation afresh; a pop leaves a truncation record instead,
``tgen``/``tseq``: Postgres at any generation from ``tgen`` on (these came only from pops) holds
the current history up to seq ``tseq`` and reaches ``gen`` by dropping the seqs above it, so a
pop costs Postgres one ``DELETE``, not a rewrite. The record goes when Postgres reaches ``gen``.

Return codes shared by the scripts: -1 miss (warm from Postgres first), -2 replay of an
append already applied, -3 backpressure, -4 damaged dirty session, -5 turn lock held by another
turn, -6 staged items lost (stage again), -8 the copy holds none of the messages asked for
(prepend older ones from Postgres first).
"""

from __future__ import annotations

# The return codes above, by name.
MISS, REPLAY, BACKPRESSURE, DAMAGED, LOCKED, UNSTAGED, OLDER = -1, -2, -3, -4, -5, -6, -8


def _script(flags: str, prologue: str, body: str) -> str:
    """Prefix the shebang Redis 7 reads script flags from (it must be the first line)."""
    shebang = f"#!lua flags={flags}" if flags else "#!lua"
    return f"{shebang}\n{prologue}{body}"


# The TTL of a clean copy (uses the prologue's ``hot``, ``now``, ``wb`` and ``num``); the
# flusher's bucket scripts (wbscripts.py) share it.
_CLEAN_TTL = """
-- The TTL of a clean copy: the hot TTL, never past its tier lease (write-behind) nor its
-- retention deadline. 0: no TTL; -1: the copy must go now.
local function clean_ttl(m)
  local ttl = hot
  local function cap(deadline)
    local left = deadline - now
    if left < 1 then left = -1 end
    if ttl == 0 or left < ttl then ttl = left end
  end
  if wb then cap(num(m[6], 0)) end
  local expires = num(m[7], 0)
  if expires > 0 then cap(expires) end
  return ttl
end
"""

# Shared prologue of the session scripts (layout in the module docstring).
_SESSION = (
    """
local sid = ARGV[1]
local now = tonumber(ARGV[2])
local hot = tonumber(ARGV[3])
local wb = ARGV[4] == '1'
local retention = tonumber(ARGV[5])
local function set_ttl(ttl)
  if ttl > 0 then
    redis.call('PEXPIRE', KEYS[1], ttl)
    redis.call('PEXPIRE', KEYS[2], ttl)
    redis.call('PEXPIRE', KEYS[3], ttl)
  else
    redis.call('PERSIST', KEYS[1])
    redis.call('PERSIST', KEYS[2])
    redis.call('PERSIST', KEYS[3])
  end
end
-- RPUSH ARGV[from..] in chunks; returns the list's new length.
local function push(from)
  local len = 0
  for i = from, #ARGV, 1000 do
    len = redis.call('RPUSH', KEYS[2], unpack(ARGV, i, math.min(i + 999, #ARGV)))
  end
  return len
end
-- m: 1 seq, 2 flushed, 3 gen, 4 fgen, 5 base, 6 lease, 7 expires, 8 rev, 9 conflict,
-- 10 updated
local function meta()
  return redis.call('HMGET', KEYS[1], 'seq', 'flushed', 'gen', 'fgen', 'base', 'lease',
    'expires', 'rev', 'conflict', 'updated')
end
local function num(v, default) if v then return tonumber(v) end return default end
local function is_dirty(m) return wb and not (m[2] == m[1] and m[3] == m[4]) end
-- Remove the copy; a dirty one also leaves the write-behind sets and the backlog count.
local function drop(m, dirty)
  if dirty then
    local gone = num(m[1], 0) - num(m[2], 0)
    if gone > 0 and redis.call('DECRBY', KEYS[6], gone) < 0 then redis.call('SET', KEYS[6], 0) end
    redis.call('ZREM', KEYS[4], sid)
    redis.call('ZREM', KEYS[5], sid)
    redis.call('ZREM', KEYS[7], sid)
  end
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
end
"""
    + _CLEAN_TTL
    + """-- What a copy whose message list does not hold seqs base+1 .. seq becomes: volatile-*
-- eviction took the list of a clean copy, so drop the remains and warm again (nil, a miss);
-- a dirty one is 'damaged'.
local function mismatch(m)
  if not is_dirty(m) then
    drop(m, false)
    return nil
  end
  return 'damaged'
end
-- The copy if it may serve (nil: dropped or absent, a miss; 'damaged'). Past retention it
-- is gone in both tiers (dirty or not); a clean copy whose tier lease ends within ``margin``
-- ms is dropped so the warm takes the lease again before the copy is used. ``listed``: the
-- caller checks the list's length itself (from what its LRANGE or RPUSH returns, which
-- costs no command of its own; eviction takes a whole key), else LLEN does.
local function usable(m, margin, listed)
  if not m[1] then return nil end
  local dirty = is_dirty(m)
  local expires = num(m[7], 0)
  if expires > 0 and expires <= now then
    drop(m, dirty)
    return nil
  end
  if wb and not dirty and num(m[6], 0) <= now + margin then
    drop(m, false)
    return nil
  end
  if not listed and redis.call('LLEN', KEYS[2]) ~= tonumber(m[1]) - num(m[5], 0) then
    return mismatch(m)
  end
  return m
end
-- A read slides a clean copy's hot TTL. In write-behind mode (where the TTL only caches
-- what Postgres holds) only once half of it may have run out: the TTL was last set at or
-- after the last write (by that write's flush, a seed or a read), so until
-- ``updated + hot / 2`` at least half of it is left and the three PEXPIREs are saved. In
-- Redis-only mode the TTL ends the session: every read slides it.
local function touch(m)
  if is_dirty(m) then return end
  if wb and hot > 0 and now - num(m[10], 0) < hot / 2 then return end
  set_ttl(clean_ttl(m))
end
-- The replay record from the ids of the list's last 64 items (item i has seq first + i).
local function index_replays(first)
  local items = redis.call('LRANGE', KEYS[2], -64, -1)
  local len = redis.call('LLEN', KEYS[2])
  local offset = len - #items
  for i, item in ipairs(items) do
    local nl = string.find(item, '\\n', 1, true)
    redis.call('ZADD', KEYS[3], first + offset + i - 1, string.sub(item, 1, nl - 1))
  end
end
"""
)

# The window read shared by LOAD and LOCK_LOAD: ARGV[6] the last n messages (-1: all),
# ARGV[7] lease margin ms. Returns {seq, base, gen, rev, items...} (items: the last
# min(n, seq - base) messages; -1 rev: unknown), {-1} or {-4}.
_READ_WINDOW = """
local function read_window()
  local limit = tonumber(ARGV[6])
  local m = usable(meta(), tonumber(ARGV[7]), limit ~= 0)
  if m == nil then return {-1} end
  if m == 'damaged' then return {-4} end
  local items
  local held = tonumber(m[1]) - num(m[5], 0)
  if limit < 0 then
    items = redis.call('LRANGE', KEYS[2], 0, -1)
  elseif limit == 0 then
    items = {}
  else
    items = redis.call('LRANGE', KEYS[2], -limit, -1)
  end
  if limit ~= 0 and #items ~= (limit < 0 and held or math.min(limit, held)) then
    m = mismatch(m)
    if m == nil then return {-1} end
    return {-4}
  end
  touch(m)
  table.insert(items, 1, num(m[8], -1))
  table.insert(items, 1, num(m[3], 0))
  table.insert(items, 1, num(m[5], 0))
  table.insert(items, 1, tonumber(m[1]))
  return items
end
-- The header alone ({seq, base, gen, rev}, {-1} or {-4}): the caller reads the window with
-- LRANGE after it in one MULTI/EXEC and checks the count itself; a count that does not
-- match is sent back through read_window, which settles it. The items do not pass through
-- Lua: copying 20 messages of 1 KB into Lua strings and back cost Redis 41-46 us a call
-- alone, about 20 us of a locked turn under load (docs/benchmarks.md).
local function read_head()
  local m = usable(meta(), tonumber(ARGV[7]), true)
  if m == nil then return {-1} end
  if m == 'damaged' then return {-4} end
  touch(m)
  return {tonumber(m[1]), num(m[5], 0), num(m[3], 0), num(m[8], -1)}
end
"""

# Read the window (see _READ_WINDOW).
LOAD = _script("allow-oom", _SESSION + _READ_WINDOW, "return read_window()\n")
# Read the header of the window (read_head in _READ_WINDOW).
HEAD = _script("allow-oom", _SESSION + _READ_WINDOW, "return read_head()\n")

# Lock values: the holder's token; '~token', the tombstone of an abandoned attempt
# (ABANDON_LOCK): free for every other token, never taken by that one, so an attempt
# delivered late cannot take it back; 'token!', held by token while turns wait for it. Its
# release hands the lock on: the lock becomes '?', reserved for a turn that has waited (a
# newcomer waits behind them; the reservation lasts RESERVE ms at most), and a wake-up goes
# onto the session's wake list, which waiters block on (BLPOP) instead of polling. The list
# holds one wake-up at most and expires after a lease; a waiter whose wake-up never comes (a
# holder that died) tries again after a short timeout.
_HANDOFF = """
local function holder(v)
  if v and string.sub(v, -1) == '!' then return string.sub(v, 1, -2) end
  return v
end
local function wake(v, lock, key, ms)
  if v and string.sub(v, -1) == '!' then
    if lock then redis.call('SET', lock, '?', 'PX', math.min(tonumber(ms), RESERVE)) end
    redis.call('LPUSH', key, 1)
    redis.call('LTRIM', key, 0, 0)
    redis.call('PEXPIRE', key, ms)
  end
end
""".replace("RESERVE", "1000")  # ms, as locks.WAKE_POLL

# Append. ARGV: 6 lease margin ms, 7 flush delay ms, 8 backlog bound per bucket, 9 first
# message id, 10 turn lock token ('' none), 11 lock lease ms, 12.. items. With a token,
# KEYS[8] is the turn lock, released (if still ours) once the messages are stored, and
# KEYS[9] its wake list (see _HANDOFF): the turn's commit and unlock are one step.
# Returns {seq} | {-1} | {-2, seq} | {-3, backlog} | {-4}.
#
# The common case (a hot session, its lock still ours, already dirty) costs HMGET, GETDEL,
# INCRBY, RPUSH, HSET and ZADD: a lock still held by this token proves the commit was not
# applied before (an applied one released it), so only a commit that lost its lock looks
# for a replay; the list's length comes from RPUSH; a copy already dirty is already in the
# dirty sets and has no TTL (3.2). Uncommon paths undo what they did before returning.
APPEND = _script(
    "",
    _SESSION + _HANDOFF,
    """
local k = #ARGV - 11
local token = ARGV[10]
local m = usable(meta(), tonumber(ARGV[6]), true)
if m == 'damaged' then return {-4} end
local function create()
  -- Redis-only mode: a new (or expired) session starts here, at seq 1.
  redis.call('DEL', KEYS[2], KEYS[3])
  redis.call('HSET', KEYS[1], 'seq', 0, 'flushed', 0, 'gen', 0, 'fgen', 0, 'created', now)
  return meta()
end
if m == nil then
  if wb then return {-1} end
  m = create()
end
-- Already dirty (so in the dirty sets and without TTL): messages beyond ``flushed``, or a
-- generation Postgres lacks. Not a copy with ``flushed > seq`` (see ACK): it gets its marks.
local was_dirty = wb and (tonumber(m[1]) > num(m[2], 0) or m[3] ~= m[4])
-- The lock: ours (taken by GETDEL, put back if this call ends without storing), or another
-- token's or a tombstone (put back at once), or nobody's.
local mine = false
local lock
local function relock()
  if mine then redis.call('SET', KEYS[8], lock, 'PX', ARGV[11]) end
end
if token ~= '' then
  lock = redis.call('GETDEL', KEYS[8])
  if holder(lock) == token then
    mine = true
  elseif lock then
    redis.call('SET', KEYS[8], lock, 'PX', ARGV[11])
  end
end
if not mine then
  local prev = redis.call('ZSCORE', KEYS[3], ARGV[9])
  if prev then return {-2, tonumber(prev) + k - 1} end
  if token ~= '' then
    -- A turn's commit leaves no replay record (see below): look for its first message in
    -- the list's tail (a warm or replace records the ids of the last 64 messages).
    local tail = redis.call('LRANGE', KEYS[2], -64, -1)
    local lead = ARGV[9] .. '\\n'
    for i, item in ipairs(tail) do
      if string.sub(item, 1, #lead) == lead then
        return {-2, tonumber(m[1]) - #tail + i + k - 1}
      end
    end
  end
end
if wb then
  local backlog = redis.call('INCRBY', KEYS[6], k)
  if backlog > tonumber(ARGV[8]) then
    redis.call('DECRBY', KEYS[6], k)
    relock()
    return {-3, backlog - k}
  end
end
local function unbacklog()
  if wb and redis.call('DECRBY', KEYS[6], k) < 0 then redis.call('SET', KEYS[6], 0) end
end
local held = tonumber(m[1]) - num(m[5], 0)
local len = push(12)
if len ~= held + k then
  -- The list was evicted without its meta: take the push back, then as usable() would.
  if len == k then
    redis.call('DEL', KEYS[2])
  else
    redis.call('LTRIM', KEYS[2], 0, len - k - 1)
  end
  m = mismatch(m)
  if m == 'damaged' or wb then
    unbacklog()
    relock()
    return {m == nil and -1 or -4}
  end
  m = create()
  was_dirty = false
  push(12)
end
local seq = tonumber(m[1]) + k
if retention > 0 then
  m[7] = now + retention
  redis.call('HSET', KEYS[1], 'seq', seq, 'updated', now, 'expires', m[7])
else
  redis.call('HSET', KEYS[1], 'seq', seq, 'updated', now)
end
if token == '' then
  -- The replay record of a plain append: it keeps the last 64 appends or so (trimmed once
  -- every 32 seqs). A turn's commit needs none: while it holds its lock nothing else
  -- commits a turn, so a retry finds its messages in the list's tail.
  redis.call('ZADD', KEYS[3], seq - k + 1, ARGV[9])
  if math.floor(seq / 32) ~= math.floor((seq - k) / 32) then
    redis.call('ZREMRANGEBYRANK', KEYS[3], 0, -65)
  end
end
if wb then
  if not was_dirty then
    -- A copy in conflict is not flushed again until an operator resolves it.
    if not m[9] then
      redis.call('ZADD', KEYS[4], 'NX', now + tonumber(ARGV[7]), sid)
      redis.call('ZADD', KEYS[5], 'NX', now, sid)
    end
    set_ttl(0)
  end
else
  set_ttl(clean_ttl(m))
end
-- Turns wait for the lock: hand it on.
if mine then wake(lock, KEYS[8], KEYS[9], ARGV[11]) end
return {seq}
""",
)

# Seed a session warmed from Postgres, only if it is still absent and this process still
# holds the warm lease (KEYS[8]): a slow warm must never overwrite newer data. The items are
# the window the caller needs (seqs last - n + 1 .. last), at least the last 64 so that the
# replay record can be rebuilt. ARGV: 6 token, 7 gen, 8 rev, 9 last seq, 10 created,
# 11 updated, 12 expires (0: never), 13 lease end, 14.. items.
# Returns 1 seeded, 0 already present, -1 lease lost (or the lease already over).
SEED = _script(
    "",
    _SESSION,
    """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if redis.call('GET', KEYS[8]) ~= ARGV[6] then return -1 end
local last = tonumber(ARGV[9])
local base = last - (#ARGV - 13)
redis.call('DEL', KEYS[2], KEYS[3])
push(14)
-- A caller's retry of an append that was flushed, left Redis and came back is a replay.
index_replays(base + 1)
redis.call('HSET', KEYS[1], 'seq', last, 'flushed', last, 'gen', ARGV[7], 'fgen', ARGV[7],
  'base', base, 'rev', ARGV[8], 'created', ARGV[10], 'updated', ARGV[11], 'lease', ARGV[13],
  'pgrows', last > 0 and 1 or 0)
if tonumber(ARGV[12]) > 0 then redis.call('HSET', KEYS[1], 'expires', ARGV[12]) end
local ttl = clean_ttl(meta())
if ttl < 0 then
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
  return -1
end
set_ttl(ttl)
return 1
""",
)
