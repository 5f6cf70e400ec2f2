"""Locks and leases through faults, with real OS processes: backend restarts under turns,
workers SIGKILLed in a loop while others append.

- Redis ``kill -9`` (AOF on) or a Postgres restart while 8 tasks run turns on 4 sessions:
  every session accepts a turn within one turn-lock lease of the backend's return (a lock
  granted just before the fault outlives it by its lease at most); nothing acknowledged is
  lost, every turn is whole.
- Workers killed in a loop while 4 others append (every worker runs an embedded flusher):
  every acknowledged message is in Postgres within 10 s of the last kill (a dead flusher's
  claims hold their sessions back for one flush lease at most).

Reduced sizes in the default suite; ``scripts/turn-lifecycle`` runs them at full size, with the
default leases. Figures go to ``$VEL_FIGURES_DIR`` (default ``/tmp/vel-figures``).
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
import uuid
from typing import Any

import asyncpg
import pytest
from checker import acks_of, postgres_rows, redis_rows
from servers import PostgresServer, RedisServer, sized
from test_faults import record_figures, throwaway_stack
from workers import Proc, Stack

from vel.settings import load_settings
from vel.testing import FakeOpenAIServer

pytestmark = pytest.mark.slow


def new_sid() -> str:
    return f"lf-{uuid.uuid4().hex[:10]}"


def check_turns(lines: list[dict[str, Any]], histories: dict[str, list[str]]) -> dict[str, int]:
    """Every acknowledged turn is in its session once, whole (its user message, then its
    answer); a failed turn is either absent or whole too; nothing else is there."""
    acked = {(line["sid"], line["turn"]) for line in lines if line.get("event") == "turn"}
    failed = {(line["sid"], line["turn"]) for line in lines if line.get("event") == "error"}
    lost = duplicated = broken = stored_failed = 0
    for sid, contents in histories.items():
        pairs = list(zip(contents[::2], contents[1::2], strict=False))
        if len(contents) % 2:
            broken += 1
        seen: set[str] = set()
        for user, answer in pairs:
            if answer != f"You said: {user}":
                broken += 1
            if user in seen:
                duplicated += 1
            seen.add(user)
            if (sid, user) in failed:
                stored_failed += 1
            elif (sid, user) not in acked:
                broken += 1  # stored, yet nobody ran it
        lost += sum(1 for s, m in acked if s == sid and m not in seen)
    return {
        "turns_acknowledged": len(acked),
        "turns_failed": len(failed),
        "failed_turns_stored_whole": stored_failed,
        "acknowledged_turns_lost": lost,
        "duplicated": duplicated,
        "broken_or_unexpected": broken,
    }


async def wait_turns(
    worker: Proc, since: float, sids: list[str], timeout: float
) -> dict[str, float]:
    """Seconds from ``since`` until each session's first turn that ended after it."""
    deadline = time.monotonic() + timeout
    while True:
        firsts: dict[str, float] = {}
        for line in worker.events("turn"):
            if line["t1"] >= since and line["sid"] in sids:
                firsts[line["sid"]] = min(firsts.get(line["sid"], 1e18), line["t1"] - since)
        if len(firsts) == len(sids):
            return firsts
        assert worker.poll() is None, worker.stderr()[-3000:]
        if time.monotonic() >= deadline:
            return firsts
        await asyncio.sleep(0.05)


async def postgres_pairs(stack: Stack, sids: list[str]) -> set[tuple[str, str]]:
    """(session id, content) of every message Postgres holds for ``sids`` (one query)."""
    conn = await asyncpg.connect(stack.pg_dsn, timeout=10)
    try:
        rows = await conn.fetch(
            f"SELECT session_id, message->>'content' AS content FROM \"{stack.schema}\"."
            "vel_messages WHERE session_id = ANY($1::text[])",
            sids,
        )
    finally:
        await conn.close()
    return {(r["session_id"], r["content"]) for r in rows}


async def postgres_contents(stack: Stack, sids: list[str]) -> set[str]:
    return {content for _, content in await postgres_pairs(stack, sids)}


def turn_lock_held(cluster: Any, layout: Any, sid: str) -> bool:
    key = layout.session(sid).turn_lock
    client = cluster.node_client(cluster.master_of_key(key))
    try:
        value = client.get(key)
        # ~token: a tombstone; ?: released, reserved for a turn that waited
        return value is not None and not value.startswith((b"~", b"?"))
    finally:
        client.close()


