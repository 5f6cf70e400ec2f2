"""How a window is read from a session's Redis copy: the header script (HEAD, LOCK_HEAD) and
the window's LRANGE in one MULTI/EXEC, so the messages never pass through Lua, and the
whole-script reads (LOAD, LOCK_LOAD) this falls back on.

Measured for issue 14 (docs/benchmarks.md): 20 messages of 1 KB copied into Lua strings and
back cost Redis about 20 us of a locked turn's ~115; the MULTI costs the client about 10.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis import exceptions as rexc

from vel.stores.redis.direct import Script


async def read_window(
    head: Script, full: Script, keys: Sequence[str], args: Sequence[Any], limit: int
) -> list[Any]:
    """A LOAD-shaped reply (``{seq, base, gen, rev, items...}`` or one negative code) from
    ``full`` (LOAD, LOCK_LOAD) or, on a plain client, from its ``head`` twin and an LRANGE of
    the messages (``keys[1]``) in one MULTI/EXEC: the same atomic read, with the items
    kept out of Lua. ``limit`` is ARGV[6] (-1: all). A count that is not what the header
    says (a list evicted without its meta) goes through ``full``, which settles it: taking
    the lock again is idempotent for the same token. So does a Redis out of memory, which
    queues nothing in a MULTI (a read's script runs there all the same: ``allow-oom``), and
    an ACL user without MULTI (the script and LRANGE then ran outside one: their replies are
    ignored)."""
    if not head.direct or limit == 0:
        return list(await full(keys=keys, args=args))
    try:
        reply, items = await head.with_tail(keys, args, keys[1], 0 if limit < 0 else -limit)
    except rexc.OutOfMemoryError:
        return list(await full(keys=keys, args=args))
    except rexc.NoPermissionError as exc:
        if "'multi'" not in str(exc).lower() and "'exec'" not in str(exc).lower():
            raise
        # An ACL user made without +multi +exec: the scripts alone, from now on.
        head.untransacted()
        return list(await full(keys=keys, args=args))
    seq = int(reply[0])
    if seq < 0:
        return list(reply)
    held = seq - int(reply[1])
    if len(items) == (held if limit < 0 else min(limit, held)):
        return [*reply, *items]
    return list(await full(keys=keys, args=args))
