"""Process and event-loop lifecycle at full size (issue 12; docs/reliability.md, "Lifecycle").

Subcommands (each prints one JSON object of figures; ``all`` runs the three):

``exit``
    The spec's usage (``asyncio.run(main())``, one turn, no ``aclose()``) as N fresh
    processes per storage mode: how many exited, hung (still alive 10 s after ``main()``
    returned: stacks dumped, killed) or failed, and the delay from ``main()`` returning to
    the exit (p50, p99, max). Pass: every process exits within 2 s.
``cancel-pg``
    Cancellations of Postgres operations (clear, replace, apply_flushes, apply_clear) until
    N of them were cancelled: ``asyncio.timeout`` and ``task.cancel()`` at random moments
    (connect, acquire, statement, commit; half of them while another connection holds the
    session row) and ``op_timeout`` expiring on a held row. Pass: every cancelled call
    raised TimeoutError / CancelledError (StoreTimeoutError for op_timeout), never
    StoreUnavailableError or anything else.
``many-loops``
    One Agent driven by N successive ``asyncio.run()`` calls (two turns each) in 'database'
    and 'redis' mode, as one process: sockets held after each run and after ``aclose()``,
    and the seconds until Postgres holds every message. Pass: sockets bounded by the pool
    sizes, every message in Postgres within 5 s of ``aclose()``.

Runs against the services of ``scripts/services.sh`` (POSTGRES_DSN / REDIS_URL, or the test
defaults), in a schema and key prefix of its own, removed afterwards. Usage::

    .venv/bin/python scripts/lifecycle.py all --procs 200 --cancels 600 --loops 50
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import random
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from userscripts import MANY_LOOPS, Exit, run_script, spec_usage  # noqa: E402

from vel.errors import StoreTimeoutError  # noqa: E402
from vel.stores.postgres import FlushBatch, PostgresStore  # noqa: E402
from vel.stores.postgres.migrate import migrate  # noqa: E402
from vel.testing import FakeOpenAIServer  # noqa: E402

PG_DSN = os.environ.get("POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
EXIT_BOUND = 2.0


def schema_dsn(schema: str) -> str:
    return f"{PG_DSN}{'&' if '?' in PG_DSN else '?'}search_path={schema}"


def child_env(schema: str, prefix: str, openai_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VEL_", "OPENAI_"))}
    env.update(
        POSTGRES_DSN=schema_dsn(schema),
        REDIS_URL=REDIS_URL,
        VEL_KEY_PREFIX=prefix,
        OPENAI_BASE_URL=openai_url,
        OPENAI_API_KEY="test-key",
        PYTHONUNBUFFERED="1",
    )
    return env


def spread(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    return {
        "p50": round(statistics.median(ordered), 3),
        "p99": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 3),
        "max": round(ordered[-1], 3),
    }


# -- exit ------------------------------------------------------------------------------------


def exit_figures(procs: int, parallel: int, env: dict[str, str], work: Path) -> dict[str, Any]:
    script = work / "spec_usage.py"
    script.write_text(spec_usage())
    figures: dict[str, Any] = {}
    for mode in ("memory", "database", "redis"):

        def one(i: int, mode: str = mode) -> Exit:
            sid = f"exit-{mode}-{i}-{uuid.uuid4().hex[:6]}"
            return run_script(script, {**env, "VEL_TEST_MODE": mode, "VEL_TEST_SESSION": sid})

        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
            exits = list(pool.map(one, range(procs)))
        delays = [e.delay for e in exits if e.delay is not None]
        hung = [e for e in exits if e.hung]
        failed = [e for e in exits if e.returncode != 0 and not e.hung]
        figures[mode] = {
            "processes": procs,
            "exited": sum(e.returncode == 0 for e in exits),
            "hung": len(hung),
            "failed": len(failed),
            "over_2s": sum(d >= EXIT_BOUND for d in delays),
            "exit_delay_s": spread(delays),
            # Of which the loop's shutdown (vel's part); the rest is interpreter teardown.
            "loop_shutdown_s": spread(
                [e.loop_shutdown for e in exits if e.loop_shutdown is not None]
            ),
            "warned_unflushed": sum("stays in Redis" in e.stderr for e in exits),
            "minutes": round((time.monotonic() - started) / 60, 1),
        }
        for e in (hung + failed)[:2]:
            print(f"--- {mode}: {e.describe()}", file=sys.stderr)
        print(json.dumps({mode: figures[mode]}), file=sys.stderr)
    return figures


# -- cancel-pg -------------------------------------------------------------------------------

Op = Callable[[PostgresStore, str], Awaitable[Any]]


def _flush(store: PostgresStore, sid: str) -> Awaitable[Any]:
    rows = [
        (seq, f"{sid}-m{seq}", json.dumps({"role": "user", "content": f"m{seq}"})) for seq in (1, 2)
    ]
    return store.apply_flushes([FlushBatch(sid, 1, rows)])


OPS: dict[str, Op] = {
    "clear": lambda store, sid: store.clear(sid),
    "replace": lambda store, sid: store.replace(
        sid, [{"role": "user", "content": f"r{i}"} for i in range(20)]
    ),
    "apply_flushes": _flush,
    "apply_clear": lambda store, sid: store.apply_clear(sid, 1),
}


async def _locked_row(dsn: str, sid: str) -> asyncpg.Connection:
    conn = await asyncpg.connect(dsn)
    await conn.execute("BEGIN")
    await conn.execute("SELECT 1 FROM vel_session_rows WHERE id = $1 FOR UPDATE", sid)
    return conn


async def _release_row(conn: asyncpg.Connection) -> None:
    await conn.execute("ROLLBACK")
    await conn.close()


async def cancel_figures(cancels: int, schema: str) -> dict[str, Any]:
    dsn = schema_dsn(schema)
    loop = asyncio.get_running_loop()
    problems: list[str] = []

    def handler(_: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        # asyncpg's own: a connection attempt cancelled mid-TLS negotiation leaves a future
        # it never retrieves (MagicStack/asyncpg#1211, #1310); harmless, not vel's.
        if isinstance(exc, ConnectionError) and "unexpected connection_lost()" in str(exc):
            return
        problems.append(str(context.get("message")))

    loop.set_exception_handler(handler)
    store = PostgresStore(dsn, op_timeout=10)
    short = PostgresStore(dsn, op_timeout=0.2)
    rng = random.Random(20261130)
    sids = {name: f"cpg-{name}-{uuid.uuid4().hex[:6]}" for name in OPS}
    for name, sid in sids.items():
        await OPS[name](store, sid)  # the session row exists, so it can be held
    durations = {}
    for name, sid in sids.items():
        await store.aclose()  # timed with a connect: a cancelled call's successor needs one
        started = loop.time()
        await OPS[name](store, sid)
        durations[name] = loop.time() - started
    outcomes: dict[str, dict[str, int]] = {}
    cancelled = trials = 0
    kinds = ("asyncio.timeout", "task.cancel", "op_timeout")
    while cancelled < cancels and trials < 5 * cancels:
        kind = kinds[trials % 3]
        name = list(OPS)[(trials // 3) % len(OPS)]
        sid = sids[name]
        held = kind == "op_timeout" or rng.random() < 0.5
        trials += 1
        lock = await _locked_row(dsn, sid) if held else None
        moment = rng.uniform(0, 0.3 if held else 1.5 * durations[name])
        try:
            if kind == "asyncio.timeout":
                async with asyncio.timeout(moment):
                    await OPS[name](store, sid)
            elif kind == "task.cancel":
                task = asyncio.ensure_future(OPS[name](store, sid))
                await asyncio.sleep(moment)
                task.cancel()
                await task
            else:
                await OPS[name](short, sid)
            got = "completed"
        except (TimeoutError, asyncio.CancelledError, StoreTimeoutError) as exc:
            got = type(exc).__name__
        except Exception as exc:
            got = f"{type(exc).__name__}: {exc}"[:160]
        finally:
            if lock is not None:
                await _release_row(lock)
        cancelled += got != "completed"
        counts = outcomes.setdefault(kind, {})
        counts[got] = counts.get(got, 0) + 1
    await store.aclose()
    await short.aclose()
    expected = {"completed", "TimeoutError", "CancelledError", "StoreTimeoutError"}
    wrong = sum(n for c in outcomes.values() for k, n in c.items() if k not in expected)
    return {
        "trials": trials,
        "cancelled": cancelled,
        "as_cancellation": cancelled - wrong,
        "wrong": wrong,
        "outcomes": outcomes,
        "loop_errors": problems[:5],
        "python": sys.version.split()[0],
    }


# -- many-loops ------------------------------------------------------------------------------


def loops_figures(loops: int, env: dict[str, str], schema: str, work: Path) -> dict[str, Any]:
    script = work / "many_loops.py"
    script.write_text(MANY_LOOPS)
    figures: dict[str, Any] = {}
    for mode in ("database", "redis"):
        prefix = f"loops-{mode}-{uuid.uuid4().hex[:6]}"
        done = run_script(
            script,
            {**env, "VEL_TEST_MODE": mode, "VEL_TEST_SESSION": prefix, "VEL_TEST_RUNS": str(loops)},
            timeout=600,
            hang_after=30,
        )
        if done.returncode != 0:
            figures[mode] = {"failed": done.describe()[-2000:]}
            continue
        report = json.loads(done.stdout.strip().splitlines()[-1])
        stored, waited = report["stored"], report["stored_after"]
        figures[mode] = {
            "runs": loops,
            "sockets_after_run_max": max(report["after_run"]),
            "sockets_after_run_last": report["after_run"][-1],
            "sockets_after_aclose": report["after_aclose"],
            "messages": 4 * loops,
            "in_postgres": stored,
            "in_postgres_after_s": round(max(0.0, waited), 2),
        }
        print(json.dumps({mode: figures[mode]}), file=sys.stderr)
    return figures


# -- setup -----------------------------------------------------------------------------------


async def _schema(create: bool, schema: str) -> None:
    conn = await asyncpg.connect(PG_DSN)
    try:
        if create:
            await conn.execute(f'CREATE SCHEMA "{schema}"')
        else:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()
    if create:
        await migrate(PG_DSN, schema=schema)


def _drop_keys(prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start : start + 500])
    finally:
        client.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["exit", "cancel-pg", "many-loops", "all"])
    parser.add_argument("--procs", type=int, default=200, help="processes per mode (exit)")
    parser.add_argument("--parallel", type=int, default=2, help="processes at once (exit)")
    parser.add_argument("--cancels", type=int, default=600, help="cancellations (cancel-pg)")
    parser.add_argument("--loops", type=int, default=50, help="asyncio.run calls (many-loops)")
    parser.add_argument("--out", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()
    schema = f"lc_{uuid.uuid4().hex[:10]}"
    prefix = f"lc-{uuid.uuid4().hex[:10]}"
    work = Path(f"/tmp/vel-lifecycle-{prefix}")
    work.mkdir(parents=True, exist_ok=True)
    asyncio.run(_schema(True, schema))
    figures: dict[str, Any] = {"python": sys.version.split()[0], "load_before": os.getloadavg()}
    try:
        with FakeOpenAIServer() as srv:
            env = child_env(schema, prefix, srv.base_url)
            if args.what in ("exit", "all"):
                figures["exit"] = exit_figures(args.procs, args.parallel, env, work)
            if args.what in ("cancel-pg", "all"):
                figures["cancel_pg"] = asyncio.run(cancel_figures(args.cancels, schema))
            if args.what in ("many-loops", "all"):
                figures["many_loops"] = loops_figures(args.loops, env, schema, work)
    finally:
        asyncio.run(_schema(False, schema))
        _drop_keys(prefix)
    figures["load_after"] = os.getloadavg()
    text = json.dumps(figures, indent=2, sort_keys=True)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
