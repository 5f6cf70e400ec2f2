"""The ``vel`` command (also ``python -m vel``).

Configuration comes from flags and the same environment variables as the library
(``POSTGRES_DSN``, ``REDIS_URL``, ``VEL_*``). Errors are printed as one line, not a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

from vel.errors import ConfigurationError, VelError
from vel.settings import Settings, load_settings, redact


def _settings(args: argparse.Namespace) -> Settings:
    settings = load_settings()
    changes: dict[str, Any] = {}
    if getattr(args, "dsn", None):
        changes["postgres_dsn"] = args.dsn
    if getattr(args, "redis_url", None):
        changes["redis_url"] = args.redis_url
    if getattr(args, "prefix", None):
        changes["key_prefix"] = args.prefix
    return dataclasses.replace(settings, **changes)


def _need_dsn(settings: Settings) -> str:
    if not settings.postgres_dsn:
        raise ConfigurationError("POSTGRES_DSN is not set (or pass --dsn)")
    return settings.postgres_dsn


async def _migrate(args: argparse.Namespace) -> int:
    from vel.stores.migrate import migrate, schema_version

    dsn = _need_dsn(_settings(args))
    if args.show:
        import asyncpg

        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            print(f"schema version {await schema_version(conn)}")
        finally:
            await conn.close()
        return 0
    version = await migrate(dsn)
    print(f"vel schema at version {version} ({redact(dsn)})")
    return 0


async def _flusher(args: argparse.Namespace) -> int:
    from vel.flusher import Flusher
    from vel.stores.postgres import PostgresStore
    from vel.stores.redis import RedisStore

    settings = _settings(args)
    _need_dsn(settings)
    hot = RedisStore.from_settings(settings, write_behind=True)
    cold = PostgresStore.from_settings(settings)
    flusher = Flusher(hot, cold, lease=args.lease)
    stopping = asyncio.Event()

    def stop() -> None:
        stopping.set()
        flusher.stop()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    await hot.ping()
    await cold.open()
    print(f"vel flusher running: {hot!r} -> {cold!r}", flush=True)

    async def report() -> None:
        # Ends by itself on stop rather than by cancellation, which a Redis call in flight
        # may not honour promptly.
        while not stopping.is_set():
            try:
                async with asyncio.timeout(args.health_interval):
                    await stopping.wait()
                return
            except TimeoutError:
                pass
            try:
                unflushed, oldest, dirty = await hot.backlog()
            except VelError as exc:
                print(json.dumps({"error": str(exc), **flusher.counters}), flush=True)
                continue
            health = {
                "unflushed": unflushed,
                "oldest_dirty_age": round(oldest, 3),
                "dirty_sessions": dirty,
                **flusher.counters,
            }
            print(json.dumps(health), flush=True)

    reporter = asyncio.create_task(report()) if args.health_interval > 0 else None
    try:
        await flusher.run()
        drained = await flusher.drain(args.drain_timeout)
        print(
            f"vel flusher stopped ({'drained' if drained else 'backlog left for others'})",
            flush=True,
        )
    finally:
        stopping.set()
        if reporter is not None:
            await reporter
        await hot.aclose()
        await cold.aclose()
    return 0


async def _stats(args: argparse.Namespace) -> int:
    from vel.stores.redis import RedisStore

    settings = _settings(args)
    hot = RedisStore.from_settings(settings, write_behind=True)
    try:
        unflushed, oldest, dirty = await hot.backlog()
    finally:
        await hot.aclose()
    figures = {
        "unflushed_messages": unflushed,
        "oldest_dirty_age": round(oldest, 3),
        "dirty_sessions": dirty,
    }
    if args.json:
        print(json.dumps(figures))
    else:
        for name, value in figures.items():
            print(f"{name:20} {value}")
    return 0


async def _demo(args: argparse.Namespace) -> int:
    from vel.demo import run_demo

    return await run_demo(storage=args.storage)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vel", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--dsn", help="Postgres DSN (default: POSTGRES_DSN)")
        p.add_argument("--redis-url", help="Redis URL (default: REDIS_URL)")
        p.add_argument("--prefix", help="Redis key prefix (default: VEL_KEY_PREFIX or vel)")

    p = sub.add_parser("migrate", help="apply the Postgres schema migrations")
    common(p)
    p.add_argument("--show", action="store_true", help="only print the schema version")
    p.set_defaults(run=_migrate)

    p = sub.add_parser("flusher", help="run a standalone write-behind flusher until SIGTERM")
    common(p)
    p.add_argument("--lease", type=float, default=30.0, help="claim lease in seconds")
    p.add_argument("--drain-timeout", type=float, default=30.0)
    p.add_argument(
        "--health-interval",
        type=float,
        default=10.0,
        help="seconds between JSON health lines (0: none)",
    )
    p.set_defaults(run=_flusher)

    p = sub.add_parser("stats", help="print the write-behind backlog")
    common(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_stats)

    p = sub.add_parser("demo", help="a multi-turn conversation with session memory")
    p.add_argument(
        "--storage",
        default="auto",
        help="memory, database, redis, or auto (redis when the services answer)",
    )
    p.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    started = time.monotonic()
    try:
        return int(asyncio.run(args.run(args)))
    except VelError as exc:
        print(f"vel {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        logging.getLogger("vel.cli").info(
            "%s took %.2f s", args.command, time.monotonic() - started
        )
