"""What the standalone benchmark scripts share: a private Postgres database or a namespace
to run in, removed afterwards whatever happens, and the figures printed and saved.

Imported by the scripts beside it (run as ``python scripts/<bench>.py``, so this folder is
on ``sys.path``); not part of the package.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import redis.asyncio as aioredis

T = TypeVar("T")


def with_database(dsn: str, name: str) -> str:
    """``dsn`` pointed at database ``name``."""
    return urlunsplit(urlsplit(dsn)._replace(path="/" + name))


async def in_private_database(dsn: str, label: str, work: Callable[[str], Awaitable[T]]) -> T:
    """Run ``work(dsn of a new database)``, so that ``pg_stat_database`` and the WAL count
    only the bench's own work; the database is dropped afterwards (``WITH (FORCE)``)."""
    name = f"vel_bench_{label}_{os.getpid()}"
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            return await work(with_database(dsn, name))
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def drop_namespace(dsn: str, schema: str, redis_url: str, prefix: str) -> None:
    """Remove a run's Postgres schema and its Redis keys."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
    finally:
        await conn.close()
    client = aioredis.Redis.from_url(redis_url)
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


def emit(figures: Any, path: str | None) -> None:
    """Print the figures as JSON, and write them to ``path`` too when given."""
    text = json.dumps(figures, indent=2)
    print(text)
    if path:
        Path(path).write_text(text + "\n")
