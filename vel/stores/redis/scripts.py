"""Lua scripts of the Redis tier. Each runs atomically and touches keys of one hash slot.

Conventions: times are integer milliseconds passed in by the caller (scripts never read the
clock, so replicas and AOF replay see the same values); a session exists while its meta hash
exists; its message list always holds seqs 1..seq, so ``LLEN == seq`` is checked on reads to
catch a list evicted without its meta; "clean" means ``flushed == seq and fgen == gen``.

Generations: ``gen`` moves on with every replace, clear and pop, and ``fgen`` is the generation
Postgres was last brought to (by a warm or an acknowledged flush), so a flush that read the
session before one of them can never write old messages back (DESIGN.md 3.5). A replace or a
clear makes Postgres start the new generation afresh; a pop leaves a truncation record instead,
``tgen``/``tseq``: Postgres at any generation from ``tgen`` on (these came only from pops) holds
the current history up to seq ``tseq`` and reaches ``gen`` by dropping the seqs above it, so a
pop costs Postgres one ``DELETE``, not a rewrite. The record goes when Postgres reaches ``gen``.

Return codes shared by the scripts: -1 miss (warm from Postgres first), -2 replay of an
append already applied, -3 backpressure, -4 damaged dirty session, -5 turn lock held by another
turn.
"""

from __future__ import annotations

# The return codes above, by name.
MISS, REPLAY, BACKPRESSURE, DAMAGED, LOCKED = -1, -2, -3, -4, -5


def _script(flags: str, prologue: str, body: str) -> str:
    """Prefix the shebang Redis 7 reads script flags from (it must be the first line)."""
    shebang = f"#!lua flags={flags}" if flags else "#!lua"
    return f"{shebang}\n{prologue}{body}"


# Shared prologue: KEYS[1..3] = meta, messages, replays.
_SET_TTL = """
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
local function push(from)
  for i = from, #ARGV, 1000 do
    redis.call('RPUSH', KEYS[2], unpack(ARGV, i, math.min(i + 999, #ARGV)))
  end
end
"""

# The window read shared by LOAD and LOCK_LOAD: the last ARGV[1] messages (-1: all).
# ARGV[2] = ttl ms to slide when clean (0: none), ARGV[3] = '1' write-behind mode.
_READ_WINDOW = """
local function read_window()
  local m = redis.call('HMGET', KEYS[1], 'seq', 'flushed', 'gen', 'fgen')
  if not m[1] then return {-1} end
  local seq = tonumber(m[1])
  local clean = ARGV[3] ~= '1' or (m[2] == m[1] and m[3] == m[4])
  if redis.call('LLEN', KEYS[2]) ~= seq then
    if clean then
      redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
      return {-1}
    end
    return {-4}
  end
  local limit = tonumber(ARGV[1])
  local items
  if limit < 0 then
    items = redis.call('LRANGE', KEYS[2], 0, -1)
  elseif limit == 0 then
    items = {}
  else
    items = redis.call('LRANGE', KEYS[2], -limit, -1)
  end
  if clean then set_ttl(tonumber(ARGV[2])) end
  table.insert(items, 1, seq)
  return items
end
"""

# Read the window (see _READ_WINDOW). Returns {seq, items...}, {-1} or {-4}.
LOAD = _script("allow-oom", _SET_TTL + _READ_WINDOW, "return read_window()\n")

# Take a lease-based lock (KEYS[n]) for token ARGV[t], lease ARGV[t + 1] ms. Idempotent: a
# lock this token already holds (an attempt whose reply was lost, retried) is taken again. A
# value '~token' is the tombstone of an abandoned attempt (ABANDON_LOCK): free for every
# other token, never taken by that one, so an attempt delivered late cannot take it back.
_TAKE_LOCK = """
local function take_lock(n, t)
  local held = redis.call('GET', KEYS[n])
  if held == ARGV[t] then
    redis.call('PEXPIRE', KEYS[n], ARGV[t + 1])
    return true
  end
  if held and (string.sub(held, 1, 1) ~= '~' or held == '~' .. ARGV[t]) then return false end
  redis.call('SET', KEYS[n], ARGV[t], 'PX', ARGV[t + 1])
  return true
end
"""

# Take the turn lock (KEYS[4]) and read the window in one step, so a locked turn costs no
# round trip of its own. ARGV 1-3 as LOAD, 4 lock token, 5 lease ms. Returns {-5} when
# another turn holds the lock (nothing read), else what LOAD returns, the lock now held
# (also on a miss or damage: the caller warms or reports, then releases).
LOCK_LOAD = _script(
    "",
    _SET_TTL + _READ_WINDOW + _TAKE_LOCK,
    """
if not take_lock(4, 4) then return {-5} end
return read_window()
""",
)

