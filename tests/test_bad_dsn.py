"""A bad POSTGRES_DSN in 'redis' mode: refused before anything is acknowledged.

Failing input 6 of issue 12: with 7 of 10 bad DSNs, turns on sessions already in Redis were
acknowledged by a worker that could flush nothing, and ``aclose()`` raised and left Redis
connections open. Each worker here is a real process configured from the environment
(``tests/dsn_probe.py``), against a private Postgres with password authentication (the
shared one trusts every login) whose sessions are already in Redis; it tries a turn, a set,
a plain set and an append, closes the Agent, and reports the TCP sockets it still holds.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from servers import PostgresServer

from vel import Agent, ConfigurationError, StoreUnavailableError
from vel.settings import Settings
from vel.stores.postgres import PostgresStore
from vel.stores.redis import RedisStore
from vel.stores.tiered import TieredStore
from vel.stores.tiered.verify import WAIT
from vel.testing import FakeOpenAIServer
from vel.testing.proxy import FaultProxy

PASSWORD = "pw-good"
SCHEMA = "app"
PROBE = Path(__file__).with_name("dsn_probe.py")
HELD = [{"role": "user", "content": "held"}, {"role": "assistant", "content": "in Redis"}]


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    """A private Postgres with password auth: vel's schema in ``postgres``, an empty
    database ``empty``."""
    with PostgresServer(password=PASSWORD) as server:

        async def prepare() -> None:
            from vel.stores.postgres.migrate import migrate

            await migrate(good_dsn(server), schema=SCHEMA)
            conn = await asyncpg.connect(good_dsn(server))
            try:
                await conn.execute("CREATE DATABASE empty")
            finally:
                await conn.close()

        asyncio.run(prepare())
        yield server


def good_dsn(pg: PostgresServer) -> str:
    return f"postgresql://postgres:{PASSWORD}@127.0.0.1:{pg.port}/postgres"


BAD_DSNS = {
    "wrong password": "postgresql://postgres:wrong@127.0.0.1:{port}/postgres",
    "missing password": "postgresql://postgres@127.0.0.1:{port}/postgres",
    "unknown user": "postgresql://nobody:" + PASSWORD + "@127.0.0.1:{port}/postgres",
    "unknown database": "postgresql://postgres:" + PASSWORD + "@127.0.0.1:{port}/nosuch",
    "unmigrated database": "postgresql://postgres:" + PASSWORD + "@127.0.0.1:{port}/empty",
    "non-numeric port": "postgresql://postgres:" + PASSWORD + "@127.0.0.1:54x2/postgres",
    "port out of range": "postgresql://postgres:" + PASSWORD + "@127.0.0.1:70000/postgres",
    "bad sslmode": "postgresql://postgres:" + PASSWORD + "@127.0.0.1:{port}/postgres?sslmode=often",
    "unclosed IPv6 bracket": "postgresql://postgres:" + PASSWORD + "@[::1:{port}/postgres",
    "not a postgres URL": "mysql://postgres:" + PASSWORD + "@127.0.0.1:{port}/postgres",
}


async def seed(pg: PostgresServer, redis_url: str, prefix: str, sid: str) -> None:
    """``sid`` with two messages, in Redis and in Postgres (written by a good worker)."""
    store = TieredStore(
        RedisStore(redis_url, key_prefix=prefix, write_behind=True, settings=Settings()),
        PostgresStore(good_dsn(pg), schema=SCHEMA, settings=Settings()),
        flusher=False,
        settings=Settings(),
    )
    try:
        await store.append(sid, HELD)
        assert await store.flush(10)
    finally:
        await store.aclose()


def probe(dsn: str, redis_url: str, prefix: str, sid: str, llm: str) -> dict[str, Any]:
    env = {
        **os.environ,
        "POSTGRES_DSN": dsn,
        "REDIS_URL": redis_url,
        "VEL_KEY_PREFIX": prefix,
        "VEL_PG_SCHEMA": SCHEMA,
        "PROBE_SID": sid,
        "LLM": llm,
    }
    done = subprocess.run(
        [sys.executable, str(PROBE)], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


async def redis_holds(redis_url: str, prefix: str, sid: str) -> tuple[list[Any], list[Any]]:
    hot = RedisStore(redis_url, key_prefix=prefix, settings=Settings())
    try:
        return await hot.load(sid), await hot.load(f"{sid}-new")
    finally:
        await hot.aclose()


@pytest.mark.parametrize("kind", list(BAD_DSNS))
async def test_a_bad_dsn_acknowledges_nothing_and_closes_everything(
    kind: str, pg: PostgresServer, redis_url: str, key_prefix: str, srv: FakeOpenAIServer
) -> None:
    sid = f"dsn-{uuid.uuid4().hex[:8]}"
    await seed(pg, redis_url, key_prefix, sid)
    dsn = BAD_DSNS[kind].format(port=pg.port)
    report = await asyncio.to_thread(probe, dsn, redis_url, key_prefix, sid, srv.base_url)
    print(f"\nbad DSN ({kind}):", json.dumps(report))
    if "construct" in report:  # refused when the Agent is built: nothing could be served
        assert report["construct"] == "ConfigurationError", report
    else:
        calls = ("turn", "set_new", "plain_set", "append")
        assert {report[c]["result"] for c in calls} == {"ConfigurationError"}, report
        assert report["aclose"] == "ok", report
    assert report["sockets"] == [], report
    assert srv.requests == []  # refused before the model was called
    assert await redis_holds(redis_url, key_prefix, sid) == (HELD, [])


async def test_the_good_dsn_serves_and_closes_everything(
    pg: PostgresServer, redis_url: str, key_prefix: str, srv: FakeOpenAIServer
) -> None:
    """The same probe with the right DSN: every call acknowledged, 0 sockets after close."""
    sid = f"dsn-{uuid.uuid4().hex[:8]}"
    await seed(pg, redis_url, key_prefix, sid)
    report = await asyncio.to_thread(probe, good_dsn(pg), redis_url, key_prefix, sid, srv.base_url)
    calls = ("turn", "set_new", "plain_set", "append")
    assert {report[c]["result"] for c in calls} == {"acknowledged"}, report
    assert report["aclose"] == "ok" and report["sockets"] == [], report


async def test_postgres_unreachable_at_the_first_call_is_an_outage_not_a_verdict(
    pg: PostgresServer,
    redis_url: str,
    key_prefix: str,
    srv: FakeOpenAIServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Postgres refusing connections, then silent (blackholed): the first calls fail within
    the verification's wait with StoreUnavailableError, acknowledging nothing; once Postgres
    answers, the next call verifies and is served."""
    proxy = FaultProxy("127.0.0.1", pg.port).start()
    try:
        monkeypatch.setenv(
            "POSTGRES_DSN", f"postgresql://postgres:{PASSWORD}@127.0.0.1:{proxy.port}/postgres"
        )
        monkeypatch.setenv("REDIS_URL", redis_url)
        monkeypatch.setenv("VEL_KEY_PREFIX", key_prefix)
        monkeypatch.setenv("VEL_PG_SCHEMA", SCHEMA)
        sid = f"dsn-{uuid.uuid4().hex[:8]}"
        await seed(pg, redis_url, key_prefix, sid)
        model = {"provider": "openai", "model": "m", "api_key": "k", "base_url": srv.base_url}
        async with Agent(id="o", model=model, session_storage="redis") as agent:
            for mode in ("refuse", "blackhole"):
                proxy.set_mode(mode)  # type: ignore[arg-type]
                began = time.monotonic()
                with pytest.raises(StoreUnavailableError, match="not yet checked"):
                    await agent.run({"message": "hi"}, session_id=sid)
                took = time.monotonic() - began
                print(f"\nPostgres unreachable ({mode}): StoreUnavailableError after {took:.2f} s")
                assert took < WAIT + 1.5, mode
            assert srv.requests == []
            assert await redis_holds(redis_url, key_prefix, sid) == (HELD, [])
            proxy.set_mode("pass")
            await agent.run({"message": "hi"}, session_id=sid)
            assert len(srv.requests) == 1
    finally:
        proxy.stop()


