"""Deleting an owner's sessions while worker processes keep appending to them, in 'database'
and 'redis' modes: every message acknowledged before the deletion is gone from both tiers for
good, every one written after it is kept."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest
from checker import postgres_rows, redis_rows
from workers import Stack, kill_all

from vel import ContextManager
from vel.stores.postgres import PostgresStore

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("storage", ["database", "redis"])
async def test_deleting_an_owner_under_running_worker_processes(stack: Stack, storage: str) -> None:
    owner = f"u-{uuid.uuid4().hex[:8]}"
    sids = [f"w-{uuid.uuid4().hex[:8]}" for _ in range(4)]
    store: Any = (
        PostgresStore(stack.pg_dsn, schema=stack.schema)
        if storage == "database"
        else stack.tiered()
    )
    cm = ContextManager()
    cm.bind(store)
    procs = []
    try:
        for sid in sids:
            await cm.aset_session_details(sid, owner=owner, metadata={"title": sid})
        procs = [
            stack.worker(
                "append",
                storage=storage,
                session=",".join(sids),
                proc=p,
                tasks=4,
                rate=80,
                duration=8.0,
                name=f"append-{p}",
            )
            for p in range(2)
        ]
        deadline = time.monotonic() + 20
        while sum(len(p.events("ack")) for p in procs) < 40:  # both are writing
            assert time.monotonic() < deadline, [p.stderr()[-2000:] for p in procs]
            await asyncio.sleep(0.1)
        for p in procs:
            assert p.poll() is None, f"{p.name} exited early: {p.stderr()[-2000:]}"
        began = time.time()
        assert await cm.adelete_owner_sessions(owner) == len(sids)
        ended = time.time()
        for p in procs:
            p.check(await p.wait_async(60))
        if storage == "redis":
            assert await store.flush(30)
        acks = [line for p in procs for line in p.events("ack")]
        before = [a for a in acks if a["t"] + a["latency"] < began]
        after = [a for a in acks if a["t"] > ended]
        assert before and after, "the deletion did not fall inside the workers' run"
        for sid in sids:
            kept = {r.content for r in await postgres_rows(stack.pg_dsn, stack.schema, sid)}
            if storage == "redis":
                kept |= {r.content for r in await redis_rows(stack.redis_url, stack.prefix, sid)}
            old = {c for a in before if a["sid"] == sid for c in a["contents"]}
            new = {c for a in after if a["sid"] == sid for c in a["contents"]}
            assert not old & kept, f"{sid}: messages from before the deletion came back"
            assert new <= kept, f"{sid}: messages written after the deletion were lost"
            info = await cm.aget_session_info(sid)
            assert info is not None and info.owner is None and info.metadata == {}
    finally:
        kill_all(procs)
        await store.aclose()
