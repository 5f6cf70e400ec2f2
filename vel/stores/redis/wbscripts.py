"""Lua scripts of the flusher (write-behind): claim, read, renew and acknowledge.

The session scripts (:mod:`vel.stores.redis.scripts`) take one session's keys each; a flusher
works on many sessions at once, so its read and its acknowledgement take whole buckets
instead: one call per sweep reads every claimed session of every bucket it is given, and one
call acknowledges a whole Postgres transaction. The per-session keys are built inside the
script from the bucket's key prefixes (:meth:`KeyLayout.prefixes
<vel.stores.redis.keys.KeyLayout.prefixes>`) and the session id; they share the bucket's hash
tag, so on a cluster a call given one bucket touches one slot. On one server a call may be
given every bucket (Redis checks slots only on a cluster). What the session scripts' meta
fields and generations mean is described in :mod:`vel.stores.redis.scripts`.

A bucket call's KEYS are, per bucket, its dirty set, dirty-since set, backlog counter and
conflict set (4 keys a bucket). ARGV 1..3 = now (ms), hot TTL ms (0: none), '1' in
write-behind mode; each script's own arguments follow. Changes to the bucket's shared keys
(the backlog count, the dirty and conflict sets) are gathered while its sessions are handled
and made once per bucket: one DECRBY, one ZREM per set, one ZADD, however many sessions.
"""

from __future__ import annotations

from vel.stores.redis.scripts import _CLEAN_TTL, _script

# Shared by the bucket scripts (layout in the module docstring). ``bucket(b, p)`` selects
# bucket b (KEYS 4b-3 .. 4b) with its key prefixes at ARGV[p .. p + 2].
_BUCKETS = (
    """
local now = tonumber(ARGV[1])
local hot = tonumber(ARGV[2])
local wb = ARGV[3] == '1'
local K, P
local gone, unmarked, unconflicted, redue
local function bucket(b, p)
  K = {KEYS[4 * b - 3], KEYS[4 * b - 2], KEYS[4 * b - 1], KEYS[4 * b]}
  P = {ARGV[p], ARGV[p + 1], ARGV[p + 2]}
  gone, unmarked, unconflicted, redue = 0, {}, {}, {}
end
local function keys_of(sid) return {P[1] .. sid, P[2] .. sid, P[3] .. sid} end
local function num(v, default) if v then return tonumber(v) end return default end
-- m: 1 seq, 2 flushed, 3 gen, 4 fgen, 5 base, 6 lease, 7 expires, 8 rev, 9 conflict,
-- 10 updated, 11 pgrows, 12 tgen, 13 tseq
local function meta(k)
  return redis.call('HMGET', k[1], 'seq', 'flushed', 'gen', 'fgen', 'base', 'lease',
    'expires', 'rev', 'conflict', 'updated', 'pgrows', 'tgen', 'tseq')
end
local function is_dirty(m) return wb and not (m[2] == m[1] and m[3] == m[4]) end
-- Remove a copy; a dirty one also leaves the write-behind sets and the backlog count.
local function drop(k, sid, m, dirty)
  if dirty then
    local n = num(m[1], 0) - num(m[2], 0)
    if n > 0 then gone = gone + n end
    table.insert(unmarked, sid)
    table.insert(unconflicted, sid)
  end
  redis.call('DEL', k[1], k[2], k[3])
end
"""
    + _CLEAN_TTL
    + """local function set_ttl(k, ttl)
  for i = 1, 3 do
    if ttl > 0 then redis.call('PEXPIRE', k[i], ttl) else redis.call('PERSIST', k[i]) end
  end
end
-- CMD key list[1..] in chunks (unpack has a limit); a chunk keeps ZADD's pairs whole.
local function each(cmd, key, list)
  for i = 1, #list, 500 do
    redis.call(cmd, key, unpack(list, i, math.min(i + 499, #list)))
  end
end
-- The bucket's shared keys, once for all its sessions.
local function settle()
  if gone > 0 and redis.call('DECRBY', K[3], gone) < 0 then redis.call('SET', K[3], 0) end
  if #unmarked > 0 then
    each('ZREM', K[1], unmarked)
    each('ZREM', K[2], unmarked)
  end
  if #unconflicted > 0 then each('ZREM', K[4], unconflicted) end
  if #redue > 0 then each('ZADD', K[1], redue) end
end
"""
)

