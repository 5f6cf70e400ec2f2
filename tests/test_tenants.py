"""Two tenants on one Redis and one Postgres (issue 13, failing input 10): two Redis ACL users,
two key prefixes (one a prefix of the other at the ':' boundary), two Postgres roles, each set
up with exactly the ACL and grants docs/operations.md documents. Neither tenant can list,
read, warm, delete or purge the other's sessions, through the API or ``vel sessions``; a
tenant pointed at the other's namespace is refused with AccessDeniedError naming the missing
permission; ``vel doctor`` passes for each with those least privileges.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from servers import RedisServer

from vel.cli import main as vel_main
from vel.errors import AccessDeniedError
from vel.namespace import schema_for_prefix
from vel.settings import Settings, load_settings
from vel.stores import open_store
from vel.stores.postgres import PostgresStore
from vel.stores.redis import RedisStore
from vel.stores.tiered import TieredStore

DOCS = Path(__file__).resolve().parent.parent / "docs" / "operations.md"
ADMIN_PASSWORD = "admin-" + uuid.uuid4().hex[:8]


def documented_blocks() -> tuple[str, list[str]]:
    """The ``ACL SETUSER`` line and the ``GRANT`` statements of docs/operations.md."""
    text = DOCS.read_text()
    acl = re.search(r"^ACL SETUSER .*$", text, re.M)
    assert acl is not None, "docs/operations.md lost its Redis ACL line"
    grants = re.findall(r"^(?:GRANT|ALTER DEFAULT PRIVILEGES) .*;$", text, re.M)
    assert len(grants) >= 3, "docs/operations.md lost its Postgres grants"
    return acl.group(0), grants


def test_the_documented_acl_allows_every_command_the_lua_scripts_run() -> None:
    """A script calling a command the ACL lacks fails only on the path that runs it (an ack,
    a pop): every command any script names must be in the documented line."""
    from vel.stores.redis import editscripts, lockscripts, scripts, wbscripts
    from vel.summaries import redis as summary_scripts

    sources = [
        v
        for module in (scripts, lockscripts, editscripts, wbscripts, summary_scripts)
        for k, v in vars(module).items()
        if k.lstrip("_").isupper() and isinstance(v, str)
    ]
    called = {c.lower() for src in sources for c in re.findall(r"redis\.call\('(\w+)'", src)}
    assert called, "no redis.call found in vel.stores.redis.scripts"
    acl, _ = documented_blocks()
    allowed = set(re.findall(r"\+([a-z|]+)", acl))
    assert called - allowed == set()


@dataclass
class Tenant:
    name: str
    prefix: str
    schema: str
    role: str
    redis_url: str
    dsn: str

    def env(self, **extra: str) -> dict[str, str]:
        return {
            "POSTGRES_DSN": self.dsn,
            "REDIS_URL": self.redis_url,
            "VEL_KEY_PREFIX": self.prefix,
            "VEL_OP_TIMEOUT": "3",
            **extra,
        }

    def store(self, **overrides: Any) -> TieredStore:
        settings = load_settings(self.env())
        hot_prefix = overrides.pop("prefix", self.prefix)
        return TieredStore(
            RedisStore(
                overrides.pop("redis_url", self.redis_url),
                key_prefix=hot_prefix,
                write_behind=True,
                flush_delay=0,
                settings=settings,
            ),
            PostgresStore(overrides.pop("dsn", self.dsn), namespace=hot_prefix, settings=settings),
            flusher=False,
            settings=settings,
        )


@pytest.fixture
def acl_redis() -> Iterator[RedisServer]:
    with RedisServer(
        "--user", "default", "off",
        "--user", "admin", "on", f">{ADMIN_PASSWORD}", "~*", "&*", "+@all",
        "--maxmemory", "64mb", "--maxmemory-policy", "volatile-lru",
    ) as server:  # fmt: skip
        yield server


async def _admin_sql(dsn: str, *statements: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture
async def tenants(pg_dsn: str, acl_redis: RedisServer) -> AsyncIterator[tuple[Tenant, Tenant]]:
    acl_line, grants = documented_blocks()
    tag = uuid.uuid4().hex[:8]
    base = f"tn{tag}"
    specs = [("a", base), ("b", f"{base}:b")]  # b's prefix extends a's at the ':' boundary
    admin = aioredis.Redis(port=acl_redis.port, username="admin", password=ADMIN_PASSWORD)
    made: list[Tenant] = []
    database = pg_dsn.rsplit("/", 1)[1].split("?")[0]
    try:
        for name, prefix in specs:
            role = f"vel_tenant_{tag}_{name}"
            password = f"pw-{name}-{uuid.uuid4().hex[:6]}"
            rules = acl_line.replace("ACL SETUSER ", "", 1)
            rules = rules.replace("<user>", role).replace("<password>", password)
            rules = rules.replace("<prefix>", prefix)
            await admin.execute_command("ACL", "SETUSER", *rules.split())
            schema = schema_for_prefix(prefix)
            assert schema is not None
            tenant = Tenant(
                name=name,
                prefix=prefix,
                schema=schema,
                role=role,
                redis_url=f"redis://{role}:{password}@127.0.0.1:{acl_redis.port}/0",
                dsn=pg_dsn.replace("postgres@", f"{role}@", 1),
            )
            made.append(tenant)
            await _admin_sql(pg_dsn, f"CREATE ROLE {role} LOGIN")
            # The administrator migrates the namespace, as the docs say, then grants.
            assert (
                await asyncio.to_thread(vel_main, ["migrate", "--dsn", pg_dsn, "--prefix", prefix])
                == 0
            )
            owner = await asyncpg.connect(pg_dsn)
            try:
                owner_name = await owner.fetchval("SELECT current_user")
            finally:
                await owner.close()
            await _admin_sql(
                pg_dsn,
                *(
                    g.replace("<database>", database)
                    .replace("<schema>", schema)
                    .replace("<role>", role)
                    .replace("<owner>", owner_name)
                    for g in grants
                ),
            )
        yield made[0], made[1]
    finally:
        for tenant in made:
            await _admin_sql(
                pg_dsn,
                f'DROP SCHEMA IF EXISTS "{tenant.schema}" CASCADE',
                f"DROP OWNED BY {tenant.role}",
                f"DROP ROLE IF EXISTS {tenant.role}",
            )
        await admin.aclose()


async def vel(env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: Any, *argv: str) -> Any:
    """``vel argv`` in this process (on a thread: it runs its own event loop)."""
    with monkeypatch.context() as m:
        for key in ("POSTGRES_DSN", "REDIS_URL", "VEL_KEY_PREFIX", "VEL_PG_SCHEMA"):
            m.delenv(key, raising=False)
        for key, value in env.items():
            m.setenv(key, value)
        code = await asyncio.to_thread(vel_main, list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def msg(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


async def test_two_tenants_never_cross(
    tenants: tuple[Tenant, Tenant],
    acl_redis: RedisServer,
    pg_dsn: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    a, b = tenants
    assert a.schema != b.schema
    store_a, store_b = a.store(), b.store()
    try:
        await store_a.append("shared", msg("a-1"))
        await store_a.append("only-a", msg("a-only"))
        await store_b.append("shared", msg("b-1") + msg("b-2"))
        await store_b.append("only-b", msg("b-only"))
        assert await store_a.flush(10) and await store_b.flush(10)

        # List and read: each sees its own.
        assert {i.session_id for i in await store_a.list_sessions()} == {"shared", "only-a"}
        assert {i.session_id for i in await store_b.list_sessions()} == {"shared", "only-b"}
        assert await store_a.load("shared") == msg("a-1")
        assert await store_a.load("only-b") == []  # a miss in A's namespace, not B's data
        # Warm: A's Redis copy gone, the warm reads A's schema only.
        await store_a.hot.call(
            "drop", lambda c: c.redis.delete(*store_a.hot.keys.session("shared").data)
        )
        assert await store_a.load("shared") == msg("a-1")
        # Delete: A's clear leaves B whole, in both tiers.
        await store_a.clear("shared")
        assert await store_a.flush(10)
        assert await store_b.load("shared") == msg("b-1") + msg("b-2")
        assert (await store_b.cold.last_seq("shared"))[1] == 2
        # Purge: B's expired session is B's to purge.
        await _admin_sql(
            pg_dsn,
            f"UPDATE \"{b.schema}\".vel_session_rows SET expires_at = now() - interval '1 s' "
            "WHERE id = 'only-b'",
        )
        assert await store_a.purge_expired() == 0
        assert await store_b.purge_expired() == 1
        assert await store_b.load("shared") == msg("b-1") + msg("b-2")
    finally:
        await store_a.aclose()
        await store_b.aclose()

    # Through `vel sessions` and `vel warm` with A's credentials.
    code, out, err = await vel(a.env(), monkeypatch, capsys, "sessions", "list", "--json")
    assert code == 0, err
    assert '"only-a"' in out and '"only-b"' not in out and '"shared"' not in out
    code, out, err = await vel(a.env(), monkeypatch, capsys, "sessions", "show", "shared")
    assert code == 1 and "no messages" in err  # A deleted its own; B's is not A's
    code, out, err = await vel(a.env(), monkeypatch, capsys, "warm", "--all")
    assert code == 0 and "warmed 1 sessions" in out, out + err
    code, out, err = await vel(a.env(), monkeypatch, capsys, "sessions", "delete", "shared")
    assert code == 1  # not found in A's namespace
    code, out, err = await vel(a.env(), monkeypatch, capsys, "sessions", "purge")
    assert code == 0, err
    store_b = b.store()
    try:
        assert await store_b.load("shared") == msg("b-1") + msg("b-2")
    finally:
        await store_b.aclose()

    # Least privileges are enough for vel doctor.
    for tenant in (a, b):
        code, out, err = await vel(tenant.env(), monkeypatch, capsys, "doctor")
        assert code == 0, out + err
        assert "ok    redis permissions" in out and "ok    postgres permissions" in out, out
        assert f"Redis keys {tenant.prefix}:{{*" in out


async def test_a_tenant_pointed_at_the_other_is_refused_as_a_permission(
    tenants: tuple[Tenant, Tenant],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    a, b = tenants
    store_b = b.store()
    try:
        await store_b.append("secret", msg("b's"))
        assert await store_b.flush(10)
    finally:
        await store_b.aclose()

    # A's credentials on B's namespace: A's Redis user on B's prefix (both tiers), A's role
    # on B's schema (Postgres alone, by namespace or by explicit schema).
    stores: list[Any] = [
        a.store(prefix=b.prefix),
        PostgresStore(a.dsn, namespace=b.prefix, settings=Settings()),
        PostgresStore(a.dsn, schema=b.schema, settings=Settings()),
    ]
    for store in stores:
        try:
            with pytest.raises(AccessDeniedError) as info:
                await store.load("secret")
            assert "permission" in str(info.value)
            if isinstance(store, PostgresStore):
                assert "insufficient_privilege" in str(info.value)
            for attempt in (store.list_sessions, store.purge_expired):
                with pytest.raises(AccessDeniedError):
                    await attempt()
            with pytest.raises(AccessDeniedError):
                await store.clear("secret")
        finally:
            await store.aclose()
    # Through open_store, as an Agent builds it from the environment.
    store = open_store("redis", load_settings(a.env(VEL_KEY_PREFIX=b.prefix)))
    try:
        with pytest.raises(AccessDeniedError):
            await store.load("secret")
    finally:
        await store.aclose()

    for argv in (
        ("sessions", "list"),
        ("sessions", "show", "secret"),
        ("sessions", "delete", "secret"),
        ("sessions", "purge"),
        ("warm", "--ids", "secret"),
    ):
        code, out, err = await vel(a.env(VEL_KEY_PREFIX=b.prefix), monkeypatch, capsys, *argv)
        assert code == 1, (argv, out, err)
        assert "permission" in err, (argv, err)
    code, out, err = await vel(a.env(VEL_KEY_PREFIX=b.prefix), monkeypatch, capsys, "doctor")
    assert code == 1
    assert "FAIL  redis permissions" in out and "FAIL  postgres permissions" in out, out

    store_b = b.store()
    try:
        assert await store_b.load("secret") == msg("b's")
    finally:
        await store_b.aclose()
