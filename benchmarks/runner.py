"""The bench's parent process: servers, schemas and key prefixes, worker processes, rounds.

Throughput runs in interleaved rounds (every mode once per round, the order rotated each
round), so a burst of load elsewhere on the machine lands on one mode's round, not on one
mode; the report takes medians over rounds and ratios within each round. Growth, shared
sessions, the steady rate and the agent turns run once per mode after the rounds.

Redis modes run against a ``redis-server`` of the bench's own (:mod:`benchmarks.redis_server`),
so ``INFO commandstats`` deltas count only the mode being measured; Postgres modes run in a
database of the bench's own, so ``pg_stat_database`` counts only theirs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import redis.asyncio as aioredis

from benchmarks import peers
from benchmarks.agent_turns import measure_agent
from benchmarks.modes import (
    LOCKED,
    POSTGRES_MODES,
    REDIS_MODES,
    REFERENCES,
    base_mode,
    create_reference_table,
    make_driver,
)
from benchmarks.pg_cpu import BackendCpu
from benchmarks.redis_server import PrivateRedis, ServerCounters, counters
from benchmarks.stats import (
    flush_lag,
    latency_summary,
    median_of_rounds,
    window_median,
)
from benchmarks.workload import check_history, turn_messages
from vel.messages import encode_message
from vel.settings import load_settings
from vel.stores.postgres.migrate import migrate

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"
# Workers run ``python -m benchmarks.workload`` from here: the package is not installed.
ROOT = Path(__file__).resolve().parent.parent
# Shared sessions run on vel's modes, each turn under the turn lock (so the -lock modes,
# the same stores, would only repeat them); the references and peers take no lock.
SHARED_MODES = ("memory", "database", "redis", "redis-only")


def with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, f"/{database}", parts.query, parts.fragment))


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        settings = load_settings()
        self.args = args
        self.base_dsn = settings.postgres_dsn or DEFAULT_DSN
        self.server = None if args.redis_url else PrivateRedis(args.redis_server)
        self.redis_url = args.redis_url or (self.server.url if self.server else "")
        self.run_id = uuid.uuid4().hex[:8]
        self.database = f"vel_bench_{self.run_id}"
        self.dsn = with_database(self.base_dsn, self.database)
        self.admin: asyncpg.Connection | None = None
        self.redis: aioredis.Redis | None = None
        self.prefixes: list[str] = []

    # -- set-up and clean-up ------------------------------------------------------------------

    async def setup(self) -> None:
        if self.server is not None:
            self.server.start()
        self.redis = aioredis.Redis.from_url(self.redis_url)
        self.admin = await asyncpg.connect(self.base_dsn)
        await self.admin.execute(f'CREATE DATABASE "{self.database}"')

    async def teardown(self) -> None:
        try:
            if self.redis is not None:
                if self.server is None:  # a private server goes away whole
                    for prefix in self.prefixes:
                        keys = [k async for k in self.redis.scan_iter(match=f"{prefix}:*")]
                        for i in range(0, len(keys), 1000):
                            await self.redis.delete(*keys[i : i + 1000])
                await self.redis.aclose()
            if self.admin is not None:
                await self.admin.execute(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
                await self.admin.close()
        finally:
            if self.server is not None:
                self.server.stop()

    async def prepare(self, mode: str, kind: str, tag: str = "") -> dict[str, Any]:
        """A fresh schema and key prefix for one run of one mode (``tag``: which round)."""
        name = f"{mode.replace('-', '_')}_{kind}{tag}"
        spec: dict[str, Any] = {
            "mode": mode,
            "kind": kind,
            "run": f"{self.run_id}{kind[0]}{tag}",
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
            if mode == "sdk-sqlalchemy":
                await peers.create_sqlalchemy_tables(self.dsn, spec["schema"])
            elif mode != "ref-asyncpg":
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

    async def server_counters(self) -> ServerCounters:
        assert self.redis is not None
        return await counters(self.redis)

    # -- running workers ----------------------------------------------------------------------

    async def workers(
        self,
        spec: dict[str, Any],
        processes: int,
        around: Callable[[], Awaitable[Any]] | None = None,
    ) -> tuple[list[dict[str, Any]], list[Any]]:
        """Run ``processes`` workers; ``around`` is awaited once every worker is connected
        (just before they start) and again after they have all exited: its two results."""
        procs = []
        marks: list[Any] = []
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
            if around is not None:
                marks.append(await around())
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
            if around is not None:
                marks.append(await around())
            return results, marks
        finally:
            for proc in procs:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()

    async def throughput(self, mode: str, round_no: int) -> dict[str, Any]:
        args = self.args
        spec = await self.prepare(mode, "throughput", f"_r{round_no}")
        spec.update(
            tasks=args.tasks,
            turns=args.turns,
            sessions=max(1, args.sessions // args.processes),
            track_acks=mode == "redis",
        )
        before = await self.xacts()
        around = self.server_counters if mode in REDIS_MODES else None
        assert self.admin is not None
        pg_cpu = await BackendCpu(self.admin, self.database).start()
        try:
            results, marks = await self.workers(spec, args.processes, around)
        finally:
            pg_cpu_s = await pg_cpu.stop()
        await asyncio.sleep(0.5)  # a backend reports its counters as it exits
        xacts = await self.xacts() - before
        row = summarise(results)
        messages = row["turns"] * 2
        if mode in POSTGRES_MODES:
            row["pg_transactions"] = xacts
            row["pg_tx_per_1000_messages"] = round(xacts * 1000 / max(1, messages), 2)
            if pg_cpu_s is not None:
                # Sampled: the workers' connecting and warm-up are included (slight excess).
                row["pg_cpu_us_per_turn"] = round(pg_cpu_s * 1e6 / max(1, row["turns"]), 1)
        if base_mode(mode) == "redis":
            row["flush_transactions"] = sum(r["flush_tx"] for r in results)
            row["warm_transactions"] = sum(r["warm_tx"] for r in results)
            row["flush_tx_per_1000_messages"] = round(
                row["flush_transactions"] * 1000 / max(1, messages), 2
            )
        if mode == "redis":
            row["flush_lag"] = flush_lag(results)
        if marks:
            row["redis"] = marks[1].since(marks[0]).per_turn(row["turns"])
            if self.server is None:
                row["redis"]["note"] = "shared server: counts include every other client"
            row["redis_memory"] = await self.redis_memory(spec, mode, messages)
        return row

    async def growth(self, mode: str) -> dict[str, Any]:
        args = self.args
        spec = await self.prepare(mode, "growth")
        spec.update(tasks=1, turns=args.growth_turns, sessions=1)
        (result,), _ = await self.workers(spec, 1)
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
        results, _ = await self.workers(spec, args.processes)
        row = summarise(results)
        if mode == "memory":
            totals = {"lost": 0, "duplicated": 0, "split": 0, "stale": 0}
            for r in results:
                for key, value in (r["shared_check"] or {}).items():
                    totals[key] += value
            row["check"] = {**totals, "note": "memory sessions are per process"}
            return row
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
        results, _ = await self.workers(spec, args.processes)
        await asyncio.sleep(0.5)
        xacts = await self.xacts() - before
        row = summarise(results)
        row["target_messages_per_s"] = args.steady_rate * 2
        row["messages_per_s"] = round(row["turns_per_s"] * 2, 1)
        row["flush_lag"] = flush_lag(results)
        row["pg_transactions"] = xacts
        row["pg_tx_per_1000_messages"] = round(xacts * 1000 / max(1, row["turns"] * 2), 2)
        row["flush_transactions"] = sum(r["flush_tx"] for r in results)
        return row

    async def redis_memory(self, spec: dict[str, Any], mode: str, messages: int) -> dict[str, Any]:
        assert self.redis is not None
        prefix = spec["prefix"]
        keys = [k async for k in self.redis.scan_iter(match=f"{prefix}:*", count=1000)]
        if mode in ("redis", "redis-lock", "redis-only", "proto-redis"):
            # The session's own keys, not the per-bucket dirty sets and counters.
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

    # -- the whole run --------------------------------------------------------------------------

    async def rounds(self, modes: list[str]) -> dict[str, dict[str, Any]]:
        """Throughput of every mode, ``args.rounds`` times, interleaved; medians per mode."""
        rows: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
        for r in range(self.args.rounds):
            order = modes[r % len(modes) :] + modes[: r % len(modes)]
            for mode in order:
                print(f"[bench] round {r + 1}/{self.args.rounds}: {mode}", flush=True)
                rows[mode].append(await self.throughput(mode, r))
        out: dict[str, dict[str, Any]] = {}
        for mode, runs in rows.items():
            row = median_of_rounds(runs)
            # Kept per round: the report's ratios pair the modes' figures of the same round.
            row["rounds"] = [
                {
                    "turns_per_s": x["turns_per_s"],
                    "p50_ms": x["p50_ms"],
                    "p99_ms": x["p99_ms"],
                    "client_cpu_us_per_turn": x["client_cpu_us_per_turn"],
                }
                for x in runs
            ]
            out[mode] = row
        return out

    async def run(self, modes: list[str]) -> dict[str, Any]:
        args = self.args
        results: dict[str, Any] = {m: {} for m in modes}
        for mode, row in (await self.rounds(modes)).items():
            results[mode]["throughput"] = row
        agent: dict[str, Any] = {}
        if args.throughput_only:
            return {"modes": results, "agent": agent}
        for mode in modes:
            print(f"[bench] {mode}: growth", flush=True)
            results[mode]["growth"] = await self.growth(mode)
            if mode in SHARED_MODES:
                print(f"[bench] {mode}: shared", flush=True)
                results[mode]["shared"] = await self.shared(mode)
            if mode == "redis":
                print(f"[bench] {mode}: steady {args.steady_rate * 2} messages/s", flush=True)
                results[mode]["steady"] = await self.steady(mode)
        for mode in [m for m in ("memory", "database", "redis") if m in modes]:
            if args.agent_turns <= 0:
                break
            print(f"[bench] {mode}: agent turns", flush=True)
            spec = await self.prepare(mode, "agent")
            agent[mode] = await measure_agent(mode, spec, args.agent_turns, args.window)
            if mode == "redis":
                spec = await self.prepare(mode, "agent2")
                agent["redis, lock in separate calls"] = await measure_agent(
                    mode, spec, args.agent_turns, args.window, separate_lock=True
                )
        return {"modes": results, "agent": agent}

    async def versions(self) -> dict[str, str]:
        assert self.admin is not None and self.redis is not None
        info = await self.redis.info("server")
        pg = await self.admin.fetchval("SHOW server_version")
        return {"redis": str(info.get("redis_version")), "postgres": str(pg)}


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
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


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


async def run_bench(args: argparse.Namespace, modes: list[str]) -> dict[str, Any]:
    """Run ``modes``; the JSON document the report is made from."""
    bench = Bench(args)
    started = time.time()
    load_before = load_average()
    await bench.setup()
    try:
        versions = await bench.versions()
        data = await bench.run(modes)
    finally:
        await bench.teardown()
    data["meta"] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
        "duration_s": round(time.time() - started, 1),
        "cpus": os.cpu_count(),
        # 1, 5 and 15 minute load averages: figures from a busy machine are noisier.
        "load_before": load_before,
        "load_after": load_average(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        **versions,
        "redis_server": "a private server started by the bench" if bench.server else args.redis_url,
        "locked_modes": sorted(LOCKED),
        "references": list(REFERENCES),
        "args": vars(args),
        "command": "python -m benchmarks " + " ".join(sys.argv[1:]),
    }
    return data
