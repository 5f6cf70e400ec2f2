"""Many workers, one tiered store: turns/s, Postgres load per message and connections used.

For each Redis topology (a single Redis, a 3-master + 3-replica Redis Cluster) and each worker
count (default 1, 2, 4, 8), N worker processes share ``--sessions`` sessions through
``session_storage='redis'`` (Redis + write-behind Postgres, the embedded flusher running in
every worker). Each worker runs ``--tasks`` concurrent agent-shaped turns for ``--duration``
seconds: take the session's turn lock, read the last 20 messages, append a user message
(~300 B) and an answer (~800 B) in one append, release the lock.

Everything runs on servers this script starts on free loopback ports and stops by pid (the
shared 6379/5432 are not used): a Postgres cluster (``initdb``), a Redis, a Redis Cluster.
Postgres being private makes its counters exact: ``pg_stat_database.xact_commit`` is the
number of Postgres transactions of the run, ``pg_stat_activity`` (by ``application_name``) the
connections of each worker; Redis' ``CLIENT LIST`` gives the connections per node.

    scripts/scale [--workers 1,2,4,8] [--sessions 1000] [--duration 8] [--tasks 16]
                  [--redis-pool 8] [--pg-pool 4] [--modes single,cluster]
                  [--flush-interval 0.1] [--rate 400]

``--rate`` offers a fixed total load (turns/s over all workers), so runs with different worker
counts do the same work and their Postgres figures compare directly.
Every session gets one turn (flushed) before the clock starts, so the runs measure hot,
steady-state turns. Prints one JSON line per run and a table; writes
``/tmp/vel-figures/scale.json`` (``scale_flush_interval.json`` with ``--flush-interval``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

USER = {"role": "user", "content": "u" * 280}
ASSISTANT = {"role": "assistant", "content": "a" * 780}
FIGURES = Path("/tmp/vel-figures")


# -- the worker process ------------------------------------------------------------------


async def worker(args: argparse.Namespace) -> int:
    from vel.stores import open_store
    from vel.stores.tiered import TieredStore

    store = open_store("redis")
    assert isinstance(store, TieredStore), store
    sessions = [f"s{k:05d}" for k in range(args.sessions)]
    turns = errors = 0
    try:
        await store.hot.ping()
        await store.cold.open()
        print(json.dumps({"event": "ready", "pid": os.getpid()}), flush=True)
        line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        if line.strip() != "go":
            return 3
        rng = random.Random(os.getpid())
        began = time.monotonic()
        deadline = began + args.duration

        # With --rate, each task keeps its share of the offered load on an absolute schedule.
        interval = args.tasks * args.workers_total / args.rate if args.rate > 0 else 0.0

        async def task(t: int) -> None:
            nonlocal turns, errors
            i = 0
            while time.monotonic() < deadline:
                if interval:
                    delay = began + (i + t / args.tasks) * interval - time.monotonic()
                    i += 1
                    if delay > 0:
                        await asyncio.sleep(delay)
                    if time.monotonic() >= deadline:
                        break
                sid = rng.choice(sessions)
                try:
                    async with store.turn_lock(sid, timeout=10):
                        await store.load(sid, 20)
                        await store.append(sid, [USER, ASSISTANT])
                    turns += 1
                except Exception as exc:  # counted and shown: the run goes on
                    errors += 1
                    if errors <= 3:
                        print(json.dumps({"event": "error", "error": repr(exc)}), flush=True)

        await asyncio.gather(*(task(t) for t in range(args.tasks)))
        elapsed = time.monotonic() - began
        stats = await store.stats()
    finally:
        closing = time.monotonic()
        await store.aclose()  # drains this worker's share of the backlog
    print(
        json.dumps(
            {
                "event": "done",
                "turns": turns,
                "errors": errors,
                "elapsed": elapsed,
                "close_seconds": time.monotonic() - closing,
                "stats": stats,
            }
        ),
        flush=True,
    )
    return 0


# -- the driver --------------------------------------------------------------------------


def redis_clients(ports: list[int]) -> dict[int, int]:
    """Normal client connections on each node, not counting replication links or ours."""
    import redis

    counts = {}
    for port in ports:
        client = redis.Redis(host="127.0.0.1", port=port, client_name="vel-scale-probe")
        try:
            listed = client.client_list()
        finally:
            client.close()
        counts[port] = sum(
            1 for c in listed if c.get("name") != "vel-scale-probe" and "N" in c.get("flags", "")
        )
    return counts


def tcp_connections(pid: int) -> dict[int, int]:
    """Established TCP connections of process ``pid``, counted by remote port (Linux)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    counts: dict[int, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "01" and fields[9] in inodes:
                port = int(fields[2].rsplit(":", 1)[1], 16)
                counts[port] = counts.get(port, 0) + 1
    return counts


async def pg_commits(dsn: str) -> int:
    """``xact_commit`` of the run's database (this Postgres serves nothing else)."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SELECT pg_stat_clear_snapshot()")
        commits = await conn.fetchval(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        )
    finally:
        await conn.close()
    return int(commits)


async def seed(pg_dsn: str, schema: str, redis_url: str, prefix: str, sessions: int) -> None:
    """Give every session one flushed turn, so the run measures hot, steady-state turns (no
    warm loads from Postgres inside the measured window)."""
    from vel.stores.postgres import PostgresStore
    from vel.stores.redis import RedisStore
    from vel.stores.tiered import TieredStore

    store = TieredStore(
        RedisStore(redis_url, key_prefix=prefix, write_behind=True, flush_delay=0),
        PostgresStore(pg_dsn, schema=schema),
        flusher=False,
    )
    try:
        sids = [f"s{k:05d}" for k in range(sessions)]
        for i in range(0, len(sids), 100):
            await asyncio.gather(*(store.append(s, [USER, ASSISTANT]) for s in sids[i : i + 100]))
        assert await store.flush(60), "seeding did not flush"
    finally:
        await store.aclose()


def spawn(argv: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def write_figures(data: dict[str, Any]) -> None:
    FIGURES.mkdir(exist_ok=True)
    name = "scale"
    if data["meta"]["rate"]:
        name += f"_rate{int(data['meta']['rate'])}"
    if data["meta"]["flush_interval"]:
        name += "_flush_interval"
    (FIGURES / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")


async def run_once(
    args: argparse.Namespace, mode: str, redis_url: str, node_ports: list[int], pg_dsn: str, n: int
) -> dict[str, Any]:
    pg_port = int(pg_dsn.rsplit(":", 1)[1].split("/")[0])
    import asyncpg

    from vel.stores.postgres.migrate import migrate

    schema = f"scale_{uuid.uuid4().hex[:10]}"
    prefix = f"scale-{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute(f'CREATE SCHEMA "{schema}"')
    finally:
        await conn.close()
    await migrate(pg_dsn, schema=schema)
    await seed(pg_dsn, schema, redis_url, prefix, args.sessions)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VEL_")}
    env.update(
        POSTGRES_DSN=f"{pg_dsn}?search_path={schema}",
        REDIS_URL=redis_url,
        VEL_KEY_PREFIX=prefix,
        VEL_REDIS_POOL_MAX=str(args.redis_pool),
        VEL_PG_POOL_MAX=str(args.pg_pool),
        VEL_FLUSH_INTERVAL=str(args.flush_interval),
        PYTHONUNBUFFERED="1",
    )
    argv = [sys.executable, __file__, "worker", "--sessions", str(args.sessions)]
    argv += ["--duration", str(args.duration), "--tasks", str(args.tasks)]
    argv += ["--rate", str(args.rate), "--workers-total", str(n)]
    procs = [spawn(argv, env) for _ in range(n)]
    try:
        for p in procs:
            assert p.stdout is not None
            ready = json.loads(p.stdout.readline())
            assert ready.get("event") == "ready", ready
        await asyncio.sleep(1.5)  # let the stats of the set-up transactions reach pg_stat
        commits_before = await pg_commits(pg_dsn)
        started = time.monotonic()
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        # Connections of each worker, sampled several times mid-run (the peak is kept).
        redis_conns = dict.fromkeys(node_ports, 0)
        worker_redis_max = worker_pg_max = 0
        for _ in range(5):
            await asyncio.sleep(args.duration * 0.15)
            for port, count in redis_clients(node_ports).items():
                redis_conns[port] = max(redis_conns[port], count)
            for p in procs:
                conns = tcp_connections(p.pid)
                worker_redis_max = max([worker_redis_max, *(conns.get(q, 0) for q in node_ports)])
                worker_pg_max = max(worker_pg_max, conns.get(pg_port, 0))
        results = []
        for p in procs:
            out, _ = await asyncio.to_thread(p.communicate, timeout=args.duration + 120)
            lines = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
            done = [x for x in lines if x.get("event") == "done"]
            assert p.returncode == 0 and done, f"worker failed: {lines[-3:]}"
            done[0]["first_errors"] = [x["error"] for x in lines if x.get("event") == "error"]
            results.append(done[0])
        wall = time.monotonic() - started
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    await asyncio.sleep(1.5)  # exited backends' stats reach pg_stat_database
    commits_after = await pg_commits(pg_dsn)

    conn = await asyncpg.connect(pg_dsn)
    try:
        # Minus the seeded turn of every session.
        stored = await conn.fetchval(f'SELECT count(*) FROM "{schema}".vel_messages')
        stored -= 2 * args.sessions
        await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
    finally:
        await conn.close()

    turns = sum(r["turns"] for r in results)
    elapsed = max(r["elapsed"] for r in results)
    messages = 2 * turns
    stat = lambda name: sum(int(r["stats"].get(name, 0)) for r in results)  # noqa: E731
    pg_xacts = commits_after - commits_before
    return {
        "redis": mode,
        "workers": n,
        "sessions": args.sessions,
        "tasks_per_worker": args.tasks,
        "flush_interval": args.flush_interval,
        "offered_turns_per_s": args.rate or None,
        "turns": turns,
        "errors": sum(r["errors"] for r in results),
        "first_errors": [e[:300] for r in results for e in r["first_errors"]][:4],
        "turns_per_s": round(turns / elapsed, 1),
        "wall_s": round(wall, 2),
        "messages_acknowledged": messages,
        "messages_in_postgres": int(stored),
        "postgres_xacts": pg_xacts,
        "postgres_xacts_per_1000_messages": round(1000 * pg_xacts / max(messages, 1), 1),
        "postgres_xacts_per_s": round(pg_xacts / elapsed, 1),
        "flush_batches_per_s": round(stat("flush_batches_ok") / elapsed, 1),
        "flush_batches": stat("flush_batches_ok"),
        "flush_batches_per_1000_messages": round(
            1000 * stat("flush_batches_ok") / max(messages, 1), 1
        ),
        "messages_per_flush_batch": round(
            stat("flushed_messages") / max(stat("flush_batches_ok"), 1), 1
        ),
        "warm_loads": stat("postgres_loads"),
        "flush_duplicates_suppressed": stat("flush_duplicates_suppressed"),
        "flush_batches_failed": stat("flush_batches_failed"),
        "flush_sweeps_skipped": stat("flush_sweeps_skipped"),
        "redis_conns_per_node": redis_conns,
        "redis_conns_per_worker_per_node_max": worker_redis_max,
        "redis_pool_budget_per_node": args.redis_pool,
        "pg_conns_per_worker_max": worker_pg_max,
        "pg_pool_budget": args.pg_pool,
    }


async def drive(args: argparse.Namespace) -> int:
    from cluster import RedisClusterServers
    from servers import PostgresServer, RedisServer

    counts = [int(x) for x in args.workers.split(",")]
    modes = args.modes.split(",")
    rows: list[dict[str, Any]] = []
    with PostgresServer() as pg:
        for mode in modes:
            if mode == "single":
                server: Any = RedisServer("--appendonly", "no")
                ctx: Any = server
            elif mode == "cluster":
                server = RedisClusterServers()
                ctx = server
            else:
                raise SystemExit(f"unknown mode {mode!r}")
            with ctx:
                if mode == "single":
                    url, ports = server.url, [server.port]
                else:
                    url = server.url
                    ports = [n.port for n in server.nodes]
                for n in counts:
                    row = await run_once(args, mode, url, ports, pg.dsn, n)
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    meta = {
        "machine": f"{os.cpu_count()} cores, shared with other test runs: noisy figures",
        "duration_s": args.duration,
        "flush_interval": args.flush_interval,
        "rate": args.rate,
    }
    write_figures({"meta": meta, "runs": rows})
    print()
    head = (
        "| redis | workers | turns/s | msgs acked | in PG | PG xacts/s | PG xacts/1k msgs "
        "| flush batches/s | msgs/batch | dup suppressed | Redis conns/worker/node (budget) "
        "| PG conns/worker (budget) |"
    )
    print(head)
    print("|" + "---|" * 12)
    for r in rows:
        print(
            f"| {r['redis']} | {r['workers']} | {r['turns_per_s']} | "
            f"{r['messages_acknowledged']} | {r['messages_in_postgres']} | "
            f"{r['postgres_xacts_per_s']} | {r['postgres_xacts_per_1000_messages']} | "
            f"{r['flush_batches_per_s']} | {r['messages_per_flush_batch']} | "
            f"{r['flush_duplicates_suppressed']} | "
            f"{r['redis_conns_per_worker_per_node_max']} ({r['redis_pool_budget_per_node']}) | "
            f"{r['pg_conns_per_worker_max']} ({r['pg_pool_budget']}) |"
        )
    # An append that failed (timeout) may still have been stored; an acknowledged one that
    # is missing is a loss.
    bad = [r for r in rows if r["messages_in_postgres"] < r["messages_acknowledged"]]
    return 1 if bad else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", nargs="?", default="drive", choices=["drive", "worker"])
    parser.add_argument("--workers", default="1,2,4,8")
    parser.add_argument("--modes", default="single,cluster")
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--redis-pool", type=int, default=8)
    parser.add_argument("--pg-pool", type=int, default=4)
    parser.add_argument("--rate", type=float, default=0.0, help="offered turns/s in all")
    parser.add_argument("--workers-total", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument(
        "--flush-interval", type=float, default=0.0, help="VEL_FLUSH_INTERVAL of the workers"
    )
    args = parser.parse_args()
    return asyncio.run(worker(args) if args.command == "worker" else drive(args))


if __name__ == "__main__":
    sys.exit(main())
