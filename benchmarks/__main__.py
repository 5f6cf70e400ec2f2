"""``python -m benchmarks``: run every mode and reference side by side, write JSON, markdown, PNG.

    python -m benchmarks                 # the default run (under 5 minutes on 2 cores)
    python -m benchmarks --quick --out /tmp/b   # a smoke run of about 30 s

Needs Redis (``REDIS_URL``, default ``redis://127.0.0.1:6379/0``) and Postgres
(``POSTGRES_DSN``, default ``postgresql://postgres@127.0.0.1:5432/test``). The run creates its
own Postgres database (so ``pg_stat_database`` counts only its own transactions) with one
schema per mode, and one Redis key prefix per mode; it removes both afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import redis.asyncio as aioredis

from benchmarks import report
from benchmarks.agent_turns import measure_agent
from benchmarks.modes import (
    ALL_MODES,
    POSTGRES_MODES,
    REDIS_MODES,
    REFERENCES,
    create_reference_table,
)
from benchmarks.workload import check_history, turn_messages
from vel.messages import encode_message
from vel.settings import load_settings
from vel.stores.postgres.migrate import migrate

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"
# Workers run ``python -m benchmarks.workload`` from here: the package is not installed.
ROOT = Path(__file__).resolve().parent.parent


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def latency_summary(seconds: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in seconds]
    return {
        "p50_ms": round(percentile(ms, 0.50), 3),
        "p95_ms": round(percentile(ms, 0.95), 3),
        "p99_ms": round(percentile(ms, 0.99), 3),
    }


def with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, f"/{database}", parts.query, parts.fragment))


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        settings = load_settings()
        self.args = args
        self.base_dsn = settings.postgres_dsn or DEFAULT_DSN
        self.redis_url = settings.redis_url
        self.run_id = uuid.uuid4().hex[:8]
        self.database = f"vel_bench_{self.run_id}"
        self.dsn = with_database(self.base_dsn, self.database)
        self.admin: asyncpg.Connection | None = None
        self.redis = aioredis.Redis.from_url(self.redis_url)
        self.prefixes: list[str] = []

    # -- set-up and clean-up ------------------------------------------------------------------

    async def setup(self) -> None:
        self.admin = await asyncpg.connect(self.base_dsn)
        await self.admin.execute(f'CREATE DATABASE "{self.database}"')

    async def teardown(self) -> None:
        for prefix in self.prefixes:
            keys = [k async for k in self.redis.scan_iter(match=f"{prefix}:*", count=1000)]
            for i in range(0, len(keys), 1000):
                await self.redis.delete(*keys[i : i + 1000])
        await self.redis.aclose()
        if self.admin is not None:
            await self.admin.execute(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
            await self.admin.close()

    async def prepare(self, mode: str, kind: str) -> dict[str, Any]:
        """A fresh schema and key prefix for one run of one mode."""
        name = f"{mode.replace('-', '_')}_{kind}"
        spec: dict[str, Any] = {
            "mode": mode,
            "kind": kind,
            "run": f"{self.run_id}{kind[0]}",
            "redis_url": self.redis_url,
            "prefix": f"velbench-{self.run_id}-{name}",
            "dsn": self.dsn,
            "schema": f"bench_{name}",
            "limit": self.args.window,
            "pool_max": max(4, self.args.tasks + 4),
        }
        self.prefixes.append(spec["prefix"])
        if mode in POSTGRES_MODES:
            conn = await asyncpg.connect(self.dsn)
            try:
                await conn.execute(f'CREATE SCHEMA "{spec["schema"]}"')
                if mode == "ref-asyncpg":
                    await create_reference_table(conn, spec["schema"])
            finally:
                await conn.close()
            if mode != "ref-asyncpg":
                await migrate(self.dsn, schema=spec["schema"])
        return spec

    async def xacts(self) -> int:
        assert self.admin is not None
        # A fresh transaction per read: pg_stat_* values are cached inside one.
        value = await self.admin.fetchval(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = $1",
            self.database,
        )
        return int(value or 0)

    # -- running workers ----------------------------------------------------------------------

    async def workers(self, spec: dict[str, Any], processes: int) -> list[dict[str, Any]]:
        procs = []
        for p in range(processes):
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "benchmarks.workload",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                cwd=ROOT,
                limit=1 << 28,  # the result line carries every latency
            )
            assert proc.stdin is not None
            proc.stdin.write((json.dumps({**spec, "proc": p}) + "\n").encode())
            await proc.stdin.drain()
            procs.append(proc)
        try:
            for proc in procs:
                assert proc.stdout is not None
                line = await asyncio.wait_for(proc.stdout.readline(), 60)
                if line.strip() != b"ready":
                    raise RuntimeError(f"bench worker failed to start ({spec['mode']})")
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.write(b"go\n")
                await proc.stdin.drain()
            results = []
            for proc in procs:
                assert proc.stdout is not None
                line = await asyncio.wait_for(proc.stdout.readline(), self.args.worker_timeout)
                results.append(json.loads(line))
                await proc.wait()
            return results
        finally:
            for proc in procs:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()

    async def run_mode(self, mode: str) -> dict[str, Any]:
        args = self.args
        out: dict[str, Any] = {}
        print(f"[bench] {mode}: throughput", flush=True)
        out["throughput"] = await self.throughput(mode)
        if args.throughput_only:
            return out
        print(f"[bench] {mode}: growth", flush=True)
        out["growth"] = await self.growth(mode)
        if mode not in REFERENCES:
            print(f"[bench] {mode}: shared", flush=True)
            out["shared"] = await self.shared(mode)
        if mode == "redis":
            print(f"[bench] {mode}: steady {args.steady_rate * 2} messages/s", flush=True)
            out["steady"] = await self.steady(mode)
        return out

    async def throughput(self, mode: str) -> dict[str, Any]:
        args = self.args
        spec = await self.prepare(mode, "throughput")
        spec.update(
            tasks=args.tasks,
            turns=args.turns,
            sessions=max(1, args.sessions // args.processes),
            track_acks=mode == "redis",
        )
        before = await self.xacts()
        results = await self.workers(spec, args.processes)
        await asyncio.sleep(0.5)  # a backend reports its counters as it exits
        xacts = await self.xacts() - before
        row = self.summarise(results)
        messages = row["turns"] * 2
        if mode in POSTGRES_MODES:
            row["pg_transactions"] = xacts
            row["pg_tx_per_1000_messages"] = round(xacts * 1000 / max(1, messages), 2)
        if mode == "redis":
            row["flush_transactions"] = sum(r["flush_tx"] for r in results)
            row["warm_transactions"] = sum(r["warm_tx"] for r in results)
            row["flush_tx_per_1000_messages"] = round(
                row["flush_transactions"] * 1000 / max(1, messages), 2
            )
            row["flush_lag"] = flush_lag(results)
        if mode in REDIS_MODES:
            row["redis_memory"] = await self.redis_memory(spec, mode, messages)
        return row

    async def growth(self, mode: str) -> dict[str, Any]:
        args = self.args
        spec = await self.prepare(mode, "growth")
        spec.update(tasks=1, turns=args.growth_turns, sessions=1)
        (result,) = await self.workers(spec, 1)
        lat = result["latencies"]
        # Turn 10 on, the window is full; 50 turns at each end, so neither a flush of the
        # embedded flusher nor a burst of load elsewhere decides a median.
        width = min(50, max(1, len(lat) // 4))
        first = min(len(lat), 10 + width)
        early, late = window_median(lat, first, width), window_median(lat, len(lat), width)
        return {
            "turns": len(lat),
            "median_of": width,
            "early_turns": [first - width + 1, first],
            "turn_10_ms": round(early, 3),
            "turn_last_ms": round(late, 3),
            "ratio": round(late / early, 3) if early else None,
            "errors": result["errors"],
        }

    async def shared(self, mode: str) -> dict[str, Any]:
        args = self.args
        spec = await self.prepare(mode, "shared")
        spec.update(tasks=args.tasks, turns=args.shared_turns, sessions=4)
        results = await self.workers(spec, args.processes)
        row = self.summarise(results)
        if mode == "memory":
            totals = {"lost": 0, "duplicated": 0, "split": 0, "stale": 0}
            for r in results:
                for key, value in (r["shared_check"] or {}).items():
                    totals[key] += value
            row["check"] = {**totals, "note": "memory sessions are per process"}
            return row
        from benchmarks.modes import make_driver

        driver = make_driver(mode, {**spec, "pool_max": 4})
        turns: dict[str, list[tuple[str, str]]] = {}
        for r in results:
            for sid, done in r["shared_turns"].items():
                turns.setdefault(sid, []).extend((t, s) for t, s in done)
        totals = {"lost": 0, "duplicated": 0, "split": 0, "stale": 0}
        try:
            for sid, done in turns.items():
                for key, value in check_history(await driver.history(sid), done).items():
                    totals[key] += value
        finally:
            await driver.aclose()
        row["check"] = totals
        return row

    async def steady(self, mode: str) -> dict[str, Any]:
        args = self.args
        spec = await self.prepare(mode, "steady")
        # Two sessions per task, so every task paces the same number of turns.
        sessions = 2 * args.tasks * args.processes
        total_turns = int(args.steady_rate * args.steady_seconds)
        spec.update(
            tasks=args.tasks,
            turns=max(1, total_turns // sessions),
            sessions=max(1, sessions // args.processes),
            rate=args.steady_rate / args.processes,
            track_acks=True,
        )
        before = await self.xacts()
        results = await self.workers(spec, args.processes)
        await asyncio.sleep(0.5)
        xacts = await self.xacts() - before
        row = self.summarise(results)
        row["target_messages_per_s"] = args.steady_rate * 2
        row["messages_per_s"] = round(row["turns_per_s"] * 2, 1)
        row["flush_lag"] = flush_lag(results)
        row["pg_transactions"] = xacts
        row["pg_tx_per_1000_messages"] = round(xacts * 1000 / max(1, row["turns"] * 2), 2)
        row["flush_transactions"] = sum(r["flush_tx"] for r in results)
        return row

    def summarise(self, results: list[dict[str, Any]]) -> dict[str, Any]:
        latencies = [x for r in results for x in r["latencies"]]
        wall = max(r["ended"] for r in results) - min(r["started"] for r in results)
        turns = sum(r["turns"] for r in results)
        return {
            "processes": len(results),
            "turns": turns,
            "seconds": round(wall, 3),
            "turns_per_s": round(turns / wall, 1) if wall > 0 else 0.0,
            # The workers' own CPU (this process's client work, embedded flusher included;
            # not the servers'): steadier than turns/s on a shared machine.
            "client_cpu_us_per_turn": round(sum(r["cpu_s"] for r in results) * 1e6 / turns, 1)
            if turns
            else 0.0,
            **latency_summary(latencies),
            "worker_rss_mb": round(max(r["rss_mb"] for r in results), 1),
            "close_s": round(max(r["close_s"] for r in results), 3),
            "errors": [e for r in results for e in r["errors"]][:5],
        }

    async def redis_memory(self, spec: dict[str, Any], mode: str, messages: int) -> dict[str, Any]:
        prefix = spec["prefix"]
        keys = [k async for k in self.redis.scan_iter(match=f"{prefix}:*", count=1000)]
        if mode not in REFERENCES:
            keys = [k for k in keys if any(m in k for m in (b"}:h:", b"}:m:", b"}:r:"))]
        used = 0
        for i in range(0, len(keys), 500):
            pipe = self.redis.pipeline(transaction=False)
            for key in keys[i : i + 500]:
                pipe.memory_usage(key, samples=0)
            used += sum(int(x or 0) for x in await pipe.execute())
        sample = turn_messages(f"{spec['run']}-p0-s0/0")
        json_bytes = sum(len(encode_message(m).encode()) for m in sample) / len(sample)
        per_message = used / max(1, messages)
        return {
            "keys": len(keys),
            "bytes": used,
            "bytes_per_message": round(per_message, 1),
            "json_bytes_per_message": round(json_bytes, 1),
            "ratio": round(per_message / json_bytes, 3),
        }


def window_median(latencies: list[float], around: int, width: int = 10) -> float:
    """Median latency (ms) of the ``width`` turns ending at turn ``around`` (1-based)."""
    hi = max(width, min(around, len(latencies)))
    return statistics.median(latencies[hi - width : hi]) * 1000 if latencies else 0.0


def flush_lag(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Time from an append's acknowledgement to the Postgres commit holding it."""
    commits: dict[str, list[tuple[float, int]]] = {}
    for r in results:
        for sid, upto, at in r["commits"]:
            commits.setdefault(sid, []).append((at, upto))
    for entries in commits.values():
        entries.sort()
    lags: list[float] = []
    unflushed = 0
    for r in results:
        for sid, seq, acked in r["acks"]:
            done = next((at for at, upto in commits.get(sid, []) if upto >= seq), None)
            if done is None:
                unflushed += 1
            else:
                lags.append(max(0.0, done - acked))
    return {
        "samples": len(lags),
        "never_flushed": unflushed,
        "p50_ms": round(percentile(lags, 0.5) * 1000, 1),
        "p99_ms": round(percentile(lags, 0.99) * 1000, 1),
        "max_ms": round(max(lags, default=0.0) * 1000, 1),
    }