@pytest.mark.parametrize("backend", ["redis", "postgres"])
async def test_every_session_takes_a_turn_within_one_lease_after_a_backend_restart(
    stack: Stack, srv: FakeOpenAIServer, backend: str, request: pytest.FixtureRequest
) -> None:
    lease = sized(3.0, load_settings({}).lock_lease)
    rounds = int(sized(1, 3))
    down_for = sized(1.0, 3.0)
    sids = [new_sid() for _ in range(4)]
    extra = {
        "openai_url": srv.base_url,
        "VEL_OP_TIMEOUT": "1",
        **({"VEL_LOCK_LEASE": str(lease)} if lease != load_settings({}).lock_lease else {}),
    }
    redis_server = pg_server = None
    if backend == "redis":
        redis_server = RedisServer("--appendonly", "yes", "--appendfsync", "everysec").start()
        env = stack.env(redis_url=redis_server.url, **extra)
        storage, where = "redis", stack
    else:
        pg_server = PostgresServer().start()
        where = await throwaway_stack(pg_server, stack, "pg")
        env = where.env(**extra)
        storage = "database"
    duration = 4.0 + rounds * (down_for + lease + 6.0)
    worker = stack.worker(
        "turns", storage=storage, session=",".join(sids), tasks=8, duration=duration,
        name="turns", env=env,
    )  # fmt: skip
    delays: list[dict[str, float]] = []
    try:
        began = await wait_turns(worker, 0.0, sids, 30)
        assert len(began) == len(sids), "the worker never ran a turn on every session"
        for _ in range(rounds):
            await asyncio.sleep(1.0 + random.random())
            if redis_server is not None:
                redis_server.kill()
            else:
                assert pg_server is not None
                await asyncio.to_thread(pg_server.stop, "immediate")
            await asyncio.sleep(down_for)
            await asyncio.to_thread(
                redis_server.start if redis_server is not None else pg_server.start  # type: ignore[union-attr]
            )
            back = time.time()
            delays.append(await wait_turns(worker, back, sids, lease + 20))
        rc = await worker.wait_async(duration + 60)
        worker.check(rc)
        lines = worker.lines()
        histories: dict[str, list[str]] = {}
        for sid in sids:
            if redis_server is not None:
                rows = await redis_rows(redis_server.url, stack.prefix, sid)
            else:
                rows = await postgres_rows(where.pg_dsn, where.schema, sid)
            histories[sid] = [r.content for r in rows]
    finally:
        worker.kill()
        if redis_server is not None:
            redis_server.stop()
        if pg_server is not None:
            pg_server.destroy()
    errors = sorted({e["type"] for e in worker.events("error")})
    worst = max((max(d.values(), default=1e9) for d in delays), default=1e9)
    figures = {
        "backend": backend,
        "restarts": rounds,
        "down_seconds": down_for,
        "lock_lease_s": lease,
        "tasks_x_sessions": "8 x 4",
        "sessions_taking_turns_after_return": [len(d) for d in delays],
        "first_turn_after_return_s": [
            {sid[-4:]: round(v, 2) for sid, v in d.items()} for d in delays
        ],
        "worst_first_turn_after_return_s": round(worst, 2),
        "error_types": errors,
        **check_turns(lines, histories),
    }
    record_figures(request, figures)
    assert all(len(d) == len(sids) for d in delays), figures
    assert worst <= lease + 1.5, figures
    assert figures["acknowledged_turns_lost"] == 0, figures
    assert figures["duplicated"] == figures["broken_or_unexpected"] == 0, figures
    assert "SessionLockedError" not in errors, figures


async def test_killed_workers_claims_hold_back_write_behind_for_one_lease(
    stack: Stack, request: pytest.FixtureRequest
) -> None:
    """Workers (each with its embedded flusher) SIGKILLed in a loop while 4 others append:
    every message acknowledged before the last kill is in Postgres within 10 s of it."""
    kills = int(sized(6, 30))
    sids = [new_sid() for _ in range(12)]
    steady_for = 600.0  # until SIGTERM, once the last kill's messages are checked
    env = stack.env(VEL_FLUSHER="embedded")
    steady = [
        stack.worker(
            "append",
            storage="redis",
            session=",".join(sids),
            proc=p,
            tasks=6,
            rate=60,
            duration=steady_for,
            tag="s-",
            name=f"steady-{p}",
            env=env,
        )
        for p in range(4)
    ]
    killed: list[Proc] = []
    tiered = stack.tiered()
    try:
        for k in range(kills):
            victim = stack.worker(
                "append", storage="redis", session=",".join(sids), proc=100 + k, tasks=6,
                rate=300, duration=60, tag="k-", name=f"killed-{k}", env=env,
            )  # fmt: skip
            killed.append(victim)
            deadline = time.monotonic() + 20
            while len(victim.events("ack")) < 20:
                assert victim.poll() is None, victim.stderr()[-2000:]
                assert time.monotonic() < deadline, "a worker never appended"
                await asyncio.sleep(0.02)
            await asyncio.sleep(random.uniform(0.2, 1.0))
            victim.signal(signal.SIGKILL)
            await victim.wait_async(10)
        last_kill = time.time()
        for p in steady:
            assert p.poll() is None, "a steady worker ended before the last kill"
        acked = [a for p in steady + killed for a in acks_of(p.lines()) if a.t + 0.0 <= last_kill]
        wanted = {c for a in acked for c in a.contents}
        missing: set[str] = set(wanted)
        while missing:
            missing = wanted - await postgres_contents(stack, sids)
            if not missing or time.time() - last_kill > 30:
                break
            await asyncio.sleep(0.1)
        in_postgres_after = time.time() - last_kill
        alive = all(p.poll() is None for p in steady)
        for p in steady:
            p.signal(signal.SIGTERM)
        for p in steady:
            p.check(await p.wait_async(60))
        assert await tiered.flush(20)
        everything = acks_of([line for p in steady + killed for line in p.lines()])
        lost = {c for a in everything for c in a.contents} - await postgres_contents(stack, sids)
    finally:
        for p in steady + killed:
            p.kill()
        await tiered.aclose()
    figures = {
        "kills": kills,
        "flush_lease_s": load_settings({}).flush_lease,
        "acknowledged_messages_before_last_kill": len(wanted),
        "all_in_postgres_after_last_kill_s": round(in_postgres_after, 2),
        "missing_after_30_s": len(missing),
        "steady_workers_alive_meanwhile": alive,
        "acknowledged_messages_lost_at_the_end": len(lost),
    }
    record_figures(request, figures)
    assert alive, figures
    assert not missing and in_postgres_after <= 10.0, figures
    assert not lost, figures


