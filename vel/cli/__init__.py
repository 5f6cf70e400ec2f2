"""The ``vel`` command (also ``python -m vel``).

Configuration comes from flags and the same environment variables as the library
(``POSTGRES_DSN``, ``REDIS_URL``, ``VEL_*``). Errors are printed as one line, not a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence

from vel.bounds import LEASE, PORT, WAIT, cli
from vel.cli import doctor, sessions, stats, warm
from vel.cli._common import (
    Parser,
    add_command,
    add_connection_flags,
    need_dsn,
    placement_of,
    settings_from,
)
from vel.errors import VelError
from vel.logs import get_logger
from vel.redaction import redact
from vel.settings import load_settings

# `vel --help` shows this as plain text (the module docstring is reStructuredText).
DESCRIPTION = (
    "Operate vel's session stores: Postgres migrations, the write-behind flusher, sessions, "
    "warming, statistics and checks. Flags override the environment (POSTGRES_DSN, REDIS_URL, "
    "VEL_KEY_PREFIX and the other VEL_* variables the library reads)."
)


async def _migrate(args: argparse.Namespace) -> int:
    from vel.cli._pg import connection
    from vel.stores.postgres.migrate import latest_version, migrate, schema_version

    settings = settings_from(args)
    dsn = need_dsn(settings)
    placement = placement_of(settings)
    if args.show:
        async with connection(dsn, placement) as conn:
            version = await schema_version(conn)
        print(
            f"{placement.describe()}: schema version {version} "
            f"(this vel expects {latest_version()})"
        )
        return 0
    version = await migrate(dsn, placement.schema)
    print(f"vel schema at version {version} in {placement.describe()} ({redact(dsn)})")
    return 0


async def _flusher(args: argparse.Namespace) -> int:
    from vel.metrics import MetricsServer
    from vel.stores.postgres import PostgresStore
    from vel.stores.redis import RedisStore
    from vel.stores.tiered import Flusher

    settings = settings_from(args)
    need_dsn(settings)
    hot = RedisStore.from_settings(settings, write_behind=True)
    cold = PostgresStore.from_settings(settings)
    lease = settings.flush_lease if args.lease is None else args.lease
    flusher = Flusher(hot, cold, lease=lease, sweep_interval=settings.flush_interval)
    stopping = asyncio.Event()

    def stop() -> None:
        stopping.set()
        flusher.stop()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    await hot.ping()
    await cold.open()

    async def figures() -> dict[str, float]:
        unflushed, oldest, dirty = await hot.backlog()
        return {
            "unflushed_messages": unflushed,
            "oldest_dirty_age": round(oldest, 3),
            "dirty_sessions": dirty,
            "conflict_sessions": await hot.conflict_count(),
            **flusher.counters,
        }

    metrics = None
    if args.metrics_port is not None:
        metrics = MetricsServer(figures, args.metrics_port, args.metrics_host)
        await metrics.start()
    where = f", metrics on {metrics.host}:{metrics.port}/metrics" if metrics else ""
    print(f"vel flusher running: {hot!r} -> {cold!r}{where}", flush=True)

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
                health = await figures()
            except VelError as exc:
                print(json.dumps({"error": redact(exc), **flusher.counters}), flush=True)
                continue
            print(json.dumps({"unflushed": health.pop("unflushed_messages"), **health}), flush=True)

    reporter = asyncio.create_task(report()) if args.health_interval > 0 else None
    try:
        await flusher.run()
        drained = await flusher.drain(args.drain_timeout)
        await flusher.totals.publish()
        print(
            f"vel flusher stopped ({'drained' if drained else 'backlog left for others'})",
            flush=True,
        )
    finally:
        stopping.set()
        if reporter is not None:
            await reporter
        if metrics is not None:
            await metrics.aclose()
        await hot.aclose()
        await cold.aclose()
    return 0


async def _demo(args: argparse.Namespace) -> int:
    from vel.demo import run_demo

    return await run_demo(storage=args.storage, session_id=args.session_id, worker=args.worker)


def _parser() -> argparse.ArgumentParser:
    parser = Parser(prog="vel", description=DESCRIPTION)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument(
        "--log-format", choices=("text", "json"), help="log lines (default: VEL_LOG_FORMAT)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = add_command(sub, "migrate", "apply the Postgres schema migrations")
    add_connection_flags(p, redis=False)
    p.add_argument("--show", action="store_true", help="only print the schema version")
    p.set_defaults(run=_migrate)

    p = add_command(sub, "flusher", "run a standalone write-behind flusher until SIGTERM")
    add_connection_flags(p)
    p.add_argument(
        "--lease",
        type=cli(LEASE, "--lease"),
        default=None,
        help="claim lease in seconds (default: VEL_FLUSH_LEASE, 3)",
    )
    p.add_argument(
        "--drain-timeout",
        type=cli(WAIT, "--drain-timeout"),
        default=30.0,
        help="seconds spent flushing what is left after SIGTERM",
    )
    p.add_argument(
        "--health-interval",
        type=cli(WAIT, "--health-interval"),
        default=10.0,
        help="seconds between JSON health lines (0: none)",
    )
    p.add_argument(
        "--metrics-port",
        type=cli(PORT, "--metrics-port"),
        help="serve Prometheus metrics on this port (0: any free; default: no metrics server)",
    )
    p.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        help="address the metrics server listens on (0.0.0.0: every interface)",
    )
    p.set_defaults(run=_flusher)

    sessions.register(sub)
    warm.register(sub)
    stats.register(sub)
    doctor.register(sub)

    p = add_command(sub, "demo", "a multi-turn conversation with session memory")
    p.add_argument(
        "--storage",
        default="auto",
        help="memory, database, redis, or auto (redis when the services answer)",
    )
    p.add_argument(
        "--session-id", help="join this session (several workers can share one conversation)"
    )
    p.add_argument("--worker", help="name printed on this worker's lines")
    p.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    started = time.monotonic()
    try:
        from vel.logs import configure_logging

        fmt = args.log_format or load_settings().log_format
        configure_logging(logging.INFO if args.verbose else logging.WARNING, fmt)
        return int(asyncio.run(args.run(args)))
    except VelError as exc:
        print(f"vel {args.command}: {redact(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`vel sessions export | head`): not an error worth a line.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:
        if args.verbose:
            raise
        print(
            f"vel {args.command}: unexpected {type(exc).__name__}: {redact(exc)} "
            "(run `vel -v ...` for the traceback)",
            file=sys.stderr,
        )
        return 1
    finally:
        get_logger("vel.cli").info("%s took %.2f s", args.command, time.monotonic() - started)
