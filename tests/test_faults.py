"""Faults under load, with real processes: Postgres unreachable, flushers killed or frozen
mid-batch, Redis gone.

Workers and flushers are OS processes (``tests/workers.py``, ``python -m vel flusher``)
configured from the environment; failpoints (``VEL_FAILPOINTS``) stop a flusher at an exact
step. Every test ends by comparing Postgres (and Redis) with the workers' acknowledgements:
0 lost, 0 duplicated, 0 gaps. Figures are printed (``pytest -s``) and written to
``/tmp/vel-figures/<test>.json``.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
import uuid
import zlib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from checker import (
    acks_of,
    compare,
    postgres_rows,
    redis_meta,
    redis_rows,
    same_history,
)
from servers import RedisServer
from workers import Stack, with_port

from vel.stores.redis_keys import DEFAULT_BUCKETS
from vel.stores.tiered import TieredStore
from vel.testing.proxy import FaultProxy

FIGURES = Path("/tmp/vel-figures")
pytestmark = pytest.mark.slow


def new_sid() -> str:
    return f"ft-{uuid.uuid4().hex[:10]}"


def sids_in_one_bucket(n: int) -> list[str]:
    """``n`` session ids sharing a hash-slot bucket, so one flush batch holds them all."""
    found: dict[int, list[str]] = {}
    while True:
        sid = new_sid()
        bucket = zlib.crc32(sid.encode()) % DEFAULT_BUCKETS
        found.setdefault(bucket, []).append(sid)
        if len(found[bucket]) == n:
            return found[bucket]


def record_figures(request: pytest.FixtureRequest, figures: dict[str, Any]) -> None:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name).strip("_")
    FIGURES.mkdir(parents=True, exist_ok=True)
    (FIGURES / f"{name}.json").write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
    print(f"\nfigures of {request.node.name}:")
    for key, value in figures.items():
        print(f"  {key:36} {value}")


async def wait_backlog_zero(store: TieredStore, timeout: float) -> float:
    """Seconds until nothing is unflushed and no session is dirty (fails on timeout)."""
    started = time.monotonic()
    while True:
        unflushed, _, dirty = await store.hot.backlog()
        if unflushed == 0 and dirty == 0:
            return time.monotonic() - started
        assert time.monotonic() - started < timeout, (
            f"backlog still {unflushed} messages / {dirty} sessions after {timeout} s"
        )
        await asyncio.sleep(0.05)


async def check_tiers(stack: Stack, acks: list[Any], sids: list[str]) -> dict[str, int]:
    """Postgres and Redis each equal the oracle, and each other; returns the counts."""
    totals = {"lost": 0, "duplicated": 0, "gaps": 0, "postgres_rows": 0}
    for sid in sids:
        cold = await postgres_rows(stack.pg_dsn, stack.schema, sid)
        hot = await redis_rows(stack.redis_url, stack.prefix, sid)
        report = compare(acks, cold, where="postgres", session_id=sid)
        totals["lost"] += len(report.lost)
        totals["duplicated"] += len(report.duplicated)
        totals["gaps"] += len(report.gaps)
        totals["postgres_rows"] += len(cold)
        report.assert_ok()
        compare(acks, hot, where="redis", session_id=sid).assert_ok()
        assert same_history(cold, hot) == []
    return totals


async def count_postgres_rows(stack: Stack, sids: list[str]) -> int:
    return sum([len(await postgres_rows(stack.pg_dsn, stack.schema, s)) for s in sids])


# -- 6 -----------------------------------------------------------------------------------


async def test_postgres_unreachable_for_20s_under_steady_appends(
    stack: Stack, tiered: TieredStore, request: pytest.FixtureRequest
) -> None:
    rate, duration, outage_at, outage = 50.0, 30.0, 5.0, 20.0
    drained_below = int(2 * rate * 0.5)  # half a second of traffic: caught up
    sid = new_sid()
    target = urlsplit(stack.pg_dsn)
    proxy = FaultProxy(target.hostname or "127.0.0.1", target.port or 5432).start()
    try:
        from conftest import schema_dsn

        env = stack.env(
            postgres_dsn=schema_dsn(with_port(stack.pg_dsn, proxy.port), stack.schema),
            VEL_FLUSHER="embedded",
            VEL_OP_TIMEOUT="2",
        )
        worker = stack.worker(
            "append",
            storage="redis",
            session=sid,
            tasks=5,
            rate=rate,
            duration=duration,
            name="appender",
            env=env,
        )
        deadline = time.monotonic() + 30
        while not worker.events("ack"):
            assert worker.poll() is None, worker.stderr()[-3000:]
            assert time.monotonic() < deadline, "the worker never appended"
            await asyncio.sleep(0.05)
        first_ack = time.time()
        down_at, up_at = first_ack + outage_at, first_ack + outage_at + outage
        samples: list[tuple[float, int]] = []
        state = "before"
        while worker.poll() is None:
            now = time.time()
            if state == "before" and now >= down_at:
                proxy.set_mode("refuse")
                down_at, state = now, "down"
            elif state == "down" and now >= up_at:
                proxy.set_mode("pass")
                up_at, state = now, "up"
            unflushed, _, _ = await tiered.hot.backlog()
            samples.append((time.time(), unflushed))
            assert time.time() - first_ack < duration + 40, "the worker did not finish"
            await asyncio.sleep(0.1)
        assert state == "up", "the worker ended before the outage was over"
        worker.check(await worker.wait_async(5))
    finally:
        proxy.stop()
    connections = proxy.connections_total

    lines = worker.lines()
    errors = [line for line in lines if line.get("event") == "error"]
    assert errors == [], errors[:3]
    acks = acks_of(lines)
    during = [a for a in acks if down_at <= a.t < up_at]
    latencies = [line["latency"] for line in lines if line.get("event") == "ack"]
    peak = max(n for _, n in samples)
    after = [(t, n) for t, n in samples if t >= up_at]
    caught_up = next((t for t, n in after if n <= drained_below), None)
    drain = None if caught_up is None else round(caught_up - up_at, 2)
    final_unflushed, _, final_dirty = await tiered.hot.backlog()
    (stats,) = [line["stats"] for line in lines if line.get("event") == "stats"] or [{}]
    figures = {
        "appends_total": len(acks),
        "appends_during_outage": len(during),
        "append_errors": len(errors),
        "outage_seconds": round(up_at - down_at, 2),
        "max_append_latency_s": max(latencies),
        "peak_backlog_messages": peak,
        "drain_seconds_after_recovery": drain,
        "drained_means_backlog_at_most": drained_below,
        "final_backlog_messages": final_unflushed,
        "postgres_connections_via_proxy": connections,
        "flush_batches_failed": stats.get("flush_batches_failed"),
        "flush_retries": stats.get("flush_retries"),
    }
    try:
        # Appends never waited for Postgres: the outage's share of them all succeeded.
        assert len(during) >= 0.8 * rate * outage, figures
        assert max(latencies) < 1.0, figures
        # The outage really held the flusher back, and it caught up soon after.
        assert peak >= 2 * len(during) * 0.8, figures
        assert drain is not None and drain <= 15.0, figures
        assert (final_unflushed, final_dirty) == (0, 0), figures
        figures.update(await check_tiers(stack, acks, [sid]))
    finally:
        record_figures(request, figures)


# -- 7 -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "failpoint", ["flush_after_claim", "flush_mid_transaction", "flush_after_commit"]
)
async def test_flusher_killed_mid_batch_loses_and_duplicates_nothing(
    stack: Stack, tiered: TieredStore, failpoint: str, request: pytest.FixtureRequest
) -> None:
    sids = sids_in_one_bucket(3)
    writers = [
        stack.worker(
            "append",
            storage="redis",
            session=",".join(sids),
            proc=p,
            tasks=6,
            appends=8,
            name=f"append-{p}",
            env=stack.env(VEL_FLUSHER="off"),
        )
        for p in range(2)
    ]
    for w in writers:
        w.check(await w.wait_async(60))
    acks = [a for w in writers for a in acks_of(w.lines())]
    assert len(acks) == 2 * 6 * 8
    backlog_before = (await tiered.hot.backlog())[0]
    assert backlog_before == 2 * len(acks)

    killed = stack.vel(
        "flusher",
        lease=2,
        health_interval=0,
        name="flusher-killed",
        env=stack.env(VEL_FAILPOINTS=f"{failpoint}=kill"),
    )
    rc = await killed.wait_async(30)
    assert rc == -signal.SIGKILL, f"rc {rc}: {killed.stderr()[-2000:]}"
    killed_at = time.monotonic()

    # Where exactly it died: nothing acknowledged in Redis; committed only after the commit.
    committed = await count_postgres_rows(stack, sids)
    metas = [await redis_meta(stack.redis_url, stack.prefix, s) for s in sids]
    assert [m["flushed"] for m in metas] == [0, 0, 0], metas
    assert (await tiered.hot.backlog())[0] == backlog_before
    if failpoint == "flush_after_commit":
        assert committed == backlog_before
    else:
        assert committed == 0

    second = stack.vel("flusher", lease=2, health_interval=0.25, name="flusher-second")
    drain = await wait_backlog_zero(tiered, 30)
    redone_after = time.monotonic() - killed_at
    await asyncio.sleep(0.6)  # one more health line with the final counters
    second.signal(signal.SIGTERM)
    second.check(await second.wait_async(30))
    stats_cli = stack.vel("stats", json=True, name="stats")
    stats_cli.check(await stats_cli.wait_async(30))
    (backlog,) = stats_cli.lines()
    assert {
        k: backlog[k] for k in ("unflushed_messages", "oldest_dirty_age", "dirty_sessions")
    } == {
        "unflushed_messages": 0,
        "oldest_dirty_age": 0.0,
        "dirty_sessions": 0,
    }, stats_cli.stdout()
    health = [line for line in second.lines() if "flush_duplicates_suppressed" in line]
    duplicates = max((h["flush_duplicates_suppressed"] for h in health), default=None)
    figures: dict[str, Any] = {
        "failpoint": failpoint,
        "backlog_messages": backlog_before,
        "committed_by_killed_flusher": committed,
        "drained_seconds_after_kill": round(redone_after, 2),
        "drain_seconds_once_second_flusher_started": round(drain, 2),
        "duplicates_suppressed_by_redo": duplicates,
    }
    try:
        if failpoint == "flush_after_commit":
            assert duplicates == committed, figures
        for s in sids:
            meta = await redis_meta(stack.redis_url, stack.prefix, s)
            assert meta["flushed"] == meta["seq"] and meta["due"] is None, meta
            assert meta["pttl"] > 0, meta  # clean again: its TTL is back
        figures.update(await check_tiers(stack, acks, sids))
    finally:
        record_figures(request, figures)


# -- 8 -----------------------------------------------------------------------------------


async def test_frozen_flusher_late_ack_changes_nothing(
    stack: Stack, tiered: TieredStore, request: pytest.FixtureRequest
) -> None:
    sid = new_sid()
    acks = []

    async def append_phase(tag: str, tasks: int, appends: int) -> None:
        proc = stack.worker(
            "append",
            storage="redis",
            session=sid,
            tasks=tasks,
            appends=appends,
            tag=tag,
            name=f"append-{tag}",
            env=stack.env(VEL_FLUSHER="off"),
        )
        proc.check(await proc.wait_async(60))
        found = acks_of(proc.lines())
        assert len(found) == tasks * appends
        acks.extend(found)

    await append_phase("p1-", 4, 10)  # seqs 1..80

    # A pauses 1 s right after its first commit (the window in which the test freezes it),
    # and parks 30 s after its second claim (so that its late ack can be observed alone).
    frozen = stack.vel(
        "flusher",
        lease=1,
        health_interval=0,
        name="flusher-frozen",
        env=stack.env(VEL_FAILPOINTS="flush_after_commit=sleep:1@1,flush_after_claim=sleep:30@2"),
    )
    deadline = time.monotonic() + 20
    while await count_postgres_rows(stack, [sid]) == 0:
        assert frozen.poll() is None, frozen.stderr()[-2000:]
        assert time.monotonic() < deadline, "the first flusher never committed"
        await asyncio.sleep(0.02)
    frozen.signal(signal.SIGSTOP)
    stopped_at = time.monotonic()
    meta = await redis_meta(stack.redis_url, stack.prefix, sid)
    assert meta["flushed"] == 0, f"frozen after its ack, not before it: {meta}"
    assert await count_postgres_rows(stack, [sid]) == 80

    # While A is frozen (holding an ack for seq 80), more messages arrive and B, once A's
    # 1 s lease has run out, redoes A's batch and flushes everything: clean at seq 100.
    await append_phase("p2-", 2, 5)  # seqs 81..100
    helper = stack.vel("flusher", lease=1, health_interval=0.25, name="flusher-b")
    await wait_backlog_zero(tiered, 20)
    await asyncio.sleep(max(0.3, 3.0 - (time.monotonic() - stopped_at)))
    helper.signal(signal.SIGTERM)
    helper.check(await helper.wait_async(30))
    health = [line for line in helper.lines() if "flush_duplicates_suppressed" in line]
    redone = max((h["flush_duplicates_suppressed"] for h in health), default=None)

    # Then the session gets dirty again: flushed 100 < seq 110, no TTL.
    await append_phase("p3-", 1, 5)  # seqs 101..110
    before = await redis_meta(stack.redis_url, stack.prefix, sid)
    assert (before["seq"], before["flushed"], before["pttl"]) == (110, 100, -1), before
    assert before["bucket_backlog"] == 10, before

    # A wakes up: its ack for seq 80 arrives late (it must neither lower ``flushed`` nor
    # count messages as flushed twice nor make the dirty session clean), then it claims the
    # session again and parks there (failpoint).
    frozen_for = time.monotonic() - stopped_at
    frozen.signal(signal.SIGCONT)
    deadline = time.monotonic() + 10
    while True:
        meta = await redis_meta(stack.redis_url, stack.prefix, sid)
        if meta["due"] is not None and meta["due"] > time.time() * 1000 + 300:
            break  # claimed by A (due = now + its lease): its ack went before
        assert frozen.poll() is None, frozen.stderr()[-2000:]
        assert time.monotonic() < deadline, f"the woken flusher never claimed again: {meta}"
        await asyncio.sleep(0.02)
    after = await redis_meta(stack.redis_url, stack.prefix, sid)
    for field in ("seq", "flushed", "gen", "fgen", "pttl", "dirty_since", "bucket_backlog"):
        assert after[field] == before[field], (field, before, after)
    assert await count_postgres_rows(stack, [sid]) == 100

    # C finishes the job once A's new claim has run out; A is then discarded.
    finisher = stack.vel("flusher", lease=1, health_interval=0, name="flusher-c")
    await wait_backlog_zero(tiered, 20)
    finisher.signal(signal.SIGTERM)
    finisher.check(await finisher.wait_async(30))
    frozen.kill()

    final = await redis_meta(stack.redis_url, stack.prefix, sid)
    figures: dict[str, Any] = {
        "frozen_seconds": round(frozen_for, 2),
        "rows_redone_as_duplicates": redone,
        "redis_before_late_ack": {k: before[k] for k in ("seq", "flushed", "bucket_backlog")},
        "redis_after_late_ack": {k: after[k] for k in ("seq", "flushed", "bucket_backlog")},
        "redis_final": {k: final[k] for k in ("seq", "flushed", "bucket_backlog")},
    }
    try:
        assert frozen_for >= 3.0
        assert redone == 80, figures
        assert final["flushed"] == final["seq"] == 110, final
        assert final["due"] is None and final["dirty_since"] is None, final
        assert final["pttl"] > 0 and final["bucket_backlog"] == 0, final
        unflushed, _, dirty = await tiered.hot.backlog()
        assert (unflushed, dirty) == (0, 0)
        figures.update(await check_tiers(stack, acks, [sid]))
    finally:
        record_figures(request, figures)


# -- 9 -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["killed", "frozen"])
async def test_redis_gone_raises_a_typed_error_and_never_hangs(
    stack: Stack, fault: str, request: pytest.FixtureRequest
) -> None:
    op_timeout = 2.0
    sid = new_sid()
    server = RedisServer().start()
    try:
        env = stack.env(redis_url=server.url, VEL_OP_TIMEOUT=str(op_timeout), VEL_FLUSHER="off")
        worker = stack.worker(
            "append",
            storage="redis",
            session=sid,
            rate=20,
            duration=60,
            stop_on_error=True,
            name="appender",
            env=env,
        )
        deadline = time.monotonic() + 30
        while len(worker.events("ack")) < 5:
            assert worker.poll() is None, worker.stderr()[-3000:]
            assert time.monotonic() < deadline, "the worker never appended"
            await asyncio.sleep(0.05)
        assert server.proc is not None
        if fault == "killed":
            server.kill()
        else:
            server.proc.send_signal(signal.SIGSTOP)
        fault_at = time.time()
        rc = await worker.wait_async(30)
        exited_after = time.time() - fault_at
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.proc.send_signal(signal.SIGCONT)
        server.stop()
    worker.check(rc, expected=2)  # 2: the worker saw append errors
    errors = worker.events("error")
    assert errors, worker.stdout()[-2000:]
    first = min(errors, key=lambda e: e["t"])
    figures = {
        "fault": fault,
        "op_timeout_s": op_timeout,
        "error_type": first["type"],
        "failed_append_took_s": round(first["elapsed"], 2),
        "error_after_fault_s": round(first["t"] + first["elapsed"] - fault_at, 2),
        "worker_exited_after_fault_s": round(exited_after, 2),
    }
    record_figures(request, figures)
    assert "StoreUnavailableError" in first["mro"], first
    # A dead server answers at once; a frozen one costs at most the append's bounded retries
    # of one op_timeout each.
    limit = 3.0 if fault == "killed" else 3 * (op_timeout + 1) + 1
    assert figures["error_after_fault_s"] <= limit, figures
    assert exited_after <= limit + 5, figures
