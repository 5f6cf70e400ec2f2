"""A caller's deadline against a frozen backend (SIGSTOP: connections open, nothing answers),
from the newuser trial of 2026-12-01 (F11, F5): a turn cut by the caller's ``asyncio.timeout``
before its commit gave control back only after the shielded release of its lock had waited a
whole ``op_timeout`` on the frozen server (5.6-6.4 s for a 0.35 s deadline); a turn failing on
the frozen server took two ``op_timeout`` (the failed call, then the release). The release of
a lock by a turn that stored nothing now holds its caller for ``RELEASE_WAIT`` at most and
goes on in the background; the lock's lease covers one that never lands."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from servers import PostgresServer, RedisServer

from vel._shield import RELEASE_WAIT
from vel.errors import StoreTimeoutError
from vel.stores.postgres import PostgresStore
from vel.stores.redis import RedisStore

pytestmark = pytest.mark.slow

OP_TIMEOUT = 3.0
DEADLINE = 0.3
# What the caller may wait past its deadline: the release's bound, and the loop's own slack
# on a loaded machine. Before the fix: a whole OP_TIMEOUT or more.
SLACK = RELEASE_WAIT + 1.0


@contextmanager
def frozen_redis(server: RedisServer) -> Iterator[None]:
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)


async def cut_by_deadline(store: RedisStore | PostgresStore, sid: str, freeze: object) -> float:
    """A turn whose backend freezes once its window is read, cut by the caller's deadline
    before any commit; returns how long after the deadline the caller got control."""
    began = time.monotonic()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(DEADLINE):
            async with store.turn(sid, limit=5):
                freeze()  # type: ignore[operator]
                await asyncio.sleep(30)  # the model: the deadline ends it
    return time.monotonic() - began - DEADLINE


async def test_a_turn_cut_by_its_deadline_on_a_frozen_redis_returns_at_once() -> None:
    with RedisServer() as server:
        store = RedisStore(server.url, hot_ttl=60, op_timeout=OP_TIMEOUT)
        sid = f"fz-{uuid.uuid4().hex[:8]}"
        try:
            await store.append(sid, [{"role": "user", "content": "hi"}])
            assert server.proc is not None
            pid = server.proc.pid
            try:
                late = await cut_by_deadline(store, sid, lambda: os.kill(pid, signal.SIGSTOP))
            finally:
                os.kill(pid, signal.SIGCONT)
            assert late < SLACK, f"control came back {late:.2f} s after the deadline"
            # Thawed, the release still running in the background lands: the lock is free
            # long before its lease (VEL_LOCK_LEASE, 10 s) would run out.
            began = time.monotonic()
            async with store.turn(sid, limit=5, timeout=8) as turn:
                await turn.commit([{"role": "assistant", "content": "back"}])
            assert time.monotonic() - began < 4.0
            # A turn that fails on the frozen server: one op_timeout, not two.
            with frozen_redis(server):
                began = time.monotonic()
                with pytest.raises(StoreTimeoutError):
                    async with store.turn(sid, limit=5):
                        pass
                failed_after = time.monotonic() - began
            # The failed call's own bound is op_timeout + 1 s; before, its release took as
            # long again (8-9 s here).
            assert failed_after < OP_TIMEOUT + 1.0 + SLACK, failed_after
        finally:
            await store.aclose()


async def test_a_turn_cut_by_its_deadline_on_a_frozen_postgres_returns_at_once() -> None:
    from vel.stores.postgres.migrate import migrate

    pg = await asyncio.to_thread(lambda: PostgresServer().start())
    try:
        await migrate(pg.dsn, schema="app")
        store = PostgresStore(pg.dsn, schema="app", op_timeout=OP_TIMEOUT)
        sid = f"fz-{uuid.uuid4().hex[:8]}"
        try:
            await store.append(sid, [{"role": "user", "content": "hi"}])
            try:
                late = await cut_by_deadline(store, sid, pg.freeze)
            finally:
                pg.thaw()
            assert late < SLACK, f"control came back {late:.2f} s after the deadline"
            began = time.monotonic()
            async with store.turn(sid, limit=5, timeout=8) as turn:
                await turn.commit([{"role": "assistant", "content": "back"}])
            assert time.monotonic() - began < 4.0
        finally:
            await store.aclose()
    finally:
        await asyncio.to_thread(pg.destroy)
