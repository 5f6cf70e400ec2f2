"""Shared fixtures: real Redis and Postgres, each test isolated by its own schema / key prefix.

An unreachable service is a test failure, never a skip: integration tests exist to talk to
real servers.
"""

from __future__ import annotations

import inspect
import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from workers import Stack

from vel.testing import FakeOpenAIServer

pytest_plugins = ["conftest_cluster"]

PG_DSN = os.environ.get("VEL_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("VEL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makeitem(collector: pytest.Collector, name: str, obj: object) -> None:
    """Run every ``async def`` test on anyio (asyncio backend) without a marker per test."""
    if name.startswith("test") and inspect.iscoroutinefunction(obj):
        pytest.mark.anyio(obj)


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def pg_dsn() -> str:
    if not _reachable("127.0.0.1", 5432):
        pytest.fail(f"Postgres is not reachable at {PG_DSN}; start it (see README)")
    return PG_DSN


@pytest.fixture(scope="session")
def redis_url() -> str:
    if not _reachable("127.0.0.1", 6379):
        pytest.fail(f"Redis is not reachable at {REDIS_URL}; start it (see README)")
    return REDIS_URL


@asynccontextmanager
async def fresh_schema(pg_dsn: str) -> AsyncIterator[str]:
    """A new, empty Postgres schema, dropped on exit."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute(f'CREATE SCHEMA "{schema}"')
    finally:
        await conn.close()
    try:
        yield schema
    finally:
        conn = await asyncpg.connect(pg_dsn)
        try:
            await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        finally:
            await conn.close()


@pytest.fixture
async def pg_schema(pg_dsn: str) -> AsyncIterator[str]:
    """A fresh, empty Postgres schema for this test (dropped afterwards)."""
    async with fresh_schema(pg_dsn) as schema:
        yield schema


@pytest.fixture
def key_prefix(redis_url: str) -> Iterator[str]:
    """A unique Redis key namespace for this test (its keys are deleted afterwards)."""
    prefix = f"veltest-{uuid.uuid4().hex[:10]}"
    yield prefix
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
async def migrated_schema(pg_dsn: str, pg_schema: str) -> str:
    """A fresh schema with vel's migrations applied."""
    from vel.stores.postgres.migrate import migrate

    await migrate(pg_dsn, schema=pg_schema)
    return pg_schema


def schema_dsn(dsn: str, schema: str) -> str:
    """A DSN whose connections use ``schema`` (asyncpg passes unknown params as settings)."""
    return f"{dsn}{'&' if '?' in dsn else '?'}search_path={schema}"


@pytest.fixture(params=["memory", "database", "redis"])
async def storage_mode(
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    pg_dsn: str,
    redis_url: str,
    migrated_schema: str,
    key_prefix: str,
) -> AsyncIterator[str]:
    """Each value of ``session_storage=...``, with the environment an Agent reads set up
    for it (its own Postgres schema and Redis key prefix)."""
    mode: str = request.param
    if mode != "memory":
        monkeypatch.setenv("POSTGRES_DSN", schema_dsn(pg_dsn, migrated_schema))
        monkeypatch.setenv("REDIS_URL", redis_url)
        monkeypatch.setenv("VEL_KEY_PREFIX", key_prefix)
    yield mode


@pytest.fixture
def stack(
    pg_dsn: str, migrated_schema: str, redis_url: str, key_prefix: str, tmp_path: Path
) -> Iterator[Stack]:
    """Worker processes and servers of one multi-process test, all ended afterwards."""
    s = Stack(pg_dsn, migrated_schema, redis_url, key_prefix, tmp_path)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
async def tiered(stack: Stack) -> AsyncIterator[Any]:
    """The tiered store of ``stack``'s schema and prefix (test_tiered.py has its own)."""
    store = stack.tiered()
    try:
        yield store
    finally:
        await store.aclose()


@pytest.fixture
def srv() -> Iterator[FakeOpenAIServer]:
    """vel's fake OpenAI-compatible server for this test."""
    with FakeOpenAIServer() as server:
        yield server


def model_for(srv: FakeOpenAIServer) -> dict[str, Any]:
    """An Agent ``model`` dict pointing at ``srv``."""
    return {"provider": "openai", "model": "gpt-4o", "api_key": "test", "base_url": srv.base_url}
