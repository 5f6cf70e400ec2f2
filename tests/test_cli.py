"""The ``vel`` command against the real local services."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid

import asyncpg
import pytest
from conftest import schema_dsn

from vel.settings import load_settings
from vel.stores import open_store
from vel.stores.postgres import PostgresStore
from vel.stores.postgres.migrate import latest_version
from vel.stores.redis import RedisStore
from vel.stores.tiered import TieredStore


def vel_cmd(
    *args: str, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vel", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VEL_", "OPENAI_"))}
    env.pop("POSTGRES_DSN", None)
    env.update(extra)
    return env


async def test_migrate_applies_and_shows_the_version(pg_dsn: str, pg_schema: str) -> None:
    env = clean_env(POSTGRES_DSN=schema_dsn(pg_dsn, pg_schema))
    first = await asyncio.to_thread(vel_cmd, "migrate", env=env)
    assert first.returncode == 0, first.stderr
    assert f"version {latest_version()}" in first.stdout
    shown = await asyncio.to_thread(vel_cmd, "migrate", "--show", env=env)
    assert shown.returncode == 0 and f"schema version {latest_version()}" in shown.stdout
    conn = await asyncpg.connect(pg_dsn)
    try:
        tables = await conn.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = $1",
            pg_schema,
        )
    finally:
        await conn.close()
    assert {"vel_sessions", "vel_messages"} <= {r["table_name"] for r in tables}


def test_missing_dsn_is_one_clear_line_and_exit_1() -> None:
    result = vel_cmd("migrate", env=clean_env())
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0
    assert "POSTGRES_DSN" in result.stderr and "Traceback" not in result.stderr


def test_unreachable_postgres_is_one_line_without_the_password() -> None:
    env = clean_env(POSTGRES_DSN="postgresql://postgres:secretpw@127.0.0.1:1/test")
    result = vel_cmd("migrate", env=env)
    assert result.returncode == 1
    assert "secretpw" not in result.stderr and "Traceback" not in result.stderr


async def test_flusher_drains_the_backlog_and_stops_cleanly_on_sigterm(
    pg_dsn: str, migrated_schema: str, redis_url: str, key_prefix: str
) -> None:
    dsn = schema_dsn(pg_dsn, migrated_schema)
    store = TieredStore(
        RedisStore(redis_url, key_prefix=key_prefix, write_behind=True, flush_delay=0),
        PostgresStore(dsn),
        flusher=False,
    )
    env = clean_env(POSTGRES_DSN=dsn, REDIS_URL=redis_url, VEL_KEY_PREFIX=key_prefix)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "vel",
        "flusher",
        "--health-interval",
        "0.2",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        session = f"cli-{uuid.uuid4().hex[:6]}"
        for i in range(20):
            await store.append(session, [{"role": "user", "content": f"m{i}"}])
        deadline = time.monotonic() + 20
        while (await store.hot.backlog())[0] and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert (await store.hot.backlog())[0] == 0
        snapshot = await store.cold.load_snapshot(session)
        assert snapshot is not None and snapshot.last_seq == 20
        await asyncio.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(60):
            raw_out, raw_err = await proc.communicate()
        out, err = raw_out.decode(), raw_err.decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await store.aclose()
    assert proc.returncode == 0, err
    assert "vel flusher stopped (drained)" in out, out[-3000:]
    health = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert health and all("unflushed" in line for line in health)


async def test_stats_reports_the_backlog_as_json(
    pg_dsn: str, migrated_schema: str, redis_url: str, key_prefix: str
) -> None:
    store = TieredStore(
        RedisStore(redis_url, key_prefix=key_prefix, write_behind=True),
        PostgresStore(schema_dsn(pg_dsn, migrated_schema)),
        flusher=False,
    )
    try:
        await store.append("s", [{"role": "user", "content": "x"}] * 3)
    finally:
        await store.aclose()  # the flusher is off: the three messages stay unflushed
    env = clean_env(REDIS_URL=redis_url, VEL_KEY_PREFIX=key_prefix)
    result = await asyncio.to_thread(vel_cmd, "stats", "--json", env=env)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert figures["unflushed_messages"] == 3 and figures["dirty_sessions"] == 1


def test_demo_runs_in_memory_mode() -> None:
    result = vel_cmd("demo", "--storage", "memory", env=clean_env())
    assert result.returncode == 0, result.stderr
    assert "Your name is Alice." in result.stdout
    assert "I don't know your name." in result.stdout


def test_redis_without_postgres_dsn_warns_that_ttl_ends_sessions(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("POSTGRES_DSN", raising=False)
    with caplog.at_level(logging.WARNING, logger="vel.stores"):
        store = open_store("redis", load_settings())
    assert isinstance(store, RedisStore) and not store.write_behind
    assert any("Redis only" in r.getMessage() for r in caplog.records)
