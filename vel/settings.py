"""The one module that reads ``os.environ``.

Configuration flows keyword argument -> URL -> environment: every store takes explicit
arguments, and :func:`load_settings` supplies the environment's values for whatever was not
given. The openai SDK keeps reading its own ``OPENAI_*`` variables.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vel import bounds
from vel.bounds import Bound
from vel.errors import ConfigurationError
from vel.namespace import check_prefix, check_schema_name

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
            (default 10): renewed every third of it while the turn runs, so it only matters
            when a worker dies mid-turn or loses its backend.
        flush_lease: ``VEL_FLUSH_LEASE`` seconds a flusher's claim on dirty sessions
            outlives the flusher (default 3), renewed while it writes them.
        warm_lease: ``VEL_WARM_LEASE`` seconds one process may hold a cold session while
            loading it from Postgres (default 3), renewed while it loads.
        flush_interval: ``VEL_FLUSH_INTERVAL`` seconds between two sweeps of one bucket by
            all the flushers sharing a Redis together (0, the default: no limit). Set it when
            many workers run embedded flushers, so Postgres sees a bounded number of flush
            transactions however many workers there are (docs/scaling.md).
        migrate_on_start: ``VEL_MIGRATE`` = 1 (or true/yes/on) applies migrations when a
            store opens; 0/false/no/off or unset leaves them to ``vel migrate``.
        flusher: ``VEL_FLUSHER`` = ``embedded`` (default) or ``off`` (a standalone
            ``vel flusher`` does the work).
        log_format: ``VEL_LOG_FORMAT`` of the ``vel`` command's logs: ``text`` (default)
            or ``json`` (one object per line).
        pg_schema: ``VEL_PG_SCHEMA``, the Postgres schema holding vel's tables; unset, it
            follows the namespace (see :mod:`vel.namespace`).

    Every numeric value is checked against its range in :data:`NUMERIC` (see
    :mod:`vel.bounds`), whether it comes from the environment or is given directly.
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
    pg_schema: str | None = None

    def __post_init__(self) -> None:
        _check(self)


# The numeric settings: (field, environment variable, range). Values given in the environment
# and values given to Settings() directly are checked against the same range.
NUMERIC: tuple[tuple[str, str, Bound], ...] = (
    ("hot_ttl", "VEL_HOT_TTL", bounds.TTL),
    ("retention_ttl", "VEL_RETENTION_TTL", bounds.TTL),
    ("max_unflushed", "VEL_MAX_UNFLUSHED", bounds.MAX_UNFLUSHED),
    ("backpressure_wait", "VEL_BACKPRESSURE_WAIT", bounds.WAIT),
    ("pg_pool_max", "VEL_PG_POOL_MAX", bounds.POOL),
    ("redis_pool_max", "VEL_REDIS_POOL_MAX", bounds.POOL),
    ("buckets", "VEL_BUCKETS", bounds.BUCKETS),
    ("op_timeout", "VEL_OP_TIMEOUT", bounds.TIMEOUT),
    ("lock_lease", "VEL_LOCK_LEASE", bounds.LEASE),
    ("flush_lease", "VEL_FLUSH_LEASE", bounds.LEASE),
    ("warm_lease", "VEL_WARM_LEASE", bounds.LEASE),
    ("flush_interval", "VEL_FLUSH_INTERVAL", bounds.DELAY),
)
# Settings that may be unset (None).
_OPTIONAL = frozenset({"retention_ttl"})
_CHOICES = {"flusher": ("embedded", "off"), "log_format": ("text", "json")}
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _check(settings: Settings) -> None:
    for field, _, bound in NUMERIC:
        value = getattr(settings, field)
        if field in _OPTIONAL:
            bound.check_optional(f"Settings.{field}", value)
        else:
            bound.check(f"Settings.{field}", value)
    for field, choices in _CHOICES.items():
        if getattr(settings, field) not in choices:
            raise ConfigurationError(
                f"Settings.{field} must be one of {choices}, got {getattr(settings, field)!r}"
            )
    check_prefix(settings.key_prefix, "VEL_KEY_PREFIX")
    if settings.pg_schema is not None:
        check_schema_name(settings.pg_schema, "Settings.pg_schema")


def _flag(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE or raw == "":
        return False
    raise ConfigurationError(f"{name} must be one of {_TRUE + _FALSE}, got {env[name]!r}")


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read vel's settings from ``env`` (default: the process environment).

    Raises:
        ConfigurationError: a variable is set to something unusable (the message names the
            variable and what it accepts).
    """
    env = os.environ if env is None else env
    base = Settings()
    values: dict[str, Any] = {}
    for field, name, bound in NUMERIC:
        raw = env.get(name)
        if raw is not None and raw.strip() != "":
            values[field] = bound.parse(name, raw)
    for field, choices in _CHOICES.items():
        name = f"VEL_{field.upper()}"
        raw = env.get(name) or getattr(base, field)
        if raw not in choices:
            raise ConfigurationError(f"{name} must be one of {choices}, got {raw!r}")
        values[field] = raw
    schema = env.get("VEL_PG_SCHEMA") or None
    if schema is not None:
        values["pg_schema"] = check_schema_name(schema, "VEL_PG_SCHEMA")
    return Settings(
        postgres_dsn=env.get("POSTGRES_DSN") or None,
        redis_url=env.get("REDIS_URL") or base.redis_url,
        key_prefix=env.get("VEL_KEY_PREFIX") or base.key_prefix,
        migrate_on_start=_flag(env, "VEL_MIGRATE"),
        **values,
    )


def failpoint_spec(env: Mapping[str, str] | None = None) -> str:
    """``VEL_FAILPOINTS``: fault injection for vel's own fault tests (empty: off)."""
    env = os.environ if env is None else env
    return env.get("VEL_FAILPOINTS", "")


def openai_key_present(env: Mapping[str, str] | None = None) -> bool:
    """Whether ``OPENAI_API_KEY`` is set (the demo picks the real API then)."""
    env = os.environ if env is None else env
    return bool(env.get("OPENAI_API_KEY"))