# Take the lock KEYS[1] for token ARGV[1], lease ARGV[2] ms. Returns 1 taken, 0 held by
# another token.
TAKE_LOCK = _script("", _TAKE_LOCK, "return take_lock(1, 1) and 1 or 0\n")

# Append. KEYS[4..6] = dirty, dirty_since, backlog. ARGV: 1 now, 2 mode ('wb' | 'ro'),
# 3 ttl ms (redis-only mode), 4 flush delay ms, 5 backlog bound per bucket, 6 session id,
# 7 first message id, 8 turn lock token ('' none), 9.. items. With a token, KEYS[7] is the
# turn lock, released (if still ours) once the messages are stored: the turn's commit and
# unlock are one step. Returns {seq} | {-1} | {-2, seq} | {-3, backlog} | {-4}.
APPEND = _script(
    "",
    _SET_TTL,
    """
local now = tonumber(ARGV[1])
local wb = ARGV[2] == 'wb'
local m = redis.call('HMGET', KEYS[1], 'seq', 'flushed', 'gen', 'fgen')
if m[1] and redis.call('LLEN', KEYS[2]) ~= tonumber(m[1]) then
  -- volatile-* eviction took the list of a clean session but left its meta: appending would
  -- put the messages at the wrong seqs. Drop the remains and warm again (a dirty one: -4).
  if wb and not (m[1] == m[2] and m[3] == m[4]) then return {-4} end
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  if wb then return {-1} end
  redis.call('DEL', KEYS[2], KEYS[3])
  redis.call('HSET', KEYS[1], 'seq', 0, 'flushed', 0, 'gen', 0, 'fgen', 0, 'created', now)
end
local function unlock()
  if ARGV[8] ~= '' and redis.call('GET', KEYS[7]) == ARGV[8] then redis.call('DEL', KEYS[7]) end
end
local k = #ARGV - 8
local prev = redis.call('ZSCORE', KEYS[3], ARGV[7])
if prev then
  unlock()
  return {-2, tonumber(prev) + k - 1}
end
if wb then
  local backlog = tonumber(redis.call('GET', KEYS[6]) or '0')
  if backlog + k > tonumber(ARGV[5]) then return {-3, backlog} end
end
push(9)
local seq = redis.call('HINCRBY', KEYS[1], 'seq', k)
redis.call('HSET', KEYS[1], 'updated', now)
redis.call('ZADD', KEYS[3], seq - k + 1, ARGV[7])
if redis.call('ZCARD', KEYS[3]) > 64 then redis.call('ZREMRANGEBYRANK', KEYS[3], 0, -65) end
if wb then
  redis.call('INCRBY', KEYS[6], k)
  redis.call('ZADD', KEYS[4], 'NX', now + tonumber(ARGV[4]), ARGV[6])
  redis.call('ZADD', KEYS[5], 'NX', now, ARGV[6])
  set_ttl(0)
else
  set_ttl(tonumber(ARGV[3]))
end
unlock()
return {seq}
""",
)

# Seed a session warmed from Postgres, only if it is still absent and this process still
# holds the warm lease (KEYS[4]): a slow warm must never overwrite newer data.
# ARGV: 1 token, 2 ttl ms, 3 gen, 4 last seq, 5 created, 6 updated, 7.. items.
# Returns 1 seeded, 0 already present, -1 lease lost.
SEED = _script(
    "",
    _SET_TTL,
    """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if redis.call('GET', KEYS[4]) ~= ARGV[1] then return -1 end
redis.call('DEL', KEYS[2], KEYS[3])
push(7)
-- Rebuild the replay record from the ids of the last 64 messages (item i has seq i - 6), so
-- a caller's retry of an append that was flushed, left Redis and came back is still a replay.
for i = math.max(7, #ARGV - 63), #ARGV do
  local nl = string.find(ARGV[i], '\\n', 1, true)
  redis.call('ZADD', KEYS[3], i - 6, string.sub(ARGV[i], 1, nl - 1))
end
redis.call('HSET', KEYS[1], 'seq', ARGV[4], 'flushed', ARGV[4], 'gen', ARGV[3],
  'fgen', ARGV[3], 'created', ARGV[5], 'updated', ARGV[6])
set_ttl(tonumber(ARGV[2]))
return 1
""",
)

