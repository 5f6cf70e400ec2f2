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
import os
import random
import re
import signal
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest
from checker import (
    Ack,
    acks_of,
    compare,
    postgres_rows,
    redis_meta,
    redis_rows,
    same_history,
)
from servers import PostgresServer, RedisServer, sized
from workers import Stack, contents, with_port

from vel.errors import StoreError
from vel.stores.redis.keys import DEFAULT_BUCKETS
from vel.stores.tiered import TieredStore
from vel.testing.proxy import FaultProxy

FIGURES = Path(os.environ.get("VEL_FIGURES_DIR", "/tmp/vel-figures"))
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


async def throwaway_stack(pg: PostgresServer, base: Stack, sub: str) -> Stack:
    """``base``'s Redis prefix with a migrated schema on a throwaway Postgres ``pg``."""
    from vel.stores.postgres.migrate import migrate

    await migrate(pg.dsn, schema=base.schema)
    out = base.out_dir / sub
    out.mkdir(exist_ok=True)
    return Stack(pg.dsn, base.schema, base.redis_url, base.prefix, out)


async def outage_under_load(
    stack: Stack,
    tiered: TieredStore,
    request: pytest.FixtureRequest,
    *,
    rate: float,
    outage: float,
    down: Callable[[], Awaitable[None]],
    up: Callable[[], Awaitable[None]],
    sessions: int = 1,
    procs: int = 1,
    env: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Appends at ``rate``/s (``procs`` worker processes, embedded flushers) while Postgres
    is made unreachable by ``down`` for ``outage`` s, then restored by ``up``: every append
    succeeds, the backlog drains soon after, and both tiers equal the oracle."""
    outage_at = 5.0
    duration = outage_at + outage + 10.0  # the workers still run while the backlog drains
    drained_below = int(2 * rate * 0.5)  # half a second of traffic: caught up
    sids = [new_sid() for _ in range(sessions)]
    workers = [
        stack.worker(
            "append",
            storage="redis",
            session=",".join(sids),
            proc=p,
            tasks=max(5, sessions // procs),
            rate=rate / procs,
            duration=duration,
            name=f"appender-{p}",
            env=env or stack.env(VEL_FLUSHER="embedded", VEL_OP_TIMEOUT="2"),
        )
        for p in range(procs)
    ]
    deadline = time.monotonic() + 30
    while not all(w.events("ack") for w in workers):
        for w in workers:
            assert w.poll() is None, w.stderr()[-3000:]
        assert time.monotonic() < deadline, "the workers never appended"
        await asyncio.sleep(0.05)
    first_ack = time.time()
    down_at, up_at = first_ack + outage_at, first_ack + outage_at + outage
    samples: list[tuple[float, int]] = []
    state = "before"
    while any(w.poll() is None for w in workers):
        now = time.time()
        if state == "before" and now >= down_at:
            await down()
            down_at, state = now, "down"
        elif state == "down" and now >= up_at:
            await up()
            up_at, state = now, "up"
        unflushed, _, _ = await tiered.hot.backlog()
        samples.append((time.time(), unflushed))
        assert time.time() - first_ack < duration + 60, "the workers did not finish"
        await asyncio.sleep(0.1)
    assert state == "up", "the workers ended before the outage was over"
    for w in workers:
        w.check(await w.wait_async(5))

    lines = [line for w in workers for line in w.lines()]
    errors = [line for line in lines if line.get("event") == "error"]
    assert errors == [], errors[:3]
    acks = acks_of(lines)
    during = [a for a in acks if down_at <= a.t < up_at]
    latencies = sorted(line["latency"] for line in lines if line.get("event") == "ack")
    peak = max(n for _, n in samples)
    after = [(t, n) for t, n in samples if t >= up_at]
    caught_up = next((t for t, n in after if n <= drained_below), None)
    drain = None if caught_up is None else round(caught_up - up_at, 2)
    final_unflushed, _, final_dirty = await tiered.hot.backlog()
    stats = [line["stats"] for line in lines if line.get("event") == "stats"]
    figures: dict[str, Any] = {
        "rate_appends_per_s": rate,
        "appends_total": len(acks),
        "appends_during_outage": len(during),
        "append_errors": len(errors),
        "outage_seconds": round(up_at - down_at, 2),
        "p99_append_latency_s": latencies[int(0.99 * (len(latencies) - 1))],
        "max_append_latency_s": latencies[-1],
        "peak_backlog_messages": peak,
        "drain_seconds_after_recovery": drain,
        "drained_means_backlog_at_most": drained_below,
        "final_backlog_messages": final_unflushed,
        "flush_batches_failed": sum(s.get("flush_batches_failed", 0) for s in stats),
        "flush_retries": sum(s.get("flush_retries", 0) for s in stats),
        **(extra or {}),
    }
    try:
        # Appends never waited for Postgres: the outage's share of them all succeeded.
        assert len(during) >= 0.8 * rate * outage, figures
        # The outage really held the flushers back, and they caught up soon after.
        assert peak >= 2 * len(during) * 0.8, figures
        # The flusher's retry backoff is capped at 5 s: it must catch up well before the
        # workers stop (their close would drain what is left and hide a stuck flusher).
        assert drain is not None and drain <= 8.0, figures
        assert (final_unflushed, final_dirty) == (0, 0), figures
        figures.update(await check_tiers(stack, acks, sids))
    finally:
        record_figures(request, figures)


async def test_postgres_unreachable_under_steady_appends(
    stack: Stack, tiered: TieredStore, request: pytest.FixtureRequest
) -> None:
    """The link to Postgres refused (a proxy in between) for 20 s at 50 appends/s."""
    target = urlsplit(stack.pg_dsn)
    proxy = FaultProxy(target.hostname or "127.0.0.1", target.port or 5432).start()

    async def down() -> None:
        proxy.set_mode("refuse")

    async def up() -> None:
        proxy.set_mode("pass")

    try:
        from conftest import schema_dsn

        env = stack.env(
            postgres_dsn=schema_dsn(with_port(stack.pg_dsn, proxy.port), stack.schema),
            VEL_FLUSHER="embedded",
            VEL_OP_TIMEOUT="2",
        )
        await outage_under_load(
            stack, tiered, request, rate=50.0, outage=20.0, down=down, up=up, env=env
        )
    finally:
        proxy.stop()
    assert proxy.connections_total > 0


async def test_postgres_stopped_under_load(
    stack: Stack, tiered: TieredStore, request: pytest.FixtureRequest
) -> None:
    """The Postgres server itself stopped (``pg_ctl stop -m immediate``) and started again.
    Full matrix: 60 s at 500 appends/s over 2 processes; reduced: 6 s at 100/s."""
    rate, outage = sized(100.0, 500.0), sized(6.0, 60.0)
    procs = int(sized(1, 2))
    with PostgresServer() as pg:
        own = await throwaway_stack(pg, stack, "pg-stopped")

        async def down() -> None:
            await asyncio.to_thread(pg.stop, "immediate")

        async def up() -> None:
            await asyncio.to_thread(pg.start)

        # The backlog bound must hold rate x outage (2 messages per append): a deployment
        # that wants to ride out an outage sizes VEL_MAX_UNFLUSHED the same way.
        # Sessions fall into buckets unevenly and the bound is split per bucket: size it so
        # that even one bucket could hold the whole outage.
        bound = int(2 * rate * (outage + 15) * DEFAULT_BUCKETS)
        env = own.env(
            VEL_FLUSHER="embedded", VEL_OP_TIMEOUT="2", VEL_MAX_UNFLUSHED=str(max(bound, 100_000))
        )
        try:
            await outage_under_load(
                own,
                tiered,
                request,
                rate=rate,
                outage=outage,
                down=down,
                up=up,
                sessions=16,
                procs=procs,
                env=env,
                extra={"max_unflushed": max(bound, 100_000)},
            )
        finally:
            own.close()


async def pg_backends(dsn: str) -> int:
    """Client connections to ``dsn``'s server other than this one."""
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
                "AND pid <> pg_backend_pid()"
            )
        )
    finally:
        await conn.close()


