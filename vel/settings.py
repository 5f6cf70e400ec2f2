"""The one module that reads ``os.environ``.

Configuration flows keyword argument -> URL -> environment: every store takes explicit
arguments, and :func:`load_settings` supplies the environment's values for whatever was not
given. The openai SDK keeps reading its own ``OPENAI_*`` variables.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from vel.errors import ConfigurationError

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


@dataclass(frozen=True, slots=True)
class Settings:
    """Values read from the environment (all optional).

    Attributes:
        postgres_dsn: ``POSTGRES_DSN``.
        redis_url: ``REDIS_URL`` (default ``redis://127.0.0.1:6379/0``);
            ``redis+cluster://host:port[,host:port...]`` (or ``rediss+cluster://``) selects a
            Redis Cluster.
        key_prefix: ``VEL_KEY_PREFIX``, namespace of every Redis key (default ``vel``).
        hot_ttl: ``VEL_HOT_TTL`` seconds a clean session stays in Redis after its last use.
        retention_ttl: ``VEL_RETENTION_TTL`` seconds a session lives after its last write
            (both tiers); unset means forever.
        max_unflushed: ``VEL_MAX_UNFLUSHED`` bound on messages waiting for Postgres.
        backpressure_wait: ``VEL_BACKPRESSURE_WAIT`` seconds an append waits for the backlog
            to drain before raising; 0 raises at once.
        pg_pool_max: ``VEL_PG_POOL_MAX`` Postgres connections per process.
        redis_pool_max: ``VEL_REDIS_POOL_MAX`` Redis connections per process (per event
            loop); with a Redis Cluster, per process and per cluster node.
        buckets: ``VEL_BUCKETS`` hash-slot buckets of the Redis key layout (default 16). Part
            of the data layout: every process sharing a key prefix must use the same value,
            and changing it needs a drained Redis or a new key prefix (docs/scaling.md).
        op_timeout: ``VEL_OP_TIMEOUT`` seconds allowed for one backend call.
        lock_lease: ``VEL_LOCK_LEASE`` seconds a session's turn lock outlives its holder
            (default 10, at most 600): renewed every third of it while the turn runs, so
            it only matters when a worker dies mid-turn or loses its backend.
        flush_lease: ``VEL_FLUSH_LEASE`` seconds a flusher's claim on dirty sessions
            outlives the flusher (default 3), renewed while it writes them.
        warm_lease: ``VEL_WARM_LEASE`` seconds one process may hold a cold session while
            loading it from Postgres (default 3), renewed while it loads.
        flush_interval: ``VEL_FLUSH_INTERVAL`` seconds between two sweeps of one bucket by
            all the flushers sharing a Redis together (0, the default: no limit). Set it when
            many workers run embedded flushers, so Postgres sees a bounded number of flush
            transactions however many workers there are (docs/scaling.md).
        migrate_on_start: ``VEL_MIGRATE`` = 1 applies migrations when a store opens.
        flusher: ``VEL_FLUSHER`` = ``embedded`` (default) or ``off`` (a standalone
            ``vel flusher`` does the work).
        log_format: ``VEL_LOG_FORMAT`` of the ``vel`` command's logs: ``text`` (default)
            or ``json`` (one object per line).
    """

    postgres_dsn: str | None = None
    redis_url: str = DEFAULT_REDIS_URL
    key_prefix: str = "vel"
    hot_ttl: float = 3600.0
    retention_ttl: float | None = None
    max_unflushed: int = 100_000
    backpressure_wait: float = 5.0
    pg_pool_max: int = 10
    redis_pool_max: int = 50
    buckets: int = 16  # vel.stores.redis.keys.DEFAULT_BUCKETS (not imported: import cycle)
    op_timeout: float = 5.0
    lock_lease: float = 10.0
    flush_lease: float = 3.0
    warm_lease: float = 3.0
    flush_interval: float = 0.0
    migrate_on_start: bool = False
    flusher: str = "embedded"
    log_format: str = "text"


def _float(env: Mapping[str, str], name: str, default: float | None) -> float | None:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigurationError(f"{name} must be a number of seconds, got {raw!r}") from None
    if value < 0:
        raise ConfigurationError(f"{name} must not be negative, got {raw!r}")
    return value


# Leases are renewed every third of their length, so very short ones mostly renew; a very
# long one blocks a session that long after its holder died.
LEASE_RANGE = (0.5, 600.0)


def _lease(env: Mapping[str, str], name: str, default: float) -> float:
    value = _float(env, name, default)
    assert value is not None
    low, high = LEASE_RANGE
    if not low <= value <= high:
        raise ConfigurationError(
            f"{name} must be between {low:g} and {high:g} seconds, got {env.get(name)!r}"
        )
    return value


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigurationError(f"{name} must be an integer, got {raw!r}") from None
    if value <= 0:
        raise ConfigurationError(f"{name} must be positive, got {raw!r}")
    return value


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read vel's settings from ``env`` (default: the process environment).

    Raises:
        ConfigurationError: a variable is set to something unusable.
    """
    env = os.environ if env is None else env
    base = Settings()
    flusher = env.get("VEL_FLUSHER", base.flusher) or base.flusher
    if flusher not in ("embedded", "off"):
        raise ConfigurationError(f"VEL_FLUSHER must be 'embedded' or 'off', got {flusher!r}")
    log_format = env.get("VEL_LOG_FORMAT") or base.log_format
    if log_format not in ("text", "json"):
        raise ConfigurationError(f"VEL_LOG_FORMAT must be 'text' or 'json', got {log_format!r}")
    hot_ttl = _float(env, "VEL_HOT_TTL", base.hot_ttl)
    backpressure_wait = _float(env, "VEL_BACKPRESSURE_WAIT", base.backpressure_wait)
    op_timeout = _float(env, "VEL_OP_TIMEOUT", base.op_timeout)
    flush_interval = _float(env, "VEL_FLUSH_INTERVAL", base.flush_interval)
    assert hot_ttl is not None and backpressure_wait is not None and op_timeout is not None
    assert flush_interval is not None
    return Settings(
        postgres_dsn=env.get("POSTGRES_DSN") or None,
        redis_url=env.get("REDIS_URL") or base.redis_url,
        key_prefix=env.get("VEL_KEY_PREFIX") or base.key_prefix,
        hot_ttl=hot_ttl,
        retention_ttl=_float(env, "VEL_RETENTION_TTL", None),
        max_unflushed=_int(env, "VEL_MAX_UNFLUSHED", base.max_unflushed),
        backpressure_wait=backpressure_wait,
        pg_pool_max=_int(env, "VEL_PG_POOL_MAX", base.pg_pool_max),
        redis_pool_max=_int(env, "VEL_REDIS_POOL_MAX", base.redis_pool_max),
        buckets=_int(env, "VEL_BUCKETS", base.buckets),
        op_timeout=op_timeout,
        lock_lease=_lease(env, "VEL_LOCK_LEASE", base.lock_lease),
        flush_lease=_lease(env, "VEL_FLUSH_LEASE", base.flush_lease),
        warm_lease=_lease(env, "VEL_WARM_LEASE", base.warm_lease),
        flush_interval=flush_interval,
        migrate_on_start=env.get("VEL_MIGRATE", "") in ("1", "true", "yes"),
        flusher=flusher,
        log_format=log_format,
    )


def redact(url: str) -> str:
    """Return ``url`` with any password replaced by ``***`` (for errors and logs)."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in creds else f"{scheme}://{user}@{host}"


def failpoint_spec(env: Mapping[str, str] | None = None) -> str:
    """``VEL_FAILPOINTS``: fault injection for vel's own fault tests (empty: off)."""
    env = os.environ if env is None else env
    return env.get("VEL_FAILPOINTS", "")


def openai_key_present(env: Mapping[str, str] | None = None) -> bool:
    """Whether ``OPENAI_API_KEY`` is set (the demo picks the real API then)."""
    env = os.environ if env is None else env
    return bool(env.get("OPENAI_API_KEY"))
