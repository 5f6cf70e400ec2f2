"""Background failures are logged by outage, not by retry (issue 13, input 10): a permanent
error (a missing permission or table, refused credentials, an untrusted certificate) gives one
clear line that names it and slows the retries; a drain on close stops at once on it; a
process that wrote nothing does not claim to close "with unflushed messages"; a transient
outage is one line when it starts and one when it ends."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from servers import RedisServer

from vel import Agent
from vel.errors import AccessDeniedError
from vel.settings import Settings
from vel.stores.postgres import PostgresStore
from vel.stores.redis import RedisStore
from vel.stores.tiered import TieredStore
from vel.testing import FakeOpenAIServer


def vel_lines(caplog: pytest.LogCaptureFixture, level: int = logging.WARNING) -> list[str]:
    return [
        f"{r.levelname} {r.name}: {r.getMessage()}"
        for r in caplog.records
        if r.name.startswith("vel") and r.levelno >= level
    ]


async def test_missing_tables_stop_the_flusher_with_one_line(
    redis_url: str,
    pg_dsn: str,
    migrated_schema: str,
    key_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import asyncpg

    caplog.set_level(logging.INFO)
    store = TieredStore(
        RedisStore(redis_url, key_prefix=key_prefix, write_behind=True, flush_delay=1.0),
        PostgresStore(pg_dsn, schema=migrated_schema, settings=Settings()),
        flusher=True,
        drain_timeout=30.0,
        settings=Settings(),
    )
    await store.append("s", [{"role": "user", "content": "kept in Redis"}])
    # Before the flush is due, the table it writes goes: every flush meets a missing table,
    # which retrying cannot fix.
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute(f'DROP TABLE "{migrated_schema}".vel_messages CASCADE')
    finally:
        await conn.close()
    await asyncio.sleep(2.5)  # the embedded flusher tries, fails, backs off
    await store.aclose()
    lines = vel_lines(caplog)
    flush_failures = [line for line in lines if "flush failed" in line]
    assert len(flush_failures) == 1, lines
    assert flush_failures[0].startswith("ERROR vel.flusher")
    assert "vel migrate" in flush_failures[0] and "configuration fix" in flush_failures[0]
    closing = [line for line in lines if "closing" in line]
    assert len(closing) == 1 and "vel migrate" in closing[0], lines
    assert len(lines) == 2, lines  # nothing else: no line per retry, no line per drain step
    # What was acknowledged is still in Redis, dirty, for a flusher that can write it.
    hot = RedisStore(redis_url, key_prefix=key_prefix, settings=Settings())
    try:
        assert await hot.load("s") == [{"role": "user", "content": "kept in Redis"}]
    finally:
        await hot.aclose()


async def test_a_refused_tenant_closes_quietly(
    pg_dsn: str,
    migrated_schema: str,
    srv: FakeOpenAIServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    with RedisServer(
        "--user", "default", "off", "--user", "app", "on", ">pw", "~app:{*", "+@all"
    ) as server:  # fmt: skip
        monkeypatch.setenv("REDIS_URL", f"redis://app:pw@127.0.0.1:{server.port}/0")
        monkeypatch.setenv("POSTGRES_DSN", f"{pg_dsn}?search_path={migrated_schema}")
        monkeypatch.setenv("VEL_KEY_PREFIX", "other")  # not the ACL user's pattern
        model: dict[str, Any] = {
            "provider": "openai", "model": "m", "api_key": "k", "base_url": srv.base_url,
        }  # fmt: skip
        async with Agent(id="t", model=model, session_storage="redis") as agent:
            with pytest.raises(AccessDeniedError) as info:
                await agent.run({"message": "hi"}, session_id="s")
            assert "permission" in str(info.value)
            await asyncio.sleep(1.0)
    lines = vel_lines(caplog)
    assert not any("closing" in line for line in lines), lines
    flush_failures = [line for line in lines if "flush failed" in line]
    assert len(flush_failures) <= 1, lines
    assert all("permission" in line for line in flush_failures)
    assert srv.requests == []  # refused before the model was called


async def test_a_transient_outage_is_one_line_then_one_on_recovery(
    redis_url: str, key_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    from servers import PostgresServer

    caplog.set_level(logging.INFO)
    with PostgresServer() as pg:
        from vel.stores.postgres.migrate import migrate

        await migrate(pg.dsn, schema="app")
        store = TieredStore(
            RedisStore(redis_url, key_prefix=key_prefix, write_behind=True, flush_delay=0),
            PostgresStore(pg.dsn, schema="app", op_timeout=1.0, settings=Settings()),
            flusher=True,
            settings=Settings(),
        )
        try:
            await store.append("s", [{"role": "user", "content": "first"}])
            assert await store.flush(10)
            pg.stop()
            await store.append("s", [{"role": "user", "content": "waits for Postgres"}])
            await asyncio.sleep(2.0)  # several retries with backoff
            pg.start()
            assert await store.flush(20)
        finally:
            await store.aclose()
    lines = [line for line in vel_lines(caplog) if "vel.flusher" in line]
    assert len(lines) == 2, lines
    assert "flush failed" in lines[0] and lines[0].startswith("WARNING")
    assert "works again" in lines[1]
