"""Session stores, and the process-wide registry behind ``session_storage='...'``.

Agents built with the same storage string share one store (so one Postgres pool and one Redis
pool per process, whatever the number of agents); the last agent to close closes it. A store
object passed in belongs to the caller and is never closed by an agent.
"""

from __future__ import annotations

import threading
from typing import Any

from vel import _fork
from vel.errors import ConfigurationError
from vel.logs import get_logger
from vel.settings import Settings, load_settings
from vel.stores.base import SessionInfo, SessionStore
from vel.stores.memory import MemoryStore

__all__ = [
    "MemoryStore",
    "SessionInfo",
    "SessionStore",
    "StorageSpec",
    "acquire_store",
    "open_store",
    "release_store",
]

log = get_logger("vel.stores")

StorageSpec = str | SessionStore

_registry_lock = threading.Lock()


def _renew_lock() -> None:
    global _registry_lock
    _registry_lock = threading.Lock()  # another thread of the parent may have held it


_fork.at_fork_in_child(_renew_lock)
_registry: dict[tuple[Any, ...], tuple[SessionStore, int]] = {}


def open_store(kind: str, settings: Settings | None = None) -> SessionStore:
    """Build a new store for a storage mode name (``'memory'``, ``'database'``, ``'redis'``).

    Raises:
        ConfigurationError: unknown mode, or ``'database'`` without ``POSTGRES_DSN``.
    """
    settings = settings or load_settings()
    if kind == "memory":
        return MemoryStore(retention_ttl=settings.retention_ttl)
    if kind == "database":
        if not settings.postgres_dsn:
            raise ConfigurationError(
                "session_storage='database' needs POSTGRES_DSN, e.g. "
                "postgresql://user:password@host:5432/dbname"
            )
        from vel.stores.postgres import PostgresStore

        return PostgresStore.from_settings(settings)
    if kind == "redis":
        from vel.stores.redis import RedisStore

        if not settings.postgres_dsn:
            log.warning(
                "session_storage='redis' without POSTGRES_DSN: sessions live in Redis only "
                "and end when their TTL (%s s) runs out or Redis loses them",
                settings.hot_ttl,
            )
            return RedisStore.from_settings(settings, write_behind=False)
        from vel.stores.postgres import PostgresStore
        from vel.stores.tiered import TieredStore

        return TieredStore(
            RedisStore.from_settings(settings, write_behind=True),
            PostgresStore.from_settings(settings),
            settings=settings,
        )
    raise ConfigurationError(
        f"unknown session_storage {kind!r}; use 'memory', 'database', 'redis' or a store object"
    )


def acquire_store(spec: StorageSpec) -> tuple[SessionStore, tuple[Any, ...] | None]:
    """Resolve an Agent's ``session_storage``; returns the store and its registry key."""
    if not isinstance(spec, str):
        if not isinstance(spec, SessionStore):
            raise ConfigurationError(
                f"session_storage must be 'memory', 'database', 'redis' or a SessionStore, "
                f"got {type(spec).__name__}"
            )
        return spec, None
    if spec == "memory":
        return open_store("memory"), None
    settings = load_settings()
    key = (spec, settings)
    with _registry_lock:
        entry = _registry.get(key)
        if entry is None:
            entry = (open_store(spec, settings), 0)
        _registry[key] = (entry[0], entry[1] + 1)
        return entry[0], key


async def release_store(store: SessionStore, key: tuple[Any, ...] | None) -> None:
    """Undo :func:`acquire_store`; closes the store when its last user lets go."""
    if key is None:
        if isinstance(store, MemoryStore):
            await store.aclose()
        return
    with _registry_lock:
        entry = _registry.get(key)
        if entry is None or entry[0] is not store:
            return
        if entry[1] > 1:
            _registry[key] = (store, entry[1] - 1)
            return
        del _registry[key]
    await store.aclose()