async def test_postgres_frozen_blocks_no_task_and_leaks_no_connection(
    stack: Stack, request: pytest.FixtureRequest
) -> None:
    """Postgres SIGSTOPped (accepts nothing, answers nothing): appends keep succeeding, every
    call that needs Postgres fails within its op timeout, and once it thaws the pools hold
    no more connections than their bound."""
    op_timeout, pool_max = 1.5, 4
    frozen_for = sized(6.0, 30.0)
    with PostgresServer() as pg:
        own = await throwaway_stack(pg, stack, "pg-frozen")
        from vel.stores.postgres import PostgresStore
        from vel.stores.redis import RedisStore

        def store() -> TieredStore:
            return TieredStore(
                RedisStore(own.redis_url, key_prefix=own.prefix, write_behind=True),
                PostgresStore(
                    own.pg_dsn, schema=own.schema, op_timeout=op_timeout, pool_max=pool_max
                ),
                flusher=False,
            )

        a, b = store(), store()
        try:
            warm_sid, cold_sid = new_sid(), new_sid()
            await a.append(warm_sid, [{"role": "user", "content": "before"}])
            await a.append(cold_sid, [{"role": "user", "content": "cold"}])
            assert await a.flush(10)
            await a.hot.call("del", lambda c: c.redis.delete(*a.hot.keys.session(cold_sid).data))
            assert await pg_backends(pg.dsn) <= pool_max
            pg.freeze()
            frozen_at = time.monotonic()
            timings: dict[str, float] = {}
            errors: dict[str, str] = {}

            async def timed(name: str, op: Awaitable[Any]) -> None:
                began = time.monotonic()
                try:
                    async with asyncio.timeout(20):  # the server stays frozen until we return
                        await op
                except TimeoutError:
                    errors[name] = "hung for 20 s"
                except Exception as exc:
                    errors[name] = type(exc).__name__
                timings[name] = round(time.monotonic() - began, 2)

            appended = 0
            while time.monotonic() - frozen_at < frozen_for:
                await a.append(warm_sid, [{"role": "user", "content": f"frozen-{appended}"}])
                appended += 1
                await asyncio.sleep(0.05)
            await asyncio.gather(
                timed("flush", a.flusher.flush_once()),
                timed("warm_load", b.load(cold_sid)),
                timed("postgres_load", b.cold.load(cold_sid)),
            )
        finally:
            pg.thaw()
        thawed = time.monotonic()
        try:
            assert await a.flush(30)
            drained = time.monotonic() - thawed
            assert [m["content"] for m in await b.load(cold_sid)] == ["cold"]
            pools = [int((await s.cold.stats())["pool_size"]) for s in (a, b)]
            during = await pg_backends(pg.dsn)
        finally:
            await a.aclose()
            await b.aclose()
        await asyncio.sleep(0.5)
        after = await pg_backends(pg.dsn)
        figures = {
            "frozen_seconds": round(thawed - frozen_at, 2),
            "op_timeout_s": op_timeout,
            "appends_while_frozen": appended,
            "call_seconds_while_frozen": timings,
            "call_errors_while_frozen": errors,
            "drain_seconds_after_thaw": round(drained, 2),
            "pool_sizes_after": pools,
            "server_connections_after_thaw": during,
            "server_connections_after_close": after,
        }
        record_figures(request, figures)
        assert appended >= frozen_for / 0.1, figures
        # Each call is one bounded attempt (or, for the warm, its lease's retries).
        assert set(errors.values()) <= {"StoreTimeoutError", "StoreUnavailableError"}, figures
        assert len(errors) == 3, figures
        assert timings["postgres_load"] <= op_timeout + 1.0, figures
        assert timings["flush"] <= op_timeout + 1.0, figures
        assert timings["warm_load"] <= b.warm_lease + 2 * op_timeout + 1.0, figures
        assert all(n <= pool_max for n in pools), figures
        assert during <= 2 * pool_max, figures
        assert after == 0, figures
        own.close()


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
    # and freezes 30 s after its second claim (so that its late ack can be observed alone;
    # frozen, it cannot renew that claim either).
    frozen = stack.vel(
        "flusher",
        lease=1,
        health_interval=0,
        name="flusher-frozen",
        env=stack.env(VEL_FAILPOINTS="flush_after_commit=sleep:1@1,flush_after_claim=freeze:30@2"),
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


# -- kill -9 at random moments --------------------------------------------------------------


async def test_flusher_killed_at_random_moments(
    stack: Stack, tiered: TieredStore, request: pytest.FixtureRequest
) -> None:
    """Flushers SIGKILLed at random moments while writers keep appending (full matrix: 100
    kills; reduced: 5). Small sleeps at each flush step widen the windows a kill can land
    in (claimed, mid-transaction, committed but not acknowledged)."""
    kills = int(sized(8, 100))
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    sids = sids_in_one_bucket(3)
    appends = int(sized(60, 1200))
    writer = stack.worker(
        "append",
        storage="redis",
        session=",".join(sids),
        tasks=3,
        appends=appends,
        rate=30,
        name="writer",
        env=stack.env(VEL_FLUSHER="off"),
    )
    widen = "flush_after_claim=sleep:0.05,flush_mid_transaction=sleep:0.1,"
    widen += "flush_after_commit=sleep:0.1"
    moments = []
    started = time.monotonic()
    for k in range(kills):
        flusher = stack.vel(
            "flusher",
            lease=0.5,
            health_interval=0,
            name=f"flusher-{k}",
            env=stack.env(VEL_FAILPOINTS=widen),
        )
        deadline = time.monotonic() + 30
        while "vel flusher running" not in flusher.stdout():
            assert flusher.poll() is None, flusher.stderr()[-2000:]
            assert time.monotonic() < deadline, "the flusher never started"
            await asyncio.sleep(0.01)
        moment = rng.uniform(0.0, 0.6)
        await asyncio.sleep(moment)
        assert flusher.poll() is None, flusher.stderr()[-2000:]
        flusher.signal(signal.SIGKILL)
        assert await flusher.wait_async(10) == -signal.SIGKILL
        moments.append(round(moment, 3))
    kill_phase = time.monotonic() - started
    writer.check(await writer.wait_async(appends / 10 + 60))
    acks = acks_of(writer.lines())
    committed_before_final = await count_postgres_rows(stack, sids)
    final = stack.vel("flusher", lease=0.5, health_interval=0.25, name="flusher-final")
    # Running (its SIGTERM handler installed: it prints this line after) before it is
    # stopped: the killed flushers may have left nothing to do, and a SIGTERM during start-up
    # would kill it rather than stop it ("exited with -15").
    deadline = time.monotonic() + 60
    while "vel flusher running" not in final.stdout():
        assert final.poll() is None, final.stderr()[-2000:]
        assert time.monotonic() < deadline, "the final flusher never started"
        await asyncio.sleep(0.01)
    drain = await wait_backlog_zero(tiered, 60)
    await asyncio.sleep(0.4)
    final.signal(signal.SIGTERM)
    final.check(await final.wait_async(30))
    health = [line for line in final.lines() if "flush_duplicates_suppressed" in line]
    redone = max((h["flush_duplicates_suppressed"] for h in health), default=0)
    figures: dict[str, Any] = {
        "kills": kills,
        "seed": seed,
        "kill_phase_seconds": round(kill_phase, 1),
        "appends_acknowledged": len(acks),
        "rows_committed_by_killed_flushers": committed_before_final,
        "duplicates_suppressed_by_final_flusher": redone,
        "final_drain_seconds": round(drain, 2),
        "kill_moments_s_after_start_first10": moments[:10],
    }
    try:
        assert len(acks) == 3 * appends
        figures.update(await check_tiers(stack, acks, sids))
    finally:
        record_figures(request, figures)


# -- Redis killed with AOF everysec and restarted ---------------------------------------------


async def test_redis_killed_with_aof_and_restarted(
    stack: Stack, request: pytest.FixtureRequest
) -> None:
    """Redis (``appendonly yes``, ``appendfsync everysec``) SIGKILLed under appends and
    started again from its AOF: acknowledged-and-lost is measured against the oracle (a
    process kill leaves the page cache intact, so expect 0; only a machine crash can lose
    up to ~1 s), and appends resume within seconds of the restart. The flusher is off so
    that Redis alone is measured."""
    rate, rounds = sized(200.0, 500.0), int(sized(1, 5))
    sid_list = [new_sid() for _ in range(8)]
    server = RedisServer("--appendonly", "yes", "--appendfsync", "everysec").start()
    try:
        env = stack.env(
            redis_url=server.url,
            VEL_OP_TIMEOUT="1",
            VEL_FLUSHER="off",
            VEL_BACKPRESSURE_WAIT="0",
            VEL_MAX_UNFLUSHED="100000000",  # nothing is flushed here: no backpressure either
        )
        worker = stack.worker(
            "append",
            storage="redis",
            session=",".join(sid_list),
            tasks=8,
            rate=rate,
            duration=4.0 + rounds * 6.0,
            name="appender",
            env=env,
        )
        resumed_after = []
        deadline = time.monotonic() + 30
        while len(worker.events("ack")) < rate:
            assert worker.poll() is None, worker.stderr()[-3000:]
            assert time.monotonic() < deadline, "the worker never appended"
            await asyncio.sleep(0.05)
        for _ in range(rounds):
            await asyncio.sleep(1.0 + random.random())
            server.kill()
            await asyncio.sleep(1.0)
            await asyncio.to_thread(server.restart)
            restarted = time.time()
            deadline = time.monotonic() + 30
            while not [a for a in worker.events("ack") if a["t"] >= restarted]:
                assert worker.poll() is None, worker.stderr()[-3000:]
                assert time.monotonic() < deadline, "appends never resumed"
                await asyncio.sleep(0.02)
            first = min(a["t"] + a["latency"] for a in worker.events("ack") if a["t"] >= restarted)
            resumed_after.append(round(first - restarted, 2))
            await asyncio.sleep(2.0)
        rc = await worker.wait_async(60)
        assert rc in (0, 2), worker.stderr()[-3000:]
        lines = worker.lines()
        acks = acks_of(lines)
        errors = [line for line in lines if line.get("event") == "error"]
        maybe = {c for e in errors for c in contents("", e["proc"], e["task"], e["i"])}
        lost = duplicated = gaps = 0
        for sid in sid_list:
            rows = await redis_rows(server.url, stack.prefix, sid)
            report = compare(acks, rows, where="redis", session_id=sid, maybe=maybe)
            lost += len(report.lost)
            duplicated += len(report.duplicated)
            gaps += len(report.gaps) + len(report.misplaced)
    finally:
        server.stop()
    types = sorted({e["type"] for e in errors})
    figures = {
        "kills": rounds,
        "rate_appends_per_s": rate,
        "appends_acknowledged": len(acks),
        "appends_failed_while_down": len(errors),
        "error_types": types,
        "acknowledged_and_lost_messages": lost,
        "duplicated": duplicated,
        "gaps_or_misplaced": gaps,
        "appends_resumed_after_restart_s": resumed_after,
    }
    record_figures(request, figures)
    assert errors, "the kill was not noticed"
    assert set(types) <= {"StoreUnavailableError", "StoreTimeoutError"}, figures
    assert (lost, duplicated, gaps) == (0, 0, 0), figures
    assert max(resumed_after) <= 5.0, figures


# -- resets, blackholes and latency on the Redis link ---------------------------------------


async def test_retried_appends_never_duplicate_through_resets_and_blackholes(
    stack: Stack, request: pytest.FixtureRequest
) -> None:
    """Replies lost on the Redis link (the command ran, the client saw a reset), a blackhole
    that delivers the request late, and latency: appends retried with the same message ids
    (by vel, by redis-py, and by the caller) are stored exactly once."""
    from vel.errors import StoreUnavailableError
    from vel.stores.postgres import PostgresStore
    from vel.stores.redis import RedisStore

    target = urlsplit(stack.redis_url)
    proxy = FaultProxy(target.hostname or "127.0.0.1", target.port or 6379, seed=7).start()
    hot = RedisStore(
        with_port(stack.redis_url, proxy.port),
        key_prefix=stack.prefix,
        write_behind=True,
        op_timeout=1.0,
    )
    store = TieredStore(hot, PostgresStore(stack.pg_dsn, schema=stack.schema), flusher=False)
    sids = [new_sid() for _ in range(4)]
    acks = []
    failed: set[str] = set()
    attempts_total = 0
    appends = int(sized(60, 600))

    async def writer(t: int, tag: str, n: int) -> None:
        nonlocal attempts_total
        sid = sids[t % len(sids)]
        for i in range(n):
            texts = [f"{tag}{t}-{i}-u", f"{tag}{t}-{i}-a"]
            msgs = [
                {"role": "user", "content": texts[0]},
                {"role": "assistant", "content": texts[1]},
            ]
            ids = [uuid.uuid4().hex, uuid.uuid4().hex]
            for _attempt in range(8):  # the caller's own retries, same ids
                attempts_total += 1
                try:
                    seq = await store.append(sid, msgs, message_ids=ids)
                except StoreUnavailableError:
                    await asyncio.sleep(0.02)
                    continue
                acks.append(
                    acks_of(
                        [
                            {
                                "event": "ack",
                                "sid": sid,
                                "proc": 0,
                                "task": t,
                                "i": i,
                                "seq": seq,
                                "contents": texts,
                                "tag": tag,
                            }
                        ]
                    )[0]
                )
                break
            else:
                failed.update(texts)

    figures: dict[str, Any] = {}
    try:
        # Each reply dropped with probability 0.1: many appends ran but looked failed.
        proxy.set_reset(0.1)
        await asyncio.gather(*(writer(t, "r", appends // 4) for t in range(4)))
        figures["replies_dropped"] = proxy.replies_dropped
        proxy.set_mode("pass")

        # A blackhole: the request is held, the client times out, then the request arrives.
        proxy.set_mode("blackhole")
        sid = sids[0]
        ids = [uuid.uuid4().hex]
        msgs = [{"role": "user", "content": "held-back"}]
        began = time.monotonic()
        with pytest.raises(StoreUnavailableError):
            await store.append(sid, msgs, message_ids=ids)
        figures["blackholed_append_failed_after_s"] = round(time.monotonic() - began, 2)
        proxy.set_mode("pass")
        await asyncio.sleep(0.3)  # the held request reaches Redis late
        seq = await store.append(sid, msgs, message_ids=ids)
        acks.append(
            acks_of(
                [
                    {
                        "event": "ack",
                        "sid": sid,
                        "proc": 9,
                        "task": 0,
                        "i": 0,
                        "seq": seq,
                        "contents": ["held-back"],
                        "tag": "b",
                    }
                ]
            )[0]
        )

        # Latency: slower, never wrong.
        proxy.set_latency(0.02)
        began = time.monotonic()
        await asyncio.gather(*(writer(t, "l", 5) for t in range(2)))
        figures["ten_appends_with_20ms_latency_s"] = round(time.monotonic() - began, 2)
        proxy.set_latency(0.0)
        figures["replays_suppressed"] = hot.counters["duplicates_suppressed"]
    finally:
        await store.aclose()
        proxy.stop()
    lost = duplicated = gaps = 0
    for sid in sids:
        rows = await redis_rows(stack.redis_url, stack.prefix, sid)
        report = compare(acks, rows, where="redis", session_id=sid, maybe=failed)
        lost += len(report.lost)
        duplicated += len(report.duplicated)
        gaps += len(report.gaps) + len(report.misplaced) + len(report.order)
        assert not report.problems, report.summary()
    figures.update(
        appends_acknowledged=len(acks),
        appends_given_up=len(failed) // 2,
        attempts=attempts_total,
        lost=lost,
        duplicated=duplicated,
        gaps=gaps,
    )
    record_figures(request, figures)
    assert figures["replies_dropped"] > 0 and figures["replays_suppressed"] > 0, figures
    assert figures["blackholed_append_failed_after_s"] <= 3 * (1.0 + 1.0) + 1, figures


# -- TTL and eviction never touch dirty sessions ----------------------------------------------


async def expiry_watch(url: str, prefix: str) -> tuple[Any, list[tuple[str, str]]]:
    """Subscribe to expired/evicted keyevents of ``prefix``; returns (task, events)."""
    import redis.asyncio as aioredis

    events: list[tuple[str, str]] = []
    client = aioredis.Redis.from_url(url)
    pubsub = client.pubsub()
    await pubsub.psubscribe("__keyevent@0__:expired", "__keyevent@0__:evicted")
    stop = asyncio.Event()

    async def run() -> None:
        try:
            while not stop.is_set():
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
                if msg is not None:
                    key = msg["data"].decode()
                    if key.startswith(prefix + ":"):
                        events.append((msg["channel"].decode().rsplit(":", 1)[1], key))
        finally:
            await pubsub.aclose()
            await client.aclose()

    task = asyncio.create_task(run())
    task.stop = stop  # type: ignore[attr-defined]
    return task, events


def session_of(keys_by_sid: dict[str, set[str]], key: str) -> str | None:
    return next((sid for sid, keys in keys_by_sid.items() if key in keys), None)


async def test_hot_ttl_never_expires_a_dirty_session(
    stack: Stack, request: pytest.FixtureRequest
) -> None:
    """hot TTL 2 s, Postgres unreachable: keyspace notifications show clean sessions expire
    and no key of a dirty session does; once Postgres is back they flush, then expire."""
    from vel.stores.postgres import PostgresStore
    from vel.stores.redis import RedisStore

    n = int(sized(8, 50))
    target = urlsplit(stack.pg_dsn)
    server = RedisServer("--notify-keyspace-events", "Exe").start()
    proxy = FaultProxy(target.hostname or "127.0.0.1", target.port or 5432).start()
    cold = PostgresStore(with_port(stack.pg_dsn, proxy.port), schema=stack.schema, op_timeout=1.0)
    hot = RedisStore(
        server.url, key_prefix=stack.prefix, write_behind=True, hot_ttl=2.0, flush_delay=0
    )
    store = TieredStore(hot, cold, flusher=False)
    watch, events = await expiry_watch(server.url, stack.prefix)
    clean, dirty = [new_sid() for _ in range(n)], [new_sid() for _ in range(n)]
    keys = {sid: set(hot.keys.session(sid).data) for sid in clean + dirty}
    try:
        # Every session starts warm and clean (a new one must be looked up in Postgres).
        for sid in clean + dirty:
            await store.append(sid, [{"role": "user", "content": f"{sid}-c"}])
        assert await store.flush(20)
        proxy.set_mode("refuse")
        for sid in dirty:
            await store.append(sid, [{"role": "user", "content": f"{sid}-d"}])
        with pytest.raises(StoreError):
            await store.flusher.flush_once()
        await asyncio.sleep(sized(5.0, 15.0))
        expired_while_down = {session_of(keys, k) for _, k in events}
        lost = expired_while_down & set(dirty)
        assert not lost, f"{len(lost)} dirty sessions expired while Postgres was down"
        proxy.set_mode("pass")
        assert await store.flush(30)
        await asyncio.sleep(3.5)
        expired_after = {session_of(keys, k) for _, k in events}
    finally:
        watch.stop.set()  # type: ignore[attr-defined]
        await watch
        await store.aclose()
        proxy.stop()
        server.stop()
    figures = {
        "sessions_each": n,
        "hot_ttl_s": 2.0,
        "clean_expired_while_postgres_down": len(expired_while_down & set(clean)),
        "dirty_expired_while_postgres_down": len(expired_while_down & set(dirty)),
        "dirty_expired_after_flush": len(expired_after & set(dirty)),
        "expired_events": len(events),
    }
    record_figures(request, figures)
    assert figures["dirty_expired_while_postgres_down"] == 0, figures
    assert figures["clean_expired_while_postgres_down"] == n, figures
    assert figures["dirty_expired_after_flush"] == n, figures


async def test_maxmemory_volatile_lru_evicts_only_clean_sessions(
    stack: Stack, request: pytest.FixtureRequest
) -> None:
    """``maxmemory`` with ``volatile-lru`` under a stream of new sessions while the flusher
    is off for some: ``evicted`` notifications name only clean sessions, and every dirty
    session is intact afterwards."""
    from vel.errors import StoreFullError
    from vel.stores.postgres import PostgresStore
    from vel.stores.redis import RedisStore

    server = RedisServer(
        "--maxmemory",
        "8mb",
        "--maxmemory-policy",
        "volatile-lru",
        "--notify-keyspace-events",
        "Ee",
    ).start()
    hot = RedisStore(server.url, key_prefix=stack.prefix, write_behind=True)
    store = TieredStore(hot, PostgresStore(stack.pg_dsn, schema=stack.schema), flusher=False)
    watch, events = await expiry_watch(server.url, stack.prefix)
    payload = "x" * 4000
    dirty, clean = [new_sid() for _ in range(int(sized(20, 100)))], []
    keys: dict[str, set[str]] = {}
    full_errors = 0
    try:
        for sid in dirty:
            keys[sid] = set(hot.keys.session(sid).data)
            await store.append(sid, [{"role": "user", "content": f"{sid}-{payload}"}])
        for sid in dirty:
            await store.append(sid, [{"role": "user", "content": f"{sid}-again"}])
        # A stream of sessions that get flushed (clean, TTL on) until Redis must evict.
        for i in range(int(sized(6000, 20000))):
            sid = new_sid()
            clean.append(sid)
            keys[sid] = set(hot.keys.session(sid).data)
            try:
                await store.append(sid, [{"role": "user", "content": f"{sid}-{payload}"}])
            except StoreFullError:
                full_errors += 1
            if i % 50 == 49:
                # Flush only the clean stream: the dirty ones stay due later.
                await flush_only(store, set(clean))
            if i > 200 and sum(1 for kind, _ in events if kind == "evicted") > 200:
                break
        await asyncio.sleep(0.3)
        evicted = [k for kind, k in events if kind == "evicted"]
        owners = {session_of(keys, k) for k in evicted}
        intact = 0
        for sid in dirty:
            rows = await redis_rows(server.url, stack.prefix, sid)
            if [r.content for r in rows] == [f"{sid}-{payload}", f"{sid}-again"]:
                intact += 1
    finally:
        watch.stop.set()  # type: ignore[attr-defined]
        await watch
        await store.aclose()
        server.stop()
    figures = {
        "dirty_sessions": len(dirty),
        "clean_sessions_written": len(clean),
        "evicted_keys": len(evicted),
        "evicted_dirty_sessions": len(owners & set(dirty)),
        "evicted_clean_sessions": len(owners & set(clean)),
        "evicted_other_keys": sum(1 for k in evicted if session_of(keys, k) is None),
        "dirty_sessions_intact": intact,
        "appends_refused_oom": full_errors,
    }
    record_figures(request, figures)
    assert figures["evicted_clean_sessions"] > 0, figures
    assert figures["evicted_dirty_sessions"] == 0, figures
    assert intact == len(dirty), figures


async def flush_only(store: TieredStore, sids: set[str]) -> None:
    """Flush the sessions in ``sids`` only: the others are pushed back before each sweep."""
    hot = store.hot
    for bucket in range(hot.keys.buckets):
        dirty_key = hot.keys.bucket_keys(bucket)[0]
        members = await hot.call("zrange", lambda c, k=dirty_key: c.redis.zrange(k, 0, -1))
        others = [m.decode() for m in members if m.decode() not in sids]
        if others:
            await hot.reschedule(bucket, others, delay=3600)
    await store.flusher.flush_once()


# -- the stale-warm race ----------------------------------------------------------------------


async def test_slow_warm_never_installs_a_stale_history(
    stack: Stack, request: pytest.FixtureRequest
) -> None:
    """A warm frozen past its lease (``during_warm=freeze``: its event loop blocked, so not
    even the lease renewal runs, as in a long GC pause) while another worker warms the same
    session, appends, flushes and lets it expire: the frozen warm must not seed its old
    snapshot, and its read never returns fewer messages than Postgres holds. The frozen
    worker runs its own event loop on a thread of its own."""
    from vel import failpoints
    from vel.stores.postgres import PostgresStore
    from vel.stores.redis import RedisStore

    def store(hot_ttl: float, lease: float) -> TieredStore:
        return TieredStore(
            RedisStore(
                stack.redis_url, key_prefix=stack.prefix, write_behind=True, hot_ttl=hot_ttl
            ),
            PostgresStore(stack.pg_dsn, schema=stack.schema),
            flusher=False,
            warm_lease=lease,
        )

    sid = new_sid()
    b = store(0.3, 1.0)
    stale = 0

    def frozen_worker() -> tuple[list[Any], list[Any]]:
        async def main() -> tuple[list[Any], list[Any]]:
            nonlocal stale
            a = store(3600, 1.0)
            try:
                seen = await a.load(sid)
                again = await a.load(sid)
                stale = int(a.counters["warm_loads_stale"])
                return seen, again
            finally:
                await a.aclose()

        return asyncio.run(main())

    try:
        await b.append(sid, [{"role": "user", "content": f"m{i}"} for i in range(10)])
        assert await b.flush(10)
        await b.hot.call("del", lambda c: c.redis.delete(*b.hot.keys.session(sid).data))
        failpoints.configure("during_warm=freeze:4@1")
        slow = asyncio.create_task(asyncio.to_thread(frozen_worker))
        await asyncio.sleep(1.3)  # a's warm lease (1 s) has run out, a is still frozen
        assert not slow.done()
        await b.append(
            sid, [{"role": "user", "content": "m10"}, {"role": "user", "content": "m11"}]
        )
        assert await b.flush(10)
        deadline = time.monotonic() + 5
        while await b.hot.exists(sid):
            assert time.monotonic() < deadline, "b's session never expired"
            await asyncio.sleep(0.05)
        assert not slow.done(), "the frozen warm ended before the race was set up"
        seen, again = await slow
        in_postgres = await count_postgres_rows(stack, [sid])
    finally:
        failpoints.configure("")
        await b.aclose()
    figures = {
        "messages_in_postgres": in_postgres,
        "messages_returned_by_stalled_warm": len(seen),
        "messages_read_after": len(again),
        "stale_seeds_refused": stale,
    }
    record_figures(request, figures)
    assert in_postgres == 12
    assert len(seen) >= in_postgres, figures
    assert [m["content"] for m in again] == [f"m{i}" for i in range(12)], figures
    assert stale >= 1, figures


async def test_a_retry_after_the_session_left_redis_is_still_recognised(
    tiered: TieredStore,
) -> None:
    """The replay record is rebuilt from Postgres' message ids when a session is warmed, so a
    caller's late retry of an already flushed append is a no-op that returns its last seq."""
    sid = new_sid()
    first = [{"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"}]
    second = [{"role": "user", "content": f"u2-{i}"} for i in range(3)]
    first_ids = [uuid.uuid4().hex for _ in first]
    second_ids = [uuid.uuid4().hex for _ in second]
    assert await tiered.append(sid, first, message_ids=first_ids) == 2
    assert await tiered.append(sid, second, message_ids=second_ids) == 5
    assert await tiered.flush(10)
    await tiered.hot.call("del", lambda c: c.redis.delete(*tiered.hot.keys.session(sid).data))
    assert await tiered.append(sid, second, message_ids=second_ids) == 5
    assert await tiered.append(sid, first, message_ids=first_ids) == 2
    assert await tiered.load(sid) == first + second
    assert await tiered.flush(10)  # nothing new to write, so no conflict with Postgres' rows
    assert tiered.flusher.counters["flush_conflicts"] == 0


@pytest.mark.parametrize("evicted", ["meta", "messages", "replays"])
async def test_append_right_after_one_key_of_a_clean_session_was_evicted(
    tiered: TieredStore, stack: Stack, evicted: str
) -> None:
    """``volatile-*`` eviction takes single keys: whichever key of a clean session goes, the
    next append lands after the whole history (warmed again from Postgres), never at wrong
    seqs, and the session stays readable and flushable."""
    sid = new_sid()
    for content in ("a", "b", "c"):
        await tiered.append(sid, [{"role": "user", "content": content}])
    assert await tiered.flush(10)
    keys = tiered.hot.keys.session(sid)
    key = {"meta": keys.meta, "messages": keys.messages, "replays": keys.replays}[evicted]
    await tiered.hot.call("del", lambda c: c.redis.delete(key))
    assert await tiered.append(sid, [{"role": "user", "content": "d"}]) == 4
    assert await tiered.flush(10)
    expected = [{"role": "user", "content": c} for c in "abcd"]
    assert await tiered.load(sid) == expected
    assert [r.message for r in await postgres_rows(stack.pg_dsn, stack.schema, sid)] == expected


@pytest.mark.parametrize("failpoint", ["after_append_script", "during_warm"])
async def test_worker_killed_at_an_append_or_warm_failpoint(
    stack: Stack, tiered: TieredStore, failpoint: str, request: pytest.FixtureRequest
) -> None:
    """A worker SIGKILLed right after its append script ran (the caller never got the ack),
    or while warming a cold session (holding the warm lease): another worker carries on
    (after the warm lease, ``VEL_WARM_LEASE``, in the second case); nothing acknowledged is
    lost, nothing is duplicated, and the unacknowledged append is stored at most once."""
    sid = new_sid()
    await tiered.append(sid, [{"role": "user", "content": f"old-{i}"} for i in range(4)])
    assert await tiered.flush(10)
    await tiered.hot.call("del", lambda c: c.redis.delete(*tiered.hot.keys.session(sid).data))

    killed = stack.worker(
        "append",
        storage="redis",
        session=sid,
        appends=3,
        tag="a-",
        name="killed",
        env=stack.env(VEL_FAILPOINTS=f"{failpoint}=kill"),
    )
    rc = await killed.wait_async(30)
    assert rc == -signal.SIGKILL, f"rc {rc}: {killed.stderr()[-2000:]}"
    assert acks_of(killed.lines()) == []
    began = time.monotonic()
    survivor = stack.worker("append", storage="redis", session=sid, appends=3, tag="b-",
                            name="survivor")  # fmt: skip
    survivor.check(await survivor.wait_async(60))
    took = time.monotonic() - began
    assert await tiered.flush(20)
    acks = acks_of(survivor.lines())
    maybe = set(contents("a-", 0, 0, 0))
    cold = await postgres_rows(stack.pg_dsn, stack.schema, sid)
    hot = await redis_rows(stack.redis_url, stack.prefix, sid)
    old = [f"old-{i}" for i in range(4)]
    figures = {
        "failpoint": failpoint,
        "survivor_seconds": round(took, 2),
        "unacknowledged_append_stored": [r.content for r in cold].count(maybe.pop()),
        "postgres_rows": len(cold),
    }
    record_figures(request, figures)
    seeded = Ack(sid=sid, proc=-1, task=0, i=0, seq=4, contents=tuple(old))
    report = compare([seeded, *acks], cold, where="postgres", session_id=sid,
                     maybe=contents("a-", 0, 0, 0))  # fmt: skip
    assert not report.problems, report.summary()
    assert same_history(cold, hot) == []
    if failpoint == "during_warm":
        assert figures["unacknowledged_append_stored"] == 0


async def test_a_copy_that_lost_writes_postgres_holds_is_warmed_again(
    tiered: TieredStore, stack: Stack
) -> None:
    """A failover to a replica that had not received the last appends leaves a copy behind
    what a flusher already wrote to Postgres: the flusher's acknowledgement then drops the
    copy (it never marks it flushed beyond its seq), the next append warms it again and
    lands after Postgres' last seq, and the append is flushed: nothing acknowledged is lost,
    no seq is used twice."""
    sid = new_sid()
    await tiered.append(sid, [{"role": "user", "content": c} for c in "abc"])
    assert await tiered.flush(10)
    keys = tiered.hot.keys.session(sid)

    async def behind(c: Any) -> Any:  # the replica never got message c
        pipe = c.redis.pipeline(transaction=False)
        pipe.hset(keys.meta, mapping={"seq": 2, "flushed": 2})
        pipe.rpop(keys.messages)
        return await pipe.execute()

    await tiered.hot.call("behind", behind)
    gen = int(await tiered.hot.call("gen", lambda c: c.redis.hget(keys.meta, "gen")))
    await tiered.hot.ack([(sid, gen, 3)])  # the flusher that wrote c to Postgres, late
    assert not await tiered.hot.exists(sid)
    assert await tiered.append(sid, [{"role": "user", "content": "d"}]) == 4
    assert await tiered.flush(10)
    expected = [{"role": "user", "content": c} for c in "abcd"]
    assert await tiered.load(sid) == expected
    assert [r.message for r in await postgres_rows(stack.pg_dsn, stack.schema, sid)] == expected
