"""Benchmarks of vel's session stores: ``python -m benchmarks`` (or ``scripts/bench``).

Not part of the wheel: run from a checkout, with the ``bench`` extra for the peers, the chart
and the profiler. A chat turn reads the ``max_history`` window and commits a user message
(~300 B) and an assistant message (~800 B). ``P`` worker processes run ``C`` asyncio tasks
each; every mode (vel's stores, unlocked and as the Agent runs them under the turn lock), the
raw references, the prototype of a minimal locked turn and the OpenAI Agents SDK's sessions
run in the same invocation, in interleaved rounds, so their ratios are comparable. Results go
to a JSON file, ``docs/benchmarks.md`` and (with matplotlib) a PNG chart.

Modules: :mod:`benchmarks.runner` (servers, schemas, worker processes, rounds),
:mod:`benchmarks.workload` (what a worker process runs), :mod:`benchmarks.modes` (vel's
stores and the references), :mod:`benchmarks.peers` (the SDK's sessions),
:mod:`benchmarks.prototype` (the minimal locked turn), :mod:`benchmarks.redis_server` (the
private ``redis-server`` and its counters), :mod:`benchmarks.agent_turns` (Agent-level
overhead), :mod:`benchmarks.stats`, :mod:`benchmarks.targets` and :mod:`benchmarks.report`
(summaries, ratios and targets, markdown and chart), :mod:`benchmarks.__main__` (the command).
Tools of their own: :mod:`benchmarks.hotpath` (where a turn's client CPU goes, with py-spy),
:mod:`benchmarks.pg_lock` (the database turn lock's options), :mod:`benchmarks.turn_cpu`
(client CPU per turn of the Redis-only store against plain redis-py, in one process).
"""
