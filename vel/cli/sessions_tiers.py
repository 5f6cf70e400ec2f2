"""``vel sessions conflicts|resolve|release``: the two tiers' own commands, for mixed modes
(DESIGN.md 3.8): list the sessions whose flush Postgres could not apply, resolve one by keeping
Postgres' history, both, or the Redis copy, and hand a session back to 'database'-mode writers.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime

from vel.bounds import COUNT, cli
from vel.cli._common import open_backends, open_output
from vel.cli.sessions_list import flush_first as _flush_first
from vel.cli.sessions_list import iso as _iso
from vel.messages import validate_session_id


async def cmd_conflicts(args: argparse.Namespace) -> int:
    args.storage = "redis"
    async with open_backends(args) as b:
        assert b.tiered is not None
        found = await b.tiered.hot.conflicts(args.limit)
        postgres = {c.session_id: await b.cold.last_seq(c.session_id) for c in found}
    rows = []
    for c in found:
        held = c.seq - (c.base if c.gen != c.fgen else c.flushed)
        rows.append(
            {
                "id": c.session_id,
                "reason": c.reason,
                "since": _iso(datetime.fromtimestamp(c.since_ms / 1000, UTC)),
                "redis_last_seq": c.seq,
                "redis_only_messages": held,
                "redis_holds_whole_history": c.base == 0,
                "postgres_last_seq": postgres[c.session_id][1],
            }
        )
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    print(f"{'SESSION':40} {'REASON':9} {'SINCE (UTC)':19}  REDIS-ONLY  POSTGRES SEQ")
    for row in rows:
        print(
            f"{row['id']:40} {row['reason']:9} {str(row['since'])[:19].replace('T', ' '):19}  "
            f"{row['redis_only_messages']:>10}  {row['postgres_last_seq']:>12}"
        )
    print(
        f"({len(rows)} sessions in conflict; resolve each with "
        "`vel sessions resolve ID --keep postgres|both|redis`)",
        file=sys.stderr,
    )
    return 0


async def cmd_resolve(args: argparse.Namespace) -> int:
    session_id = validate_session_id(args.session_id)
    args.storage = "redis"
    out = open_output(args.save) if args.save else None
    try:
        async with open_backends(args) as b:
            assert b.tiered is not None
            outcome = await b.tiered.resolve(session_id, args.keep)
        if out is not None and outcome.discarded:
            entry = {
                "id": session_id,
                "messages": [m for _, m in outcome.discarded],
                "message_ids": [mid for mid, _ in outcome.discarded],
            }
            out.write(json.dumps(entry, ensure_ascii=False) + "\n")
    finally:
        if out is not None:
            out.close()
    kept = {"postgres": "Postgres' history", "both": "both", "redis": "the Redis copy"}
    dropped = (
        f", {len(outcome.discarded)} Redis-only messages discarded" if outcome.discarded else ""
    )
    print(f"resolved {session_id}: kept {kept[args.keep]}, {outcome.last_seq} messages{dropped}")
    return 0


async def cmd_release(args: argparse.Namespace) -> int:
    ids = [validate_session_id(s) for s in args.session_ids]
    args.storage = "redis"
    released: list[str] = []
    kept: list[str] = []
    async with open_backends(args) as b:
        assert b.tiered is not None
        await _flush_first(b, args.flush_timeout)
        for sid in ids:
            (released if await b.tiered.release(sid) else kept).append(sid)
    print(f"released {len(released)} sessions to 'database' mode")
    if kept:
        print(f"not released (unflushed or in conflict): {', '.join(kept)}", file=sys.stderr)
        return 1
    return 0


def register(
    base: Callable[..., argparse.ArgumentParser],
    flush_flags: Callable[[argparse.ArgumentParser, bool], None],
) -> None:
    # The two tiers' own commands: they act on the Redis tier and Postgres together.
    p = base(
        "conflicts",
        "sessions whose flush to Postgres could not be applied (redis mode)",
        storage=False,
    )
    p.add_argument(
        "--limit", type=cli(COUNT, "--limit"), default=1000, help="at most this many sessions"
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(run=cmd_conflicts)

    p = base(
        "resolve",
        "resolve a flush conflict: keep Postgres' history, both, or the Redis copy",
        storage=False,
    )
    p.add_argument("session_id", help="the session in conflict")
    p.add_argument(
        "--keep",
        required=True,
        choices=("postgres", "both", "redis"),
        help="postgres: Postgres' history (Redis-only messages discarded); both: Postgres' "
        "history, then the Redis-only messages; redis: the Redis copy, whole",
    )
    p.add_argument("--save", metavar="FILE", help="write discarded messages here (JSON Lines)")
    p.set_defaults(run=cmd_resolve)

    p = base(
        "release",
        "hand sessions from the Redis tier back to 'database'-mode writers",
        storage=False,
    )
    p.add_argument("session_ids", nargs="+", metavar="ID", help="sessions to release")
    flush_flags(p, False)
    p.set_defaults(run=cmd_release)
