"""Workers starting together with ``VEL_MIGRATE=1`` on a fresh schema (issue 13, failing
input 8). Each round creates nothing but an empty schema (or, for a namespace, nothing at all),
starts N worker processes that wait for one start instant, and has each open the store from
the environment, append and read back. Every worker must succeed.

Used by tests/test_migrate_race.py (a reduced count) and ``scripts/migrate-race`` (8 workers,
20 rounds), as ``python tests/migrate_race.py --workers 8 --rounds 20``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"

WORKER = r"""
import asyncio, json, os, sys, time
start = float(sys.argv[1])
from vel.stores.postgres import PostgresStore

async def main():
    store = PostgresStore()
    try:
        time.sleep(max(0.0, start - time.time()))
        try:
            await store.append("s-" + str(os.getpid()), [{"role": "user", "content": "hi"}])
            loaded = await store.load("s-" + str(os.getpid()))
            print(json.dumps({"ok": loaded == [{"role": "user", "content": "hi"}]}))
        except Exception as exc:
            print(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}))
    finally:
        await store.aclose()

asyncio.run(main())
"""


@dataclass
class Round:
    schema: str
    failures: list[str]


def _env(dsn: str, *, search_path: str | None, prefix: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VEL_")}
    env.update(PYTHONUNBUFFERED="1", VEL_MIGRATE="1", VEL_OP_TIMEOUT="20")
    env["POSTGRES_DSN"] = dsn if search_path is None else f"{dsn}?search_path={search_path}"
    if prefix is not None:
        env["VEL_KEY_PREFIX"] = prefix
    return env


async def _sql(dsn: str, statement: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


def one_round(dsn: str, workers: int, *, namespace: bool) -> Round:
    """One start-up race; the schema is dropped afterwards."""
    from vel.namespace import schema_for_prefix

    tag = uuid.uuid4().hex[:10]
    if namespace:
        # A namespace's schema does not exist yet: the migrators create it too.
        prefix = f"race{tag}"
        schema = schema_for_prefix(prefix)
        assert schema is not None
        env = _env(dsn, search_path=None, prefix=prefix)
    else:
        schema = f"race_{tag}"
        asyncio.run(_sql(dsn, f'CREATE SCHEMA "{schema}"'))
        env = _env(dsn, search_path=schema, prefix=None)
    start = time.time() + 2.0 + 0.1 * workers  # every process imported vel by then
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, repr(start)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(workers)
    ]
    failures: list[str] = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
            if proc.returncode != 0 or not lines or not lines[-1]["ok"]:
                detail = lines[-1].get("error") if lines else err.strip().splitlines()[-1:]
                failures.append(f"exit {proc.returncode}: {detail}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        asyncio.run(_sql(dsn, f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    return Round(schema, failures)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default=os.environ.get("VEL_TEST_POSTGRES_DSN", DEFAULT_DSN))
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    failed = 0
    for i in range(args.rounds):
        result = one_round(args.dsn, args.workers, namespace=bool(i % 2))
        failed += len(result.failures)
        status = "ok" if not result.failures else f"{len(result.failures)} failed"
        print(f"round {i + 1}/{args.rounds} ({result.schema}): {status}", flush=True)
        for failure in result.failures:
            print(f"  {failure}", flush=True)
    total = args.workers * args.rounds
    print(json.dumps({"workers": args.workers, "rounds": args.rounds, "failed": failed,
                      "total": total}))  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    raise SystemExit(main())
