"""Turn latency with ``ContextManager(summarize=True)`` against without, in each storage mode.

The model is vel's fake OpenAI server, in a process of its own (a remote model, as in
production), answering every request after ``--latency`` seconds (default 50 ms),
summarisation requests included, so the background summariser competes with the turns for
the same model, connections and event loop. Each round runs,
per mode, one session of ``--turns`` turns with summarize off and one with it on, in
alternating blocks of ``--block`` turns (the summariser's background work of a block is
awaited before the other setting's block starts, outside the timed turns),
``max_history=--window``, ``summarize_every=--every``. Reported per mode:
median, p95 and mean turn time off and on, the on/off ratio of the medians and of the means,
the client CPU per turn off and on (this process, background summarisation included: the
figure a loaded machine disturbs least), and the summariser calls made (at most one per K
new messages).

    nice -n 10 .venv/bin/python scripts/bench_summaries.py [--turns 60] [--rounds 3]
        [--block 10] [--latency 0.05] [--modes memory,database,redis] [--json out.json]

Needs the local test servers (``--dsn``, ``--redis-url``); works in a schema and key prefix of
its own, removed afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from _bench import drop_namespace

from vel import Agent, ContextManager
from vel.stores.postgres.migrate import migrate


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


async def measure(mode: str, args: argparse.Namespace, url: str) -> Any:
    """Both settings of one mode, in alternating blocks of turns: each setting's session
    grows by ``--block`` turns at a time, so both see the same load on a shared machine."""
    model = {"provider": "openai", "model": "gpt-4o", "api_key": "x", "base_url": url}
    times: dict[bool, list[float]] = {False: [], True: []}
    cpu: dict[bool, float] = {False: 0.0, True: 0.0}
    agents: dict[bool, Agent] = {}
    sids: dict[bool, str] = {}
    try:
        for summarize in (False, True):
            ctx = ContextManager(
                max_history=args.window, summarize=summarize, summarize_every=args.every
            )
            agent = Agent(id="bench", model=model, session_storage=mode, context_manager=ctx)
            agents[summarize] = agent
            sids[summarize] = sid = f"bench-{uuid.uuid4().hex[:10]}"
            await agent.run({"message": "warm up"}, session_id=f"{sid}-warm")
            await agent.run({"message": "My name is Alice"}, session_id=sid)
        for block in range(args.turns // args.block):
            for summarize in (False, True) if block % 2 == 0 else (True, False):
                agent = agents[summarize]
                cpu_start = time.process_time()
                for i in range(args.block):
                    started = time.perf_counter()
                    message = f"unrelated topic number {block}-{i}"
                    await agent.run({"message": message}, session_id=sids[summarize])
                    times[summarize].append(time.perf_counter() - started)
                summaries = agent.ctxmgr.summaries
                if summaries is not None:
                    # Its background work must not land in the other setting's block.
                    await summaries.idle(60)
                cpu[summarize] += time.process_time() - cpu_start
        answer = await agents[True].run({"message": "What is my name?"}, session_id=sids[True])
        if answer != "Your name is Alice.":
            print(f"  note: {mode} answered {answer!r}")
        summaries = agents[True].ctxmgr.summaries
        calls = int(summaries.counters["summary_calls"]) if summaries is not None else 0
    finally:
        for agent in agents.values():
            await agent.aclose()
    return times, cpu, calls


async def main() -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--block", type=int, default=10)
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--modes", default="memory,database,redis")
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    if args.block < 1 or args.turns < args.block or args.rounds < 1:
        parser.error(
            "need --block >= 1, --turns >= --block (turns run in blocks) and --rounds >= 1"
        )
    modes = args.modes.split(",")
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    await migrate(args.dsn, schema=schema)
    os.environ.update(
        POSTGRES_DSN=f"{args.dsn}?search_path={schema}",
        REDIS_URL=args.redis_url,
        VEL_KEY_PREFIX=prefix,
    )
    results: dict[str, Any] = {}
    try:
        server = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "vel.testing.fake_openai",
            "--latency",
            str(args.latency),
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            assert server.stdout is not None
            line = (await server.stdout.readline()).decode()
            url = line.strip().partition("=")[2]
            times: dict[tuple[str, bool], list[float]] = {}
            cpu: dict[tuple[str, bool], float] = {}
            calls: dict[str, int] = {}
            for _ in range(args.rounds):
                for mode in modes:
                    got, used, made = await measure(mode, args, url)
                    for summarize, values in got.items():
                        times.setdefault((mode, summarize), []).extend(values)
                        cpu[mode, summarize] = cpu.get((mode, summarize), 0.0) + used[summarize]
                    calls[mode] = calls.get(mode, 0) + made
            for mode in modes:
                off, on = times[mode, False], times[mode, True]
                row = {
                    "off_median_ms": statistics.median(off) * 1000,
                    "on_median_ms": statistics.median(on) * 1000,
                    "off_p95_ms": p95(off) * 1000,
                    "on_p95_ms": p95(on) * 1000,
                    "off_mean_ms": statistics.fmean(off) * 1000,
                    "on_mean_ms": statistics.fmean(on) * 1000,
                    "off_cpu_ms_per_turn": cpu[mode, False] / len(off) * 1000,
                    "on_cpu_ms_per_turn": cpu[mode, True] / len(on) * 1000,
                    "summary_calls": calls.get(mode, 0),
                    "turns_per_setting": len(off),
                }
                row["median_ratio"] = row["on_median_ms"] / row["off_median_ms"]
                row["mean_ratio"] = row["on_mean_ms"] / row["off_mean_ms"]
                results[mode] = row
                print(
                    f"{mode:9} off {row['off_median_ms']:.1f} ms (p95 {row['off_p95_ms']:.1f})"
                    f"  on {row['on_median_ms']:.1f} ms (p95 {row['on_p95_ms']:.1f})"
                    f"  ratio median {row['median_ratio']:.3f} mean {row['mean_ratio']:.3f}"
                    f"  cpu/turn {row['off_cpu_ms_per_turn']:.2f}"
                    f" -> {row['on_cpu_ms_per_turn']:.2f} ms"
                    f"  summariser calls {row['summary_calls']}"
                    f" ({len(off)} turns each)"
                )
        finally:
            server.terminate()  # it serves until SIGTERM
            await server.wait()
    finally:
        await drop_namespace(args.dsn, schema, args.redis_url, prefix)
    return {"args": vars(args), "results": results}


if __name__ == "__main__":
    figures = asyncio.run(main())
    if figures["args"]["json"]:
        Path(figures["args"]["json"]).write_text(json.dumps(figures, indent=2))
