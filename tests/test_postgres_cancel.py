"""Cancelling a Postgres operation reports a cancellation, never an outage (issue 12, item 3).

A statement cut off mid-flight (here: waiting for the session row, which another connection
holds with ``SELECT ... FOR UPDATE``) leaves its connection in an unknown protocol state, so
vel terminates it. The caller's cancellation must come out unchanged: ``TimeoutError`` from
``asyncio.timeout``, ``CancelledError`` from ``task.cancel()``, ``StoreTimeoutError`` when
vel's own ``op_timeout`` ran out; never ``StoreUnavailableError``.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import pytest
from conftest import schema_dsn

from vel import Agent
from vel.errors import StoreTimeoutError
from vel.stores.postgres import PostgresStore

Op = Callable[[PostgresStore, str], Awaitable[Any]]

OPS: dict[str, Op] = {
    "clear": lambda store, sid: store.clear(sid),
    "replace": lambda store, sid: store.replace(sid, [{"role": "user", "content": "new"}]),
    "append": lambda store, sid: store.append(sid, [{"role": "user", "content": "more"}]),
}


@asynccontextmanager
async def row_locked(dsn: str, session_id: str) -> AsyncIterator[None]:
    """The session's row locked by another connection for the block's duration."""
    conn = await asyncpg.connect(dsn)
    try:
        tx = conn.transaction()
        await tx.start()
        await conn.execute("SELECT 1 FROM vel_session_rows WHERE id = $1 FOR UPDATE", session_id)
        yield
        await tx.rollback()
    finally:
        await conn.close()


async def new_session(store: PostgresStore) -> str:
    sid = f"pc-{uuid.uuid4().hex[:10]}"
    await store.append(sid, [{"role": "user", "content": "hello"}])
    return sid


@asynccontextmanager
async def blocked_session(
    pg_dsn: str, schema: str, op_timeout: float
) -> AsyncIterator[tuple[PostgresStore, str]]:
    """A store and one of its sessions whose row another connection holds for the block
    (the store is closed afterwards)."""
    dsn = schema_dsn(pg_dsn, schema)
    store = PostgresStore(dsn, op_timeout=op_timeout)
    try:
        sid = await new_session(store)
        async with row_locked(dsn, sid):
            yield store, sid
    finally:
        await store.aclose()


@pytest.mark.parametrize("op", sorted(OPS))
async def test_asyncio_timeout_around_a_blocked_operation_raises_timeout_error(
    pg_dsn: str, migrated_schema: str, op: str
) -> None:
    dsn = schema_dsn(pg_dsn, migrated_schema)
    store = PostgresStore(dsn, op_timeout=10)
    try:
        sid = await new_session(store)
        async with row_locked(dsn, sid):
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.5):
                    await OPS[op](store, sid)
        # The connection was discarded, not the store: the next call works.
        await OPS[op](store, sid)
    finally:
        await store.aclose()


@pytest.mark.parametrize("op", sorted(OPS))
async def test_task_cancel_of_a_blocked_operation_raises_cancelled_error(
    pg_dsn: str, migrated_schema: str, op: str
) -> None:
    async with blocked_session(pg_dsn, migrated_schema, 10) as (store, sid):
        task = asyncio.create_task(OPS[op](store, sid))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


@pytest.mark.parametrize("op", sorted(OPS))
async def test_op_timeout_on_a_blocked_operation_raises_store_timeout_error(
    pg_dsn: str, migrated_schema: str, op: str
) -> None:
    async with blocked_session(pg_dsn, migrated_schema, 0.5) as (store, sid):
        with pytest.raises(StoreTimeoutError):
            await OPS[op](store, sid)


async def test_agent_session_calls_under_a_timeout_raise_timeout_error(
    pg_dsn: str, migrated_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The issue's case through the public API: ``aclear_session`` and
    ``aset_session_context`` in 'database' mode, the row locked elsewhere."""
    dsn = schema_dsn(pg_dsn, migrated_schema)
    monkeypatch.setenv("POSTGRES_DSN", dsn)
    agent = Agent(
        id="pc",
        model={"provider": "openai", "model": "gpt-4o", "api_key": "x"},
        session_storage="database",
    )
    try:
        sid = f"pc-{uuid.uuid4().hex[:10]}"
        await agent.ctxmgr.aset_session_context(sid, [{"role": "user", "content": "hi"}])
        async with row_locked(dsn, sid):
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.5):
                    await agent.ctxmgr.aclear_session(sid)
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.5):
                    await agent.ctxmgr.aset_session_context(sid, [{"role": "user", "content": "x"}])
    finally:
        await agent.aclose()


def ignore_asyncpg_connect_cancelled(loop: asyncio.AbstractEventLoop) -> list[dict[str, Any]]:
    """Record the loop's unhandled errors, except the one asyncpg leaves when a connection
    attempt is cancelled during its TLS negotiation (a future it never retrieves:
    MagicStack/asyncpg#1211 and #1310; not vel's, and harmless)."""
    problems: list[dict[str, Any]] = []

    def handler(_: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, ConnectionError) and "unexpected connection_lost()" in str(exc):
            return
        problems.append(context)

    loop.set_exception_handler(handler)
    return problems


async def test_cancellations_at_random_moments_of_replace_are_never_outages(
    pg_dsn: str, migrated_schema: str
) -> None:
    """Cancellations spread over whole replaces (connect, acquire, transaction, commit):
    each call either completes or raises TimeoutError (scripts/lifecycle runs 600)."""
    problems = ignore_asyncpg_connect_cancelled(asyncio.get_running_loop())
    dsn = schema_dsn(pg_dsn, migrated_schema)
    store = PostgresStore(dsn, op_timeout=10)
    rng = random.Random(12)
    history = [{"role": "user", "content": f"m{i}"} for i in range(50)]
    outcomes: dict[str, int] = {}
    try:
        sid = await new_session(store)
        await store.aclose()  # timed with a connect, as most calls below will need one
        started = asyncio.get_running_loop().time()
        await store.replace(sid, history)
        took = asyncio.get_running_loop().time() - started
        for _ in range(60):
            try:
                async with asyncio.timeout(rng.uniform(0, 1.5 * took)):
                    await store.replace(sid, history)
                kind = "completed"
            except TimeoutError:
                kind = "TimeoutError"
            except Exception as exc:
                kind = type(exc).__name__
            outcomes[kind] = outcomes.get(kind, 0) + 1
    finally:
        await store.aclose()
    assert set(outcomes) <= {"completed", "TimeoutError"}, outcomes
    assert outcomes.get("TimeoutError", 0) > 0, outcomes
    assert problems == []