# What a flusher must copy of one session: {sid, gen, fgen, flushed, seq, rev, updated,
# pgrows, tgen, tseq, items...} (items are seqs flushed+1 .., at most ``max_rows``; tgen and
# tseq -1 without a truncation record), {sid, -1} if the session is gone (or past its
# retention: then dropped, in both tiers), {sid, -7} while it is in conflict (it leaves the
# dirty sets: only a race can have put it back there). A clean copy costs no LRANGE.
_PENDING = """
local function pending(sid, max_rows)
  local k = keys_of(sid)
  local m = meta(k)
  if not m[1] then return {sid, -1} end
  local expires = num(m[7], 0)
  if expires > 0 and expires <= now then
    drop(k, sid, m, is_dirty(m))
    return {sid, -1}
  end
  if m[9] then
    table.insert(unmarked, sid)
    return {sid, -7}
  end
  local flushed, seq = tonumber(m[2]), tonumber(m[1])
  local out = {sid, tonumber(m[3]), tonumber(m[4]), flushed, seq, num(m[8], -1),
    num(m[10], 0), num(m[11], 0), num(m[12], -1), num(m[13], -1)}
  if flushed < seq then
    local from = flushed - num(m[5], 0)
    for _, item in ipairs(redis.call('LRANGE', k[2], from, from + max_rows - 1)) do
      out[#out + 1] = item
    end
  end
  return out
end
"""

# A READ call stops claiming once it has read this many times its per-session row limit.
READ_BUDGET = 4
# The fields of a session's READ reply before its items: sid and 9 meta values (_PENDING).
PENDING_HEADER = 10

# Claim and read in one step. ARGV: 4 cutoff (claim sessions due at or before it, ms),
# 5 lease ms, 6 sessions claimed per bucket at most, 7 max rows per session, 8 gap ms, then
# three key prefixes per bucket. With 0 at ARGV 6 nothing is claimed: the session ids that
# follow the prefixes of the one bucket given (ARGV 12..) are read. A claim pushes the
# sessions' due time to now + lease (a visibility timeout: a flusher that dies holds them
# back one lease at most). With a key after the buckets' (one server only: the time of the
# last sweep by any flusher), nothing is done if that sweep was less than ``gap`` ms ago, so
# flushers sharing a server sweep about once a gap between them all, however many there are.
# Returns {last sweep ms (-1: no such key, or none yet)}, followed, unless skipped, by one
# list per bucket of what its sessions have to copy (see _PENDING).
READ = _script(
    "allow-oom",
    _BUCKETS + _PENDING,
    """
local max_rows = tonumber(ARGV[7])
local out = {-1}
if #KEYS % 4 == 1 then
  local last = tonumber(redis.call('GET', KEYS[#KEYS]) or '-1')
  out[1] = last
  if last >= 0 and now - last < tonumber(ARGV[8]) then return out end
  redis.call('SET', KEYS[#KEYS], now, 'PX', 60000)
end
-- One call reads at most about READ_BUDGET x max_rows messages in all (a script blocks
-- Redis while it runs, and its reply is held whole in memory): once they are read, no more
-- sessions are claimed; the rest stay due for the next sweep.
local budget = READ_BUDGET * max_rows
for b = 1, math.floor(#KEYS / 4) do
  bucket(b, 9 + 3 * (b - 1))
  local found = {}
  if ARGV[6] == '0' then
    for i = 12, #ARGV do found[#found + 1] = pending(ARGV[i], max_rows) end
  elseif budget > 0 then
    local sids = redis.call('ZRANGEBYSCORE', K[1], '-inf', ARGV[4], 'LIMIT', 0, tonumber(ARGV[6]))
    local until_ms = now + tonumber(ARGV[5])
    local claim = {}
    for _, sid in ipairs(sids) do
      if budget <= 0 then break end
      local read = pending(sid, max_rows)
      found[#found + 1] = read
      budget = budget - math.max(0, #read - PENDING_HEADER)
      claim[#claim + 1] = until_ms
      claim[#claim + 1] = sid
    end
    for i = 1, #claim, 500 do
      redis.call('ZADD', K[1], 'XX', unpack(claim, i, math.min(i + 499, #claim)))
    end
  end
  settle()
  out[b + 1] = found
end
return out
""".replace("READ_BUDGET", str(READ_BUDGET)).replace("PENDING_HEADER", str(PENDING_HEADER)),
)