async def test_cluster_master_killed_mid_turn_no_turn_fails_and_no_session_stays_locked(
    stack: Stack, srv: FakeOpenAIServer, request: pytest.FixtureRequest
) -> None:
    """A 3+3 Redis Cluster; 4 worker processes with 6 turns each in flight on 40 sessions;
    the master serving most of them is SIGKILLed. With ``VEL_OP_TIMEOUT`` longer than the
    replica's promotion, idempotent operations are retried with backoff until it is done:
    no turn fails, every exception out of ``agent.run`` would be a VelError, no session is
    left locked, and Postgres holds every acknowledged turn within 5 s of the promotion."""
    from cluster import RedisClusterServers

    from vel.stores.redis.keys import KeyLayout

    sids = [new_sid() for _ in range(40)]
    duration = sized(16.0, 30.0)
    with RedisClusterServers(node_timeout_ms=1000) as cluster:
        stack.redis_url = cluster.url
        layout = KeyLayout(stack.prefix)
        ports = [cluster.master_of_key(layout.session(sid).meta).port for sid in sids]
        victim_port = max(set(ports), key=ports.count)
        victim = next(n for n in cluster.nodes if n.port == victim_port)
        env = stack.env(openai_url=srv.base_url, VEL_OP_TIMEOUT="8")
        workers = [
            stack.worker(
                "turns",
                storage="redis",
                session=",".join(sids),
                proc=p,
                tasks=6,
                duration=duration,
                name=f"turns-{p}",
                env=env,
            )
            for p in range(4)
        ]
        try:
            deadline = time.monotonic() + 30
            while sum(len(w.events("turn")) for w in workers) < 200:
                assert time.monotonic() < deadline, "the workers never got going"
                await asyncio.sleep(0.05)
            cluster.kill(victim)
            killed_at = time.time()
            await asyncio.to_thread(cluster.wait_ok, 30.0)
            promoted_at = time.time()
            acked_by_promotion = {
                (line["sid"], line["turn"])
                for w in workers
                for line in w.events("turn")
                if line["t1"] <= promoted_at
            }
            missing = set(acked_by_promotion)
            while missing:
                missing = acked_by_promotion - await postgres_pairs(stack, sids)
                if not missing or time.time() - promoted_at > 30:
                    break
                await asyncio.sleep(0.1)
            in_postgres_after = time.time() - promoted_at
            for w in workers:
                w.check(await w.wait_async(duration + 60))
            lines = [line for w in workers for line in w.lines()]
            tiered = stack.tiered()
            try:
                assert await tiered.flush(30)
            finally:
                await tiered.aclose()
            histories = {
                sid: [r.content for r in await postgres_rows(stack.pg_dsn, stack.schema, sid)]
                for sid in sids
            }
            locked = [sid for sid in sids if turn_lock_held(cluster, layout, sid)]
        finally:
            for w in workers:
                w.kill()
    errors = [line for line in lines if line.get("event") == "error"]
    figures = {
        "sessions": len(sids),
        "sessions_on_killed_master": ports.count(victim_port),
        "workers_x_tasks": "4 x 6",
        "promoted_after_kill_s": round(promoted_at - killed_at, 2),
        "turns_failed": len(errors),
        "error_types": sorted({e["type"] for e in errors}),
        "errors_not_vel": sorted({e["type"] for e in errors if "VelError" not in e["mro"]}),
        "sessions_locked_after": len(locked),
        "acked_by_promotion": len(acked_by_promotion),
        "acked_by_promotion_in_postgres_after_s": round(in_postgres_after, 2),
        "acked_by_promotion_missing_after_30_s": len(missing),
        **check_turns(lines, histories),
    }
    record_figures(request, figures)
    assert figures["errors_not_vel"] == [], figures
    assert errors == [], figures
    assert locked == [], figures
    assert not missing and in_postgres_after <= 5.0, figures
    assert figures["acknowledged_turns_lost"] == 0, figures
    assert figures["duplicated"] == figures["broken_or_unexpected"] == 0, figures
