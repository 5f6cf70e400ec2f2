"""The Postgres turn lock's handoff (migration 0008, vel/stores/postgres/handoff.py): a waiting
turn is woken by the release (a NOTIFY across processes), turns of one loop get the lock first
come first served, and a waiter that gives up or is cancelled leaves nothing held."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from stores import sql

from vel.errors import SessionLockedError
from vel.stores.postgres import PostgresStore
from vel.stores.postgres.handoff import CHANNEL


def sid() -> str:
    return f"ph-{uuid.uuid4().hex[:10]}"


def msg(i: int | str, role: str = "user") -> dict[str, Any]:
    return {"role": role, "content": f"m{i}"}


@pytest.fixture
async def store(pg_dsn: str, migrated_schema: str) -> AsyncIterator[PostgresStore]:
    s = PostgresStore(pg_dsn, schema=migrated_schema, op_timeout=5.0)
    yield s
    await s.aclose()


async def live_lease(dsn: str, schema: str, session_id: str) -> bool:
    rows = await sql(
        dsn,
        schema,
        "SELECT 1 FROM vel_locks WHERE session_id = $1 AND expires_at > now()",
        session_id,
    )
    return bool(rows)


async def test_a_release_a_turn_waited_for_notifies_and_an_uncontended_one_does_not(
    store: PostgresStore, pg_dsn: str, migrated_schema: str
) -> None:
    heard: asyncio.Queue[str] = asyncio.Queue()
    listener = await asyncpg.connect(pg_dsn)
    await listener.add_listener(CHANNEL, lambda *args: heard.put_nowait(str(args[3])))
    other = PostgresStore(pg_dsn, schema=migrated_schema, op_timeout=5.0)  # another process
    try:
        alone, shared = sid(), sid()
        async with store.turn(alone) as turn:
            await turn.commit([msg(0)])
        windows: list[list[Any]] = []

        async def second() -> None:
            async with other.turn(shared, timeout=10) as t:
                windows.append(t.window)
                await t.commit([msg(2)])

        async with store.turn(shared) as turn:
            waiter = asyncio.create_task(second())
            while not (await other.stats())["lock_waits"]:
                await asyncio.sleep(0.01)
            await turn.commit([msg(1)])
        assert await asyncio.wait_for(heard.get(), 5) == shared
        await asyncio.wait_for(waiter, 5)
        assert windows == [[msg(1)]]
        await asyncio.sleep(0.1)
        assert heard.empty()  # the uncontended releases (alone's, and this one) sent nothing
    finally:
        await other.aclose()
        await listener.close()


async def test_turns_of_one_loop_get_the_lock_in_the_order_they_asked(
    store: PostgresStore,
) -> None:
    s = sid()
    order: list[int] = []

    async def turn(i: int) -> None:
        async with store.turn(s, timeout=20) as t:
            order.append(i)
            await t.commit([msg(i)])

    async with store.turn(s) as first:
        waiters = []
        for i in range(5):
            waiters.append(asyncio.create_task(turn(i)))
            while (await store.stats())["lock_waits"] < i + 1:
                await asyncio.sleep(0.01)
        await first.commit([msg("first")])
    await asyncio.gather(*waiters)
    assert order == [0, 1, 2, 3, 4]
    assert [m["content"] for m in await store.load(s)] == ["mfirst"] + [f"m{i}" for i in range(5)]


@pytest.mark.parametrize("how", ["cancelled", "timed out"])
async def test_a_waiter_that_gives_up_leaves_no_lock_held_and_the_next_still_gets_it(
    store: PostgresStore, pg_dsn: str, migrated_schema: str, how: str
) -> None:
    s = sid()

    async def wait_for_turn(timeout: float) -> None:
        async with store.turn(s, timeout=timeout) as t:
            await t.commit([msg("late")])

    async with store.turn(s) as holder:
        quitter = asyncio.create_task(wait_for_turn(0.3 if how == "timed out" else 30))
        while not (await store.stats())["lock_waits"]:
            await asyncio.sleep(0.01)
        patient = asyncio.create_task(wait_for_turn(30))  # queued behind the quitter
        await asyncio.sleep(0.05)
        if how == "cancelled":
            quitter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await quitter
        else:
            with pytest.raises(SessionLockedError):
                await quitter
        assert await live_lease(pg_dsn, migrated_schema, s)  # still the holder's
        await holder.commit([msg("held")])
    await asyncio.wait_for(patient, 5)
    assert not await live_lease(pg_dsn, migrated_schema, s)
    assert [m["content"] for m in await store.load(s)] == ["mheld", "mlate"]
    async with store.turn(s, timeout=0):  # free: taken at the first try
        pass


async def test_closing_the_store_closes_its_listener(
    pg_dsn: str, migrated_schema: str, store: PostgresStore
) -> None:
    s = sid()

    async def second() -> None:
        async with store.turn(s, timeout=10) as t:
            await t.commit([msg(1)])

    async with store.turn(s) as holder:
        waiter = asyncio.create_task(second())
        while not (await store.stats())["lock_waits"]:
            await asyncio.sleep(0.01)
        await holder.commit([msg(0)])
    await asyncio.wait_for(waiter, 5)

    async def listeners() -> int:
        rows = await sql(
            pg_dsn,
            migrated_schema,
            "SELECT count(*) AS n FROM pg_stat_activity "
            "WHERE application_name = 'vel-listener' AND pid = ANY($1::int[])",
            pids,
        )
        return int(rows[0]["n"])

    handoff = store._locks._handoffs.current()
    assert handoff is not None and handoff._conn is not None
    pids = [handoff._conn.get_server_pid()]
    assert await listeners() == 1
    await store.aclose()
    assert await listeners() == 0


async def test_closing_the_store_while_a_turn_waits_does_not_cancel_the_turn(
    pg_dsn: str, migrated_schema: str, store: PostgresStore
) -> None:
    s = sid()
    other = PostgresStore(pg_dsn, schema=migrated_schema, op_timeout=5.0)
    windows: list[list[Any]] = []

    async def waiting() -> None:
        async with other.turn(s, timeout=20) as t:
            windows.append(t.window)
            await t.commit([msg(1)])

    try:
        async with store.turn(s) as holder:
            waiter = asyncio.create_task(waiting())
            while not (await other.stats())["lock_waits"]:
                await asyncio.sleep(0.01)
            await other.aclose()  # its listener goes; the waiter falls back to polling
            await holder.commit([msg(0)])
        await asyncio.wait_for(waiter, 10)
        assert windows == [[msg(0)]]
    finally:
        await other.aclose()
