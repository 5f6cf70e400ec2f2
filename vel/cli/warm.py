"""``vel warm``: load sessions from Postgres into Redis before traffic needs them (after a
Redis restart or failover, say), so the first turns do not each pay a Postgres read."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from vel.bounds import COUNT, POOL, cli
from vel.cli._common import (
    Progress,
    add_command,
    add_connection_flags,
    need_dsn,
    open_backends,
    read_input,
)
from vel.messages import validate_session_id
from vel.namespace import Placement


async def _ids(args: argparse.Namespace, dsn: str, placement: Placement) -> list[str]:
    from vel.cli._pg import ALL_PAGE, RECENT, connection

    if args.ids or args.ids_file:
        ids = list(args.ids or [])
        if args.ids_file:
            ids += read_input(args.ids_file).split()
        return [validate_session_id(s) for s in dict.fromkeys(ids)]
    async with connection(dsn, placement) as conn:
        if args.recent is not None:
            return [r["id"] for r in await conn.fetch(RECENT, args.recent)]
        found: list[str] = []
        last = ""
        while True:
            page = [r["id"] for r in await conn.fetch(ALL_PAGE, last, 1000)]
            found += page
            if len(page) < 1000:
                return found
            last = page[-1]


async def cmd_warm(args: argparse.Namespace) -> int:
    args.storage = "redis"
    async with open_backends(args) as b:
        tiered = b.tiered
        assert tiered is not None
        ids = await _ids(args, need_dsn(b.settings), b.placement)
        progress = Progress(len(ids), "warming")
        before = dict(tiered.counters)
        gate = asyncio.Semaphore(args.concurrency)

        async def one(sid: str) -> None:
            async with gate:
                await tiered.warm(sid)
                progress.advance()

        try:
            await asyncio.gather(*(one(sid) for sid in ids))
        finally:
            progress.close()
            await tiered.totals.publish()
    loaded = tiered.counters["warm_loads_ok"] - before["warm_loads_ok"]
    already = tiered.counters["warm_loads_exists"] - before["warm_loads_exists"]
    print(
        f"warmed {len(ids)} sessions: {int(loaded)} loaded from Postgres, "
        f"{int(already)} already in Redis"
    )
    return 0


def register(sub: Any) -> None:
    p = add_command(sub, "warm", "load sessions from Postgres into Redis")
    add_connection_flags(p)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--ids", nargs="+", metavar="ID", help="these sessions")
    which.add_argument("--ids-file", help="a file of session ids (whitespace-separated)")
    which.add_argument(
        "--recent",
        type=cli(COUNT, "--recent"),
        metavar="N",
        help="the N most recently updated sessions",
    )
    which.add_argument("--all", action="store_true", help="every live session")
    p.add_argument(
        "--concurrency",
        type=cli(POOL, "--concurrency"),
        default=16,
        help="sessions loaded at the same time",
    )
    p.set_defaults(run=cmd_warm)