# Record that Postgres holds a session's generation up to a seq, and the tier lease it
# recorded. ARGV from 4, per bucket: its three key prefixes, n, then n times (session id,
# generation, flushed up to seq, tier lease end ms or 0: unchanged). A late ack (lease
# expired, another flusher went further) only ever raises ``flushed``; an ack for an older
# generation changes nothing; a copy in conflict stays one. Returns, per bucket, one code
# per session: 1 clean (its TTL is back, it left the dirty sets), 2 still dirty (due now),
# 3 in conflict, -1 stale generation, 0 session gone (or dropped: the copy is behind
# Postgres, having lost writes in a failover to a replica that lacked them; the next use
# warms it again rather than reuse seqs Postgres holds).
ACK = _script(
    "allow-oom",
    _BUCKETS,
    """
local function ack(sid, gen, upto, lease)
  local k = keys_of(sid)
  local m = meta(k)
  if not m[1] then
    table.insert(unmarked, sid)
    return 0
  end
  if tonumber(m[3]) ~= tonumber(gen) then return -1 end
  if upto > tonumber(m[1]) then
    drop(k, sid, m, is_dirty(m))
    return 0
  end
  local old = tonumber(m[2])
  local flushed = math.max(old, upto)
  -- One HSET for every field that changes (none: no HSET).
  local fields = {'fgen', gen}
  if flushed > old then
    table.insert(fields, 'flushed')
    table.insert(fields, flushed)
    if m[11] ~= '1' then
      table.insert(fields, 'pgrows')
      table.insert(fields, 1)
    end
    -- The counter only bounds the backlog (settle() keeps it at 0 or more: keys lost
    -- while dirty would otherwise drive it below zero and weaken backpressure).
    gone = gone + flushed - old
  end
  if lease > num(m[6], 0) then
    table.insert(fields, 'lease')
    table.insert(fields, lease)
    m[6] = lease
  end
  if #fields > 2 or m[4] ~= gen then redis.call('HSET', k[1], unpack(fields)) end
  -- Postgres is at this generation now
  if m[12] or m[13] then redis.call('HDEL', k[1], 'tgen', 'tseq') end
  if m[9] then return 3 end
  if flushed >= tonumber(m[1]) then
    table.insert(unmarked, sid)
    local ttl = clean_ttl(m)
    if ttl < 0 then redis.call('DEL', k[1], k[2], k[3]) else set_ttl(k, ttl) end
    return 1
  end
  table.insert(redue, now)
  table.insert(redue, sid)
  return 2
end
local out = {}
local p = 4
for b = 1, #KEYS / 4 do
  bucket(b, p)
  local n = tonumber(ARGV[p + 3])
  local codes = {}
  for i = p + 4, p + 3 + 4 * n, 4 do
    codes[#codes + 1] = ack(ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3]))
  end
  settle()
  out[b] = codes
  p = p + 4 + 4 * n
end
return out
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