async def server_versions(bench: Bench) -> dict[str, str]:
    assert bench.admin is not None
    info = await bench.redis.info("server")
    pg = await bench.admin.fetchval("SHOW server_version")
    return {"redis": str(info.get("redis_version")), "postgres": str(pg)}


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in ALL_MODES:
            raise SystemExit(f"unknown mode {m!r}; choose from {', '.join(ALL_MODES)}")
    bench = Bench(args)
    started = time.time()
    await bench.setup()
    results: dict[str, Any] = {}
    try:
        versions = await server_versions(bench)
        for mode in modes:
            results[mode] = await bench.run_mode(mode)
        agent: dict[str, Any] = {}
        for mode in [m for m in ("memory", "database", "redis") if m in modes]:
            if args.agent_turns <= 0 or args.throughput_only:
                break
            print(f"[bench] {mode}: agent turns", flush=True)
            spec = await bench.prepare(mode, "agent")
            agent[mode] = await measure_agent(mode, spec, args.agent_turns, args.window)
            if mode == "redis":
                spec = await bench.prepare(mode, "agent2")
                agent["redis, lock in separate calls"] = await measure_agent(
                    mode, spec, args.agent_turns, args.window, separate_lock=True
                )
    finally:
        await bench.teardown()
    return {
        "meta": {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
            "duration_s": round(time.time() - started, 1),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            **versions,
            "args": vars(args),
            "command": "python -m benchmarks " + " ".join(sys.argv[1:]),
        },
        "modes": results,
        "agent": agent,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--processes", "-P", type=int, default=2)
    parser.add_argument("--tasks", "-C", type=int, default=16, help="asyncio tasks per process")
    parser.add_argument("--sessions", "-S", type=int, default=512)
    parser.add_argument("--turns", "-T", type=int, default=40, help="turns per session")
    parser.add_argument("--window", type=int, default=20, help="max_history")
    parser.add_argument("--growth-turns", type=int, default=500)
    parser.add_argument("--shared-turns", type=int, default=10, help="turns per task")
    parser.add_argument("--steady-rate", type=float, default=500.0, help="turns/s (2 msgs each)")
    parser.add_argument("--steady-seconds", type=float, default=10.0)
    parser.add_argument("--agent-turns", type=int, default=500)
    parser.add_argument("--modes", default=",".join(ALL_MODES))
    parser.add_argument(
        "--throughput-only", action="store_true", help="skip growth, shared, steady and agent"
    )
    parser.add_argument("--worker-timeout", type=float, default=240.0)
    parser.add_argument("--quick", action="store_true", help="a ~30 s smoke run")
    parser.add_argument(
        "--from-json", metavar="FILE", help="run nothing: redo the markdown and chart from FILE"
    )
    parser.add_argument(
        "--out", default="docs", help="directory for benchmarks.json/.md/.png (default docs)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.sessions, args.turns, args.tasks = 32, 4, 8
        args.growth_turns, args.shared_turns = 40, 4
        args.steady_seconds, args.steady_rate, args.agent_turns = 1.0, 200.0, 30
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
    else:
        data = asyncio.run(amain(args))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data["targets"] = report.targets(data)
    (out / "benchmarks.json").write_text(json.dumps(data, indent=2) + "\n")
    chart = report.chart(data, out / "benchmarks.png")
    md = out / "benchmarks.md"
    previous = md.read_text() if md.exists() else None
    md.write_text(report.markdown(data, chart, previous))
    print(report.summary(data))
    print(f"[bench] wrote {out / 'benchmarks.json'}, {out / 'benchmarks.md'}", end="")
    print(f", {chart}" if chart else " (no chart: pip install -e '.[bench]' for matplotlib)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