# Replace the history (no items: clear). KEYS[4..6] as APPEND. ARGV: 1 now, 2 mode,
# 3 ttl ms (redis-only), 4 session id, 5.. items. Returns {gen} or {-1}.
REPLACE = _script(
    "",
    _SET_TTL,
    """
local now = tonumber(ARGV[1])
local k = #ARGV - 4
if ARGV[2] ~= 'wb' then
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
  if k == 0 then return {0} end
  redis.call('HSET', KEYS[1], 'seq', k, 'flushed', 0, 'gen', 0, 'fgen', 0,
    'created', now, 'updated', now)
  push(5)
  set_ttl(tonumber(ARGV[3]))
  return {0}
end
local m = redis.call('HMGET', KEYS[1], 'seq', 'flushed', 'gen')
if not m[1] then return {-1} end
local unflushed = tonumber(m[1]) - tonumber(m[2])
local gen = tonumber(m[3]) + 1
redis.call('DEL', KEYS[2], KEYS[3])
push(5)
redis.call('HSET', KEYS[1], 'seq', k, 'flushed', 0, 'gen', gen, 'updated', now)
redis.call('HDEL', KEYS[1], 'tgen', 'tseq')  -- Postgres starts this generation afresh
redis.call('INCRBY', KEYS[6], k - unflushed)
redis.call('ZADD', KEYS[4], now, ARGV[4])
redis.call('ZADD', KEYS[5], 'NX', now, ARGV[4])
set_ttl(0)
return {gen}
""",
)

# Remove and return the newest message. KEYS[4..6] as APPEND. ARGV: 1 now, 2 mode ('wb' |
# 'ro'), 3 ttl ms (redis-only mode), 4 flush delay ms, 5 session id. Returns {1, item},
# {0} (nothing to pop), {-1} or {-4}. In write-behind mode the pop is a new generation with a
# truncation record (see the module docstring), and the session is dirty until Postgres has it.
POP = _script(
    "",
    _SET_TTL,
    """
local now = tonumber(ARGV[1])
local wb = ARGV[2] == 'wb'
local m = redis.call('HMGET', KEYS[1], 'seq', 'flushed', 'gen', 'fgen', 'tgen', 'tseq')
if not m[1] then return {wb and -1 or 0} end
local seq = tonumber(m[1])
if redis.call('LLEN', KEYS[2]) ~= seq then
  -- As in APPEND: the remains of a clean session are dropped and warmed again.
  if wb and not (m[1] == m[2] and m[3] == m[4]) then return {-4} end
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
  return {wb and -1 or 0}
end
if seq == 0 then return {0} end
local item = redis.call('RPOP', KEYS[2])
seq = seq - 1
redis.call('HSET', KEYS[1], 'seq', seq, 'updated', now)
-- A replay record must not point at a seq that is gone (the next append takes it).
redis.call('ZREMRANGEBYSCORE', KEYS[3], seq + 1, '+inf')
if not wb then
  set_ttl(tonumber(ARGV[3]))
  return {1, item}
end
local flushed = tonumber(m[2])
if flushed > seq then
  redis.call('HSET', KEYS[1], 'flushed', seq)
elseif redis.call('DECRBY', KEYS[6], 1) < 0 then
  redis.call('SET', KEYS[6], 0)  -- an unflushed message: one fewer waits for Postgres
end
if m[3] == m[4] then
  redis.call('HSET', KEYS[1], 'tgen', m[3], 'tseq', seq)
elseif m[5] then
  redis.call('HSET', KEYS[1], 'tseq', math.min(tonumber(m[6]), seq))
end
redis.call('HSET', KEYS[1], 'gen', tonumber(m[3]) + 1)
redis.call('ZADD', KEYS[4], 'NX', now + tonumber(ARGV[4]), ARGV[5])
redis.call('ZADD', KEYS[5], 'NX', now, ARGV[5])
set_ttl(0)
return {1, item}
""",
)

# Claim up to ARGV[3] due sessions of a bucket (KEYS[1] = dirty) for ARGV[2] ms.
CLAIM = _script(
    "allow-oom",
    "",
    """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local until_ms = tonumber(ARGV[1]) + tonumber(ARGV[2])
for _, sid in ipairs(due) do redis.call('ZADD', KEYS[1], 'XX', until_ms, sid) end
return due
""",
)

# Renew a flusher's claims (KEYS[1] = dirty): each session still claimed until ARGV[1] (ms)
# is claimed until ARGV[2]. One acked, rescheduled or claimed anew since has another score
# and is left alone. ARGV[3..] = session ids. Returns how many were renewed.
RENEW_CLAIMS = _script(
    "allow-oom",
    "",
    """
local n = 0
for i = 3, #ARGV do
  if tonumber(redis.call('ZSCORE', KEYS[1], ARGV[i]) or '-1') == tonumber(ARGV[1]) then
    redis.call('ZADD', KEYS[1], 'XX', ARGV[2], ARGV[i])
    n = n + 1
  end
end
return n
""",
)

