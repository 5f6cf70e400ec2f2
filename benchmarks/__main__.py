"""``python -m benchmarks``: every mode, reference and peer side by side; JSON, markdown, PNG.

    python -m benchmarks                        # the default run (3 interleaved rounds)
    python -m benchmarks --quick --out /tmp/b   # a smoke run of about a minute

Starts its own ``redis-server`` (``--redis-url`` measures against an existing server
instead) and needs Postgres (``POSTGRES_DSN``, default
``postgresql://postgres@127.0.0.1:5432/test``). The run creates its own Postgres database
(so ``pg_stat_database`` counts only its own transactions) with one schema per mode and run,
and removes it afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from benchmarks import peers, report, targets
from benchmarks.modes import ALL_MODES
from benchmarks.runner import run_bench


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--processes", "-P", type=int, default=2)
    parser.add_argument("--tasks", "-C", type=int, default=16, help="asyncio tasks per process")
    parser.add_argument("--sessions", "-S", type=int, default=512)
    parser.add_argument("--turns", "-T", type=int, default=40, help="turns per session")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved throughput rounds")
    parser.add_argument("--window", type=int, default=20, help="max_history")
    parser.add_argument("--growth-turns", type=int, default=500)
    parser.add_argument("--shared-turns", type=int, default=10, help="turns per task")
    parser.add_argument("--steady-rate", type=float, default=500.0, help="turns/s (2 msgs each)")
    parser.add_argument("--steady-seconds", type=float, default=10.0)
    parser.add_argument("--agent-turns", type=int, default=500)
    parser.add_argument("--modes", default=",".join(ALL_MODES))
    parser.add_argument(
        "--redis-url", default="", help="use this Redis instead of starting a private one"
    )
    parser.add_argument("--redis-server", default="redis-server", help="the binary to start")
    parser.add_argument(
        "--throughput-only", action="store_true", help="skip growth, shared, steady and agent"
    )
    parser.add_argument("--worker-timeout", type=float, default=240.0)
    parser.add_argument("--quick", action="store_true", help="a smoke run of about a minute")
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
        if "--rounds" not in (argv if argv is not None else sys.argv[1:]):
            args.rounds = 1
    counts = ("processes", "tasks", "sessions", "turns", "rounds", "window", "shared_turns")
    for name in (*counts, "growth_turns"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.agent_turns < 0:
        parser.error("--agent-turns must not be negative (0: no agent turns)")
    if args.steady_rate <= 0 or args.steady_seconds <= 0 or args.worker_timeout <= 0:
        parser.error("--steady-rate, --steady-seconds and --worker-timeout must be positive")
    return args


def chosen_modes(args: argparse.Namespace) -> list[str]:
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in ALL_MODES:
            raise SystemExit(f"unknown mode {m!r}; choose from {', '.join(ALL_MODES)}")
    if not peers.available():
        left_out = [m for m in modes if m in peers.PEERS]
        if left_out:
            print(
                f"[bench] leaving out {', '.join(left_out)}: the OpenAI Agents SDK is not "
                "installed (pip install -e '.[bench]')",
                file=sys.stderr,
            )
        modes = [m for m in modes if m not in peers.PEERS]
    return modes


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
    else:
        data = asyncio.run(run_bench(args, chosen_modes(args)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data["ratios"] = targets.ratios(data)
    data["targets"] = targets.targets(data)
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