async def test_a_refused_configuration_is_not_asked_again_at_every_call(
    pg: PostgresServer, redis_url: str, key_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A burst of calls after a refusal is answered from the first verdict (the server sees
    one refused attempt, not one per call); once the verdict is old, the next call asks
    again and sees the operator's fix."""
    from vel.stores.tiered import verify

    proxy = FaultProxy("127.0.0.1", pg.port).start()
    empty = f"postgresql://postgres:{PASSWORD}@127.0.0.1:{proxy.port}/empty"
    store = TieredStore(
        RedisStore(redis_url, key_prefix=key_prefix, write_behind=True, settings=Settings()),
        PostgresStore(empty, schema=SCHEMA, settings=Settings()),
        flusher=False,
        settings=Settings(),
    )
    sid = f"dsn-{uuid.uuid4().hex[:8]}"
    try:
        monkeypatch.setattr(verify, "RECHECK_AFTER", 60.0)
        seen = []
        for _ in range(20):
            with pytest.raises(ConfigurationError, match="vel migrate") as info:
                await store.load(sid)
            seen.append(info.value)
        assert proxy.connections_total == 1
        # Each call its own exception, of the first one's class (an AccessDeniedError stays
        # one: tests/test_tenants.py).
        assert len({id(e) for e in seen}) == 20 and {type(e) for e in seen} == {type(seen[0])}
        from vel.stores.postgres.migrate import migrate

        await migrate(empty, schema=SCHEMA)  # the operator's fix
        with pytest.raises(ConfigurationError, match="vel migrate"):
            await store.load(sid)  # the verdict still holds
        monkeypatch.setattr(verify, "RECHECK_AFTER", 0.0)
        assert await store.load(sid) == []
    finally:
        await store.aclose()
        proxy.stop()
