"""Lua scripts of the Redis tier's locks: a turn's lock taken with its window's read
(LOCK_LOAD), and any lease lock (the warm lease, a turn's lock) taken, renewed, released or
abandoned by its holder's token.

What a lock's value means and how a released turn lock is handed to a waiting turn is told
at ``_HANDOFF`` in :mod:`vel.stores.redis.scripts`, which the append shares (a turn's commit
releases its lock); the session scripts' layout and return codes are in that module's
docstring.
"""

from __future__ import annotations

from vel.stores.redis.scripts import _HANDOFF, _READ_WINDOW, _SESSION, _script

# Take a lease-based lock (KEYS[n]) for token ARGV[t], lease ARGV[t + 1] ms. Idempotent: a
# lock this token already holds (an attempt whose reply was lost, retried) is taken again.
# ``waiter``: nil (no handoff), or a turn's: '1' once it has waited (its own lock is then
# marked, as others may still wait), '0' before; a turn that finds the lock held marks it.
# A turn's lock is followed by its wake list (KEYS[n + 1]).
_TAKE_LOCK = (
    _HANDOFF
    + """
local function take_lock(n, t, waiter)
  local mine = ARGV[t]
  if waiter == '1' then mine = mine .. '!' end
  -- A free lock (the common case) costs one command.
  if redis.call('SET', KEYS[n], mine, 'NX', 'PX', ARGV[t + 1]) then return true end
  local held = redis.call('GET', KEYS[n])
  if holder(held) == ARGV[t] then
    redis.call('PEXPIRE', KEYS[n], ARGV[t + 1])
    return true
  end
  if waiter and holder(held) == '?' and (waiter == '1' or redis.call('LLEN', KEYS[n + 1]) > 0) then
    -- Reserved for a turn that waited: this one, or a newcomer if no waiter took the
    -- wake-up (they all gave up).
    if waiter ~= '1' then redis.call('DEL', KEYS[n + 1]) end
    redis.call('SET', KEYS[n], mine, 'PX', ARGV[t + 1])
    return true
  end
  if held and string.sub(held, 1, 1) ~= '~' then
    if waiter and string.sub(held, -1) ~= '!' then
      redis.call('SET', KEYS[n], held .. '!', 'KEEPTTL')
    end
    return false
  end
  if held == '~' .. ARGV[t] then return false end
  redis.call('SET', KEYS[n], mine, 'PX', ARGV[t + 1])
  return true
end
"""
)

# Take the turn lock (KEYS[8], its wake list KEYS[9]) and read the window in one step, so a
# locked turn costs no round trip of its own. ARGV 6-7 as LOAD, 8 lock token, 9 lease ms,
# 10 '1' once this turn has waited for the lock (else '0'). Returns {-5} when another turn
# holds the lock (nothing read; the lock is marked so its release wakes a waiter), else what
# LOAD returns, the lock now held (also on a miss or damage: the caller warms or reports,
# then releases).
LOCK_LOAD = _script(
    "",
    _SESSION + _READ_WINDOW + _TAKE_LOCK,
    """
if not take_lock(8, 8, ARGV[10]) then return {-5} end
return read_window()
""",
)
# LOCK_LOAD with read_head: the window is read after it in the same MULTI/EXEC.
LOCK_HEAD = _script(
    "",
    _SESSION + _READ_WINDOW + _TAKE_LOCK,
    """
if not take_lock(8, 8, ARGV[10]) then return {-5} end
return read_head()
""",
)

# Take the lock KEYS[1] for token ARGV[1], lease ARGV[2] ms. Returns 1 taken, 0 held by
# another token.
TAKE_LOCK = _script("", _TAKE_LOCK, "return take_lock(1, 1) and 1 or 0\n")

# Lease-based lock: KEYS[1] = lock key. ARGV: 1 token, 2 lease ms.
RENEW_LOCK = _script(
    "allow-oom",
    _HANDOFF,
    """
if holder(redis.call('GET', KEYS[1])) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
""",
)

# KEYS[1] = lock, KEYS[2] (a turn lock's) = its wake list. ARGV: 1 token, 2 lease ms.
RELEASE_LOCK = _script(
    "allow-oom",
    _HANDOFF,
    """
local held = redis.call('GET', KEYS[1])
if holder(held) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  if KEYS[2] then wake(held, KEYS[1], KEYS[2], ARGV[2]) end
  return 1
end
return 0
""",
)

# Give up an attempt at a lock whose outcome is unknown (cancelled, reply lost): KEYS[1] =
# lock (KEYS[2] as RELEASE_LOCK), ARGV: 1 token, 2 ms. Unless another token holds the lock,
# leave the tombstone '~token' for ARGV[2] ms: whether the attempt already ran (the lock is
# freed) or is still on its way (it will find the tombstone and fail), the lock ends up
# free. Returns 1 or 0.
ABANDON_LOCK = _script(
    "allow-oom",
    _HANDOFF,
    """
local held = redis.call('GET', KEYS[1])
if held and holder(held) ~= ARGV[1] and string.sub(held, 1, 1) ~= '~' then return 0 end
redis.call('SET', KEYS[1], '~' .. ARGV[1], 'PX', ARGV[2])
if KEYS[2] then wake(held, nil, KEYS[2], ARGV[2]) end
return 1
""",
)
