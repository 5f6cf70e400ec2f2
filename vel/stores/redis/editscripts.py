"""Lua scripts of the Redis tier that change a session's copy other than by appending:
prepend older messages (EXTEND), replace or clear the history (REPLACE), pop the newest
message (POP); and the copy's conflict handling and removal (CONFLICT, RESOLVED, COPY,
DROP_CLEAN).

The layout of KEYS and ARGV, the meta fields, generations and truncation records, and the
return codes are described in :mod:`vel.stores.redis.scripts`.
"""

from __future__ import annotations

from vel.stores.redis.scripts import _SESSION, _script

# Prepend older messages to a partial copy (seqs below its base), only if it is still the
# copy they were read for. KEYS 1-3. ARGV: 1 gen, 2 rev, 3 expected base, 4.. items (seqs
# base - n + 1 .. base, oldest first). Returns the new base, or -1 (the copy changed).
EXTEND = _script(
    "",
    "",
    """
local m = redis.call('HMGET', KEYS[1], 'seq', 'gen', 'rev', 'base')
if not m[1] or m[2] ~= ARGV[1] or (m[3] or '-1') ~= ARGV[2] or (m[4] or '0') ~= ARGV[3] then
  return -1
end
local base = tonumber(ARGV[3])
if redis.call('LLEN', KEYS[2]) ~= tonumber(m[1]) - base then return -1 end
for i = #ARGV, 4, -1 do redis.call('LPUSH', KEYS[2], ARGV[i]) end
base = base - (#ARGV - 3)
redis.call('HSET', KEYS[1], 'base', base)
return base
""",
)

# Replace the history (no items: clear). ARGV: 6 lease margin ms, 7 item count, 8 '1' when
# the items were staged in KEYS[8] (a long history, pushed in chunks beforehand), 9.. items.
# Returns {gen} or {-1} (write-behind: warm first) or {-6} (staged items gone).
REPLACE = _script(
    "",
    _SESSION,
    """
local k = tonumber(ARGV[7])
local staged = ARGV[8] == '1'
if staged and redis.call('LLEN', KEYS[8]) ~= k then return {-6} end
local function install()
  redis.call('DEL', KEYS[2], KEYS[3])
  if staged then
    if k > 0 then redis.call('RENAME', KEYS[8], KEYS[2]) end
  else
    push(9)
  end
  index_replays(1)
end
if not wb then
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
  if k == 0 then return {0} end
  install()
  redis.call('HSET', KEYS[1], 'seq', k, 'flushed', 0, 'gen', 0, 'fgen', 0, 'base', 0,
    'created', now, 'updated', now)
  if retention > 0 then redis.call('HSET', KEYS[1], 'expires', now + retention) end
  set_ttl(clean_ttl(meta()))
  return {0}
end
local m = usable(meta(), tonumber(ARGV[6]))
if m == nil then return {-1} end
if m == 'damaged' then m = meta() end
local unflushed = tonumber(m[1]) - tonumber(m[2])
local gen = tonumber(m[3]) + 1
install()
redis.call('HSET', KEYS[1], 'seq', k, 'flushed', 0, 'gen', gen, 'base', 0, 'updated', now)
if retention > 0 then redis.call('HSET', KEYS[1], 'expires', now + retention) end
if redis.call('INCRBY', KEYS[6], k - unflushed) < 0 then redis.call('SET', KEYS[6], 0) end
redis.call('HDEL', KEYS[1], 'tgen', 'tseq')  -- Postgres starts this generation afresh
if not m[9] then
  redis.call('ZADD', KEYS[4], now, sid)
  redis.call('ZADD', KEYS[5], 'NX', now, sid)
end
set_ttl(0)
return {gen}
""",
)

