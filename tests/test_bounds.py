"""Hostile numbers: every numeric parameter and environment variable is range-checked where it
is given, with ConfigurationError (configuration) or InvalidInputError (call arguments) naming
the allowed range, and a refused call touches nothing stored. The largest accepted values
work end to end (issue 13, failing input 5: ``ContextManager(max_history=2**63-1)`` used to be
accepted, then failed every 'redis' turn; ``2**63`` and ``10**30`` every 'database' turn too).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import pytest
from conftest import model_for
from stores import make_store

from vel import Agent, ContextManager, MemoryStore
from vel.bounds import AGE, COUNT, MAX_UNFLUSHED, TTL, WAIT
from vel.cli import main as vel_main
from vel.errors import ConfigurationError, InvalidInputError
from vel.metrics import MetricsServer
from vel.settings import Settings, load_settings
from vel.stores.postgres import PostgresStore
from vel.stores.redis import RedisStore
from vel.stores.tiered import Flusher, TieredStore
from vel.testing import FakeOpenAIServer

NAN = float("nan")
INF = float("inf")
# The hostile values of the issue, and the kinds around them.
HOSTILE: list[Any] = [True, False, -1, -0.5, 0, NAN, INF, -INF, 2**63 - 1, 2**63, 10**30, 1.5, "5"]
HOSTILE_IDS = ["True", "False", "-1", "-0.5", "0", "nan", "inf", "-inf", "2^63-1", "2^63",
               "1e30", "1.5", "str"]  # fmt: skip


def refused_for(value: Any, *, integer: bool, zero_ok: bool) -> bool:
    """Whether ``value`` must be refused by a parameter of this kind (the test's own rule,
    written from the documented ranges, not read from vel.bounds)."""
    if isinstance(value, (bool, str)):
        return True
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return True
    if value < 0 or value >= 2**53:
        return True
    if value == 0:
        return not zero_ok
    return integer and isinstance(value, float)


def assert_names_range(exc: BaseException, name: str) -> None:
    text = str(exc)
    assert name in text, text
    assert re.search(r"(from \d+ to \d+|>=? \d+(\.\d+)? and <= \d+)", text), text


PG = "postgresql://postgres@127.0.0.1:5432/test"
REDIS = "redis://127.0.0.1:6379/0"


def _tiered(**kw: Any) -> TieredStore:
    return TieredStore(
        RedisStore(REDIS, key_prefix="vel", write_behind=True, settings=Settings()),
        PostgresStore(PG, schema="x", settings=Settings()),
        settings=Settings(),
        **kw,
    )


def _flusher(**kw: Any) -> Flusher:
    return Flusher(
        RedisStore(REDIS, write_behind=True, settings=Settings()),
        PostgresStore(PG, schema="x", settings=Settings()),
        **kw,
    )


# (name, build(value), integer, zero_ok): every numeric constructor parameter.
CONSTRUCTORS: list[tuple[str, Callable[[Any], Any], bool, bool]] = [
    ("max_history", lambda v: ContextManager(max_history=v), True, True),
    ("max_steps", lambda v: Agent("a", {"provider": "openai", "model": "m", "api_key": "k"},
                                  policies={"max_steps": v}), True, False),
    ("lock_timeout", lambda v: Agent("a", {"provider": "openai", "model": "m", "api_key": "k"},
                                     policies={"lock_timeout": v}), False, True),
    ("retention_ttl", lambda v: MemoryStore(retention_ttl=v), False, False),
    ("pool_min", lambda v: PostgresStore(PG, schema="x", pool_min=v, settings=Settings()),
     True, True),
    ("pool_max", lambda v: PostgresStore(PG, schema="x", pool_max=v, settings=Settings()),
     True, False),
    ("op_timeout", lambda v: PostgresStore(PG, schema="x", op_timeout=v, settings=Settings()),
     False, False),
    ("connect_timeout",
     lambda v: PostgresStore(PG, schema="x", connect_timeout=v, settings=Settings()),
     False, False),
    ("retention_ttl",
     lambda v: PostgresStore(PG, schema="x", retention_ttl=v, settings=Settings()),
     False, False),
    ("lock_lease", lambda v: PostgresStore(PG, schema="x", lock_lease=v, settings=Settings()),
     False, False),
    ("buckets", lambda v: RedisStore(REDIS, buckets=v, settings=Settings()), True, False),
    ("hot_ttl", lambda v: RedisStore(REDIS, hot_ttl=v, settings=Settings()), False, False),
    ("retention_ttl", lambda v: RedisStore(REDIS, retention_ttl=v, settings=Settings()),
     False, False),
    ("max_unflushed", lambda v: RedisStore(REDIS, max_unflushed=v, settings=Settings()),
     True, False),
    ("backpressure_wait",
     lambda v: RedisStore(REDIS, backpressure_wait=v, settings=Settings()), False, True),
    ("flush_delay", lambda v: RedisStore(REDIS, flush_delay=v, settings=Settings()),
     False, True),
    ("op_timeout", lambda v: RedisStore(REDIS, op_timeout=v, settings=Settings()), False, False),
    ("pool_max", lambda v: RedisStore(REDIS, pool_max=v, settings=Settings()), True, False),
    ("lock_lease", lambda v: RedisStore(REDIS, lock_lease=v, settings=Settings()), False, False),
    ("warm_lease", lambda v: _tiered(warm_lease=v), False, False),
    ("drain_timeout", lambda v: _tiered(drain_timeout=v), False, True),
    ("batch_sessions", lambda v: _flusher(batch_sessions=v), True, False),
    ("max_rows", lambda v: _flusher(max_rows=v), True, False),
    ("lease", lambda v: _flusher(lease=v), False, False),
    ("idle_interval", lambda v: _flusher(idle_interval=v), False, False),
    ("max_backoff", lambda v: _flusher(max_backoff=v), False, False),
    ("sweep_interval", lambda v: _flusher(sweep_interval=v), False, True),
    ("port", lambda v: MetricsServer(lambda: None, v), True, True),  # type: ignore[arg-type,return-value]
    ("hot_ttl", lambda v: Settings(hot_ttl=v), False, False),
    ("retention_ttl", lambda v: Settings(retention_ttl=v), False, False),
    ("max_unflushed", lambda v: Settings(max_unflushed=v), True, False),
    ("backpressure_wait", lambda v: Settings(backpressure_wait=v), False, True),
    ("pg_pool_max", lambda v: Settings(pg_pool_max=v), True, False),
    ("redis_pool_max", lambda v: Settings(redis_pool_max=v), True, False),
    ("buckets", lambda v: Settings(buckets=v), True, False),
    ("op_timeout", lambda v: Settings(op_timeout=v), False, False),
    ("flush_interval", lambda v: Settings(flush_interval=v), False, True),
]  # fmt: skip


@pytest.mark.parametrize("value", HOSTILE, ids=HOSTILE_IDS)
@pytest.mark.parametrize(
    ("name", "build", "integer", "zero_ok"),
    CONSTRUCTORS,
    ids=[f"{i}-{c[0]}" for i, c in enumerate(CONSTRUCTORS)],
)
def test_constructor_parameters_are_range_checked(
    name: str, build: Callable[[Any], Any], integer: bool, zero_ok: bool, value: Any
) -> None:
    if refused_for(value, integer=integer, zero_ok=zero_ok):
        with pytest.raises(ConfigurationError) as info:
            build(value)
        assert_names_range(info.value, name)
    else:
        build(value)


# Every numeric environment variable: (name, integer, zero_ok).
ENVIRONMENT = [
    ("VEL_HOT_TTL", False, False),
    ("VEL_RETENTION_TTL", False, False),
    ("VEL_MAX_UNFLUSHED", True, False),
    ("VEL_BACKPRESSURE_WAIT", False, True),
    ("VEL_PG_POOL_MAX", True, False),
    ("VEL_REDIS_POOL_MAX", True, False),
    ("VEL_BUCKETS", True, False),
    ("VEL_OP_TIMEOUT", False, False),
    ("VEL_FLUSH_INTERVAL", False, True),
]
HOSTILE_TEXT = ["true", "-1", "0", "nan", "inf", "-inf", "9223372036854775807",
                "9223372036854775808", "1e30", "1.5", "abc", "0x10"]  # fmt: skip


@pytest.mark.parametrize("raw", HOSTILE_TEXT)
@pytest.mark.parametrize(("name", "integer", "zero_ok"), ENVIRONMENT)
def test_environment_variables_are_range_checked(
    name: str, integer: bool, zero_ok: bool, raw: str
) -> None:
    try:
        value: Any = int(raw) if integer else float(raw)
    except ValueError:
        value = None
    if value is None or refused_for(value, integer=integer, zero_ok=zero_ok):
        with pytest.raises(ConfigurationError) as info:
            load_settings({name: raw})
        assert_names_range(info.value, name)
        assert repr(raw) in str(info.value)
    else:
        load_settings({name: raw})


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("VEL_MIGRATE", "maybe"),
        ("VEL_MIGRATE", "2"),
        ("VEL_FLUSHER", "sometimes"),
        ("VEL_LOG_FORMAT", "xml"),
        ("VEL_KEY_PREFIX", "has space"),
        ("VEL_KEY_PREFIX", "x" * 65),
        ("VEL_PG_SCHEMA", "bad-name"),
        ("VEL_PG_SCHEMA", "x" * 64),
    ],
)
def test_other_environment_variables_are_checked(name: str, raw: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        load_settings({name: raw})
    assert name in str(info.value)


def test_vel_migrate_words() -> None:
    for raw in ("1", "true", "yes", "on", "TRUE"):
        assert load_settings({"VEL_MIGRATE": raw}).migrate_on_start
    for raw in ("", "0", "false", "no", "off"):
        assert not load_settings({"VEL_MIGRATE": raw}).migrate_on_start


# -- call arguments: refused with InvalidInputError, nothing stored touched ----------------------

STORE_KINDS = ["memory", "postgres", "redis", "tiered"]
CALLS: list[tuple[str, Callable[[Any, Any], Any], bool, bool]] = [
    ("limit", lambda s, v: s.load("sid", v), True, True),
    ("limit", lambda s, v: s.list_sessions(limit=v), True, True),
    ("inactive_for", lambda s, v: s.list_sessions(inactive_for=v), False, True),
]


async def _turn_lock(store: Any, value: Any) -> None:
    async with store.turn_lock("sid", value):
        pass


@pytest.mark.parametrize("kind", STORE_KINDS)
async def test_call_arguments_are_range_checked_and_touch_nothing(
    kind: str, pg_dsn: str, migrated_schema: str, redis_url: str, key_prefix: str
) -> None:
    history = [{"role": "user", "content": "keep me"}, {"role": "assistant", "content": "ok"}]
    async with make_store(
        kind, pg_dsn=pg_dsn, schema=migrated_schema, redis_url=redis_url, prefix=key_prefix
    ) as store:
        await store.append("sid", history)
        ctx = ContextManager()
        ctx.bind(store)
        calls: list[tuple[str, Callable[[Any], Any], bool, bool]] = [
            (name, lambda v, call=call: call(store, v), integer, zero_ok)
            for name, call, integer, zero_ok in CALLS
        ]
        calls += [
            ("timeout", lambda v: _turn_lock(store, v), False, True),
            ("max_age_hours", lambda v: ctx.alist_sessions(max_age_hours=v), False, True),
            ("max_age_seconds", lambda v: ctx.alist_sessions(max_age_seconds=v), False, True),
            ("limit", lambda v: ctx.alist_sessions(limit=v), True, True),
            ("limit", lambda v: ctx.aget_inactive_sessions(limit=v), True, True),
        ]
        if isinstance(store, TieredStore):
            calls.append(("timeout", lambda v: store.flush(v), False, True))
        for name, call, integer, zero_ok in calls:
            for value in HOSTILE:
                if not refused_for(value, integer=integer, zero_ok=zero_ok):
                    continue
                with pytest.raises(InvalidInputError) as info:
                    await call(value)
                assert_names_range(info.value, name)
        assert await store.load("sid") == history
        # The ends of the ranges are accepted, and work.
        assert await store.load("sid", COUNT.high) == history
        assert await store.load("sid", 0) == []
        assert [i.session_id for i in await store.list_sessions(limit=COUNT.high)] == ["sid"] or (
            kind == "tiered"  # listed once flushed
        )
        assert await store.list_sessions(inactive_for=AGE.high) == []
        await _turn_lock(store, WAIT.high)
        assert await store.load("sid") == history


# -- the failing input, and the largest accepted values end to end -----------------------------


@pytest.mark.parametrize("value", [2**63 - 1, 2**63, 10**30])
def test_max_history_beyond_the_range_is_refused_at_construction(value: int) -> None:
    with pytest.raises(ConfigurationError) as info:
        ContextManager(max_history=value)
    assert "max_history must be an integer from 0 to 2147483647" in str(info.value)


async def test_largest_accepted_values_work_in_every_mode(
    storage_mode: str, monkeypatch: pytest.MonkeyPatch, srv: FakeOpenAIServer
) -> None:
    for name, bound in (
        ("VEL_HOT_TTL", TTL),
        ("VEL_RETENTION_TTL", TTL),
        ("VEL_MAX_UNFLUSHED", MAX_UNFLUSHED),
        ("VEL_BACKPRESSURE_WAIT", WAIT),
    ):
        monkeypatch.setenv(name, str(int(bound.high)))
    async with Agent(
        id="bounds",
        model=model_for(srv),
        session_storage=storage_mode,
        context_manager=ContextManager(max_history=COUNT.high),
        policies={"lock_timeout": WAIT.high, "max_steps": 10_000},
    ) as agent:
        await agent.run({"message": "first"}, session_id="s")
        await agent.run({"message": "second"}, session_id="s")
        history = await agent.ctxmgr.aget_session_context("s")
        assert [m["content"] for m in history if m["role"] == "user"] == ["first", "second"]
        assert len(history) == 4
        infos = await agent.ctxmgr.alist_sessions(max_age_seconds=0, limit=COUNT.high)
        assert storage_mode == "redis" or [i.session_id for i in infos] == ["s"]


# -- command options -----------------------------------------------------------------------------

CLI_OPTIONS = [
    (["sessions", "list", "--limit"], True, True),
    (["sessions", "list", "--older-than"], False, True),
    (["sessions", "delete", "x", "--flush-timeout"], False, True),
    (["warm", "--recent"], True, True),
    (["warm", "--all", "--concurrency"], True, False),
    (["stats", "--interval"], False, False),
    (["stats", "--count"], True, True),
    (["doctor", "--max-skew"], False, True),
    (["doctor", "--max-backlog-age"], False, True),
    (["flusher", "--lease"], False, False),
    (["flusher", "--drain-timeout"], False, True),
    (["flusher", "--health-interval"], False, True),
    (["flusher", "--metrics-port"], True, True),
]


@pytest.mark.parametrize("raw", ["-1", "0", "nan", "inf", "9223372036854775808", "1e30", "1.5",
                                 "abc"])  # fmt: skip
@pytest.mark.parametrize(("argv", "integer", "zero_ok"), CLI_OPTIONS)
def test_command_options_are_range_checked(
    argv: list[str], integer: bool, zero_ok: bool, raw: str, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        value: Any = int(raw) if integer else float(raw)
    except ValueError:
        value = None
    refused = value is None or refused_for(value, integer=integer, zero_ok=zero_ok)
    if not refused:
        return  # accepted values are exercised by the commands' own tests
    with pytest.raises(SystemExit) as info:
        vel_main([*argv, raw])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert argv[-1] in err and ("from" in err or "<=" in err), err