# What a flusher must copy: ARGV[1] = max rows. Returns
# {gen, fgen, flushed, seq, tgen, tseq, items...} (items are seqs flushed+1 ..; tgen and tseq
# -1 without a truncation record) or {-1} if the session is gone.
PENDING = _script(
    "no-writes,allow-oom",
    "",
    """
local m = redis.call('HMGET', KEYS[1], 'gen', 'fgen', 'flushed', 'seq', 'tgen', 'tseq')
if not m[1] then return {-1} end
local flushed = tonumber(m[3])
local items = redis.call('LRANGE', KEYS[2], flushed, flushed + tonumber(ARGV[1]) - 1)
table.insert(items, 1, tonumber(m[6] or '-1'))
table.insert(items, 1, tonumber(m[5] or '-1'))
table.insert(items, 1, tonumber(m[4]))
table.insert(items, 1, flushed)
table.insert(items, 1, tonumber(m[2]))
table.insert(items, 1, tonumber(m[1]))
return items
""",
)

# Record that Postgres holds generation ARGV[2] up to seq ARGV[3]. A late ack (lease expired,
# another flusher went further) only ever raises ``flushed``; an ack for an older generation
# changes nothing. KEYS[4..6] as APPEND. ARGV: 1 session id, 2 gen, 3 upto, 4 now, 5 ttl.
# Returns 1 clean, 2 still dirty (due now), -1 stale generation, 0 session gone.
ACK = _script(
    "allow-oom",
    _SET_TTL,
    """
local m = redis.call('HMGET', KEYS[1], 'seq', 'flushed', 'gen')
if not m[1] then
  redis.call('ZREM', KEYS[4], ARGV[1])
  redis.call('ZREM', KEYS[5], ARGV[1])
  return 0
end
if tonumber(m[3]) ~= tonumber(ARGV[2]) then return -1 end
local old = tonumber(m[2])
local flushed = math.max(old, tonumber(ARGV[3]))
if flushed > old then
  redis.call('HSET', KEYS[1], 'flushed', flushed)
  -- The counter only bounds the backlog: keys lost while dirty (a misconfigured eviction,
  -- a manual DEL) would otherwise drive it below zero and weaken backpressure.
  if redis.call('DECRBY', KEYS[6], flushed - old) < 0 then redis.call('SET', KEYS[6], 0) end
end
redis.call('HSET', KEYS[1], 'fgen', ARGV[2])
redis.call('HDEL', KEYS[1], 'tgen', 'tseq')  -- Postgres is at this generation now
if flushed >= tonumber(m[1]) then
  redis.call('ZREM', KEYS[4], ARGV[1])
  redis.call('ZREM', KEYS[5], ARGV[1])
  set_ttl(tonumber(ARGV[5]))
  return 1
end
redis.call('ZADD', KEYS[4], ARGV[4], ARGV[1])
return 2
""",
)

# Lease-based lock: KEYS[1] = lock key. ARGV: 1 token, 2 lease ms.
RENEW_LOCK = _script(
    "allow-oom",
    "",
    """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
""",
)

RELEASE_LOCK = _script(
    "allow-oom",
    "",
    """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
""",
)

# Give up an attempt at a lock whose outcome is unknown (cancelled, reply lost): KEYS[1] =
# lock, ARGV: 1 token, 2 ms. Unless another token holds the lock, leave the tombstone
# '~token' for ARGV[2] ms: whether the attempt already ran (the lock is freed) or is still
# on its way (it will find the tombstone and fail), the lock ends up free. Returns 1 or 0.
ABANDON_LOCK = _script(
    "allow-oom",
    "",
    """
local held = redis.call('GET', KEYS[1])
if held and held ~= ARGV[1] and string.sub(held, 1, 1) ~= '~' then return 0 end
redis.call('SET', KEYS[1], '~' .. ARGV[1], 'PX', ARGV[2])
return 1
""",
)

# Delete a session's Redis copy unless it is dirty (then it holds writes Postgres lacks, and
# the flusher must see them). KEYS: meta, messages, replays, bucket dirty set. ARGV: 1 session
# id. Returns 1 dropped, 0 dirty or absent.
DROP_CLEAN = _script(
    "allow-oom",
    "",
    """
if redis.call('ZSCORE', KEYS[4], ARGV[1]) then return 0 end
return redis.call('DEL', KEYS[1], KEYS[2], KEYS[3]) > 0 and 1 or 0
""",
)
