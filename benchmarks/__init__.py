"""Benchmarks of vel's session stores: ``python -m benchmarks`` (or ``scripts/bench``).

A chat turn reads the ``max_history`` window and commits a user message (~300 B) and an
assistant message (~800 B). ``P`` worker processes run ``C`` asyncio tasks each; every mode
(memory, database, redis, redis-only) and the two references (a raw redis-py pipeline and a
raw asyncpg append) run in the same invocation, so their ratios are comparable. Results go to
a JSON file, ``docs/benchmarks.md`` and (with the ``bench`` extra) a PNG chart.

Modules: :mod:`benchmarks.workload` (what a worker process runs), :mod:`benchmarks.modes`
(stores and references), :mod:`benchmarks.agent_turns` (Agent-level overhead),
:mod:`benchmarks.report` (markdown and chart), :mod:`benchmarks.__main__` (the command).
"""