# Remove and return the newest message. ARGV 6: flush delay ms, 7 lease margin ms. Returns
# {1, item}, {0} (nothing to pop), {-1}, {-4} or {-8} (the copy holds none of the session's
# messages: its older ones are in Postgres only, read them into it first). In write-behind
# mode the pop is a new generation with a truncation record (see vel.stores.redis.scripts),
# and the session is dirty until Postgres has it.
POP = _script(
    "",
    _SESSION,
    """
local m = usable(meta(), tonumber(ARGV[7]))
if m == 'damaged' then return {-4} end
if m == nil then return {wb and -1 or 0} end
local seq = tonumber(m[1])
if seq == 0 then return {0} end
if seq == num(m[5], 0) then return {-8} end
local item = redis.call('RPOP', KEYS[2])
seq = seq - 1
redis.call('HSET', KEYS[1], 'seq', seq, 'updated', now)
if retention > 0 then redis.call('HSET', KEYS[1], 'expires', now + retention) end
-- A replay record must not point at a seq that is gone (the next append takes it).
redis.call('ZREMRANGEBYSCORE', KEYS[3], seq + 1, '+inf')
if not wb then
  set_ttl(clean_ttl(meta()))
  return {1, item}
end
local t = redis.call('HMGET', KEYS[1], 'tgen', 'tseq')
local flushed = tonumber(m[2])
if flushed > seq then
  redis.call('HSET', KEYS[1], 'flushed', seq)
elseif redis.call('DECRBY', KEYS[6], 1) < 0 then
  redis.call('SET', KEYS[6], 0)  -- an unflushed message: one fewer waits for Postgres
end
if m[3] == m[4] then
  redis.call('HSET', KEYS[1], 'tgen', m[3], 'tseq', seq)
elseif t[1] then
  redis.call('HSET', KEYS[1], 'tseq', math.min(tonumber(t[2]), seq))
end
redis.call('HSET', KEYS[1], 'gen', tonumber(m[3]) + 1)
if not m[9] then
  redis.call('ZADD', KEYS[4], 'NX', now + tonumber(ARGV[6]), sid)
  redis.call('ZADD', KEYS[5], 'NX', now, sid)
end
set_ttl(0)
return {1, item}
""",
)

# A flush of generation ARGV[6] (revision ARGV[7], -1 unknown) could not be applied because
# Postgres changed behind the tier: unless the copy moved on since it was read (then the
# newer one is flushed in its turn), it becomes a conflict, kept without TTL and out of the
# dirty set until resolved (DESIGN.md 3.8). ARGV[8] the reason. Returns 1 marked, 0 not.
CONFLICT = _script(
    "allow-oom",
    _SESSION,
    """
local m = meta()
if not m[1] then return 0 end
local dirty = is_dirty(m)
local expires = num(m[7], 0)
if expires > 0 and expires <= now then
  drop(m, dirty)
  return 0
end
if tonumber(m[3]) ~= tonumber(ARGV[6]) or num(m[8], -1) ~= tonumber(ARGV[7]) then return 0 end
if not dirty then
  -- Nothing of it is missing from Postgres: the copy is merely out of date.
  drop(m, false)
  return 0
end
redis.call('HSET', KEYS[1], 'conflict', ARGV[8], 'conflict_at', now)
redis.call('ZREM', KEYS[4], sid)
redis.call('ZREM', KEYS[5], sid)
redis.call('ZADD', KEYS[7], now, sid)
set_ttl(0)
return 1
""",
)

# Drop a copy once its conflict is resolved in Postgres, only if it is still the copy that was
# read (ARGV 6 seq, 7 gen): otherwise it took writes meanwhile and is resolved again.
# Returns 1 dropped, 0 changed.
RESOLVED = _script(
    "allow-oom",
    _SESSION,
    """
local m = meta()
if not m[1] then
  redis.call('ZREM', KEYS[7], sid)
  return 1
end
if m[1] ~= ARGV[6] or m[3] ~= ARGV[7] then return 0 end
drop(m, true)
return 1
""",
)

# The whole copy in one step (for conflict resolution): KEYS 1-2 = meta, messages. Returns
# {n, the meta's n fields and values, the items (seqs base+1 .. seq)...}, or {} if absent.
COPY = _script(
    "no-writes,allow-oom",
    "",
    """
local meta = redis.call('HGETALL', KEYS[1])
if #meta == 0 then return {} end
local out = {#meta}
for _, v in ipairs(meta) do table.insert(out, v) end
for _, v in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do table.insert(out, v) end
return out
""",
)

# Delete a session's Redis copy unless it holds writes Postgres lacks (dirty, or in
# conflict: the flusher or an operator must see them). KEYS: meta, messages, replays, bucket
# dirty set, bucket conflict set. ARGV: 1 session id. Returns 1 dropped, 0 absent, -1 kept.
DROP_CLEAN = _script(
    "allow-oom",
    "",
    """
if redis.call('ZSCORE', KEYS[4], ARGV[1]) or redis.call('ZSCORE', KEYS[5], ARGV[1]) then
  return -1
end
return redis.call('DEL', KEYS[1], KEYS[2], KEYS[3]) > 0 and 1 or 0
""",
)
