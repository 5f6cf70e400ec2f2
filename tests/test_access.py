"""Access control: Redis ``requirepass``, an ACL user confined to its key prefix, ``rediss://``
TLS with certificates made here by ``openssl``, Postgres password (SCRAM) auth. Secrets never
appear in logs, reprs or errors (causes included), and two applications sharing one Redis
under different key prefixes never see each other's sessions.
"""

from __future__ import annotations

import logging
import subprocess
import traceback
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from servers import PostgresServer, RedisServer, free_port

from vel import Agent
from vel.errors import (
    AccessDeniedError,
    ConfigurationError,
    StoreUnavailableError,
    VelError,
)
from vel.stores.postgres import PostgresStore
from vel.stores.redis import RedisStore
from vel.stores.tiered import TieredStore

SECRET = "s3cret-" + uuid.uuid4().hex[:8]


def everything_said(exc: BaseException) -> str:
    """str, repr and the formatted traceback of ``exc`` and of every cause/context."""
    parts = []
    seen: BaseException | None = exc
    while seen is not None:
        parts += [str(seen), repr(seen)]
        seen = seen.__cause__ or seen.__context__
    parts.append("".join(traceback.format_exception(exc)))
    return "\n".join(parts)


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)
    return caplog


def assert_no_secret(*texts: object) -> None:
    for text in texts:
        assert SECRET not in str(text), f"the secret leaked: {str(text)[:300]}"


async def roundtrip(store: Any, sid: str) -> list[Any]:
    await store.append(sid, [{"role": "user", "content": "hi"}])
    return list(await store.load(sid))


# -- Redis requirepass -------------------------------------------------------------------


async def test_redis_password(logs: pytest.LogCaptureFixture) -> None:
    with RedisServer("--requirepass", SECRET) as server:
        good = RedisStore(f"redis://:{SECRET}@127.0.0.1:{server.port}/0", key_prefix="app")
        wrong = RedisStore(f"redis://:wrong-{SECRET}@127.0.0.1:{server.port}/0")
        missing = RedisStore(server.url)
        try:
            assert await roundtrip(good, "s") == [{"role": "user", "content": "hi"}]
            for store in (wrong, missing):
                with pytest.raises(ConfigurationError) as info:
                    await roundtrip(store, "s")
                assert_no_secret(everything_said(info.value))
                assert "password" in str(info.value) or "credentials" in str(info.value)
            assert_no_secret(repr(good), repr(wrong), logs.text)
        finally:
            for store in (good, wrong, missing):
                await store.aclose()


# -- an ACL user confined to its prefix --------------------------------------------------


@pytest.fixture
def acl_redis() -> Any:
    # The default user is off; "app" may touch only keys under "app:" (any command, which
    # includes EVALSHA of vel's scripts: Redis checks the keys each script declares).
    with RedisServer(
        "--user", "default", "off",
        "--user", "app", "on", f">{SECRET}", "~app:*", "+@all",
    ) as server:  # fmt: skip
        yield server


async def test_acl_user_runs_the_tiered_store_within_its_prefix(
    acl_redis: RedisServer,
    pg_dsn: str,
    migrated_schema: str,
    logs: pytest.LogCaptureFixture,
) -> None:
    url = f"redis://app:{SECRET}@127.0.0.1:{acl_redis.port}/0"
    store = TieredStore(
        RedisStore(url, key_prefix="app", write_behind=True, flush_delay=0),
        PostgresStore(pg_dsn, schema=migrated_schema),
        flusher=False,
    )
    outside = RedisStore(url, key_prefix="other")
    try:
        sid = "acl-1"
        assert await roundtrip(store, sid) == [{"role": "user", "content": "hi"}]
        async with store.turn_lock(sid, 1.0):
            pass
        assert await store.flush(10)
        await store.hot.call("del", lambda c: c.redis.delete(*store.hot.keys.session(sid).data))
        assert len(await store.load(sid)) == 1  # warmed back from Postgres
        await store.replace(sid, [{"role": "user", "content": "new"}])
        assert await store.flush(10)
        assert (await store.hot.backlog())[0] == 0
        await store.clear(sid)
        assert await store.load(sid) == []
        # The same credentials under another prefix are refused, with a typed error.
        with pytest.raises(AccessDeniedError) as info:
            await roundtrip(outside, "s")
        assert "NOPERM" in str(info.value) or "permission" in str(info.value).lower()
        assert_no_secret(everything_said(info.value), repr(store), repr(outside), logs.text)
    finally:
        await store.aclose()
        await outside.aclose()


async def test_an_acl_user_without_multi_reads_windows_through_the_scripts() -> None:
    """An ACL line from before window reads went beside the scripts (MULTI/EXEC): turns and
    loads still work, each a script call alone once MULTI was refused."""
    with RedisServer(
        "--user", "default", "off",
        "--user", "app", "on", f">{SECRET}", "~app:*", "+@all", "-multi", "-exec",
    ) as server:  # fmt: skip
        store = RedisStore(f"redis://app:{SECRET}@127.0.0.1:{server.port}/0", key_prefix="app")
        try:
            await store.append("s", [{"role": "user", "content": f"m{i}"} for i in range(5)])
            for i in range(3):
                async with store.turn("s", limit=2) as turn:
                    assert len(turn.window) == 2
                    await turn.commit([{"role": "assistant", "content": f"a{i}"}])
            assert [m["content"] for m in await store.load("s", 3)] == ["a0", "a1", "a2"]
        finally:
            await store.aclose()


async def test_wrong_acl_password_is_a_configuration_error(acl_redis: RedisServer) -> None:
    store = RedisStore(f"redis://app:not-{SECRET}@127.0.0.1:{acl_redis.port}/0", key_prefix="app")
    try:
        with pytest.raises(ConfigurationError) as info:
            await roundtrip(store, "s")
        assert_no_secret(everything_said(info.value))
    finally:
        await store.aclose()


# -- TLS ------------------------------------------------------------------------------------


def make_certificates(where: Path) -> dict[str, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it (openssl, 1 day)."""

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=where)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=vel test CA",
        "-keyout", "ca.key", "-out", "ca.crt")  # fmt: skip
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
        "-keyout", "server.key", "-out", "server.csr")  # fmt: skip
    (where / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "1", "-extfile", "san.ext", "-out", "server.crt")  # fmt: skip
    return {name: where / f"{name}" for name in ("ca.crt", "server.crt", "server.key")}


@pytest.fixture
def tls_redis(tmp_path: Path) -> AsyncIterator[tuple[RedisServer, dict[str, Path]]]:
    certs = make_certificates(tmp_path)
    port = free_port()
    server = RedisServer(
        "--port", "0", "--tls-port", str(port),
        "--tls-cert-file", str(certs["server.crt"]), "--tls-key-file", str(certs["server.key"]),
        "--tls-ca-cert-file", str(certs["ca.crt"]), "--tls-auth-clients", "no",
        "--requirepass", SECRET,
        port=port,
    )  # fmt: skip
    with server:
        yield server, certs


async def test_rediss_with_a_generated_ca(
    tls_redis: tuple[RedisServer, dict[str, Path]], logs: pytest.LogCaptureFixture
) -> None:
    server, certs = tls_redis
    base = f"rediss://:{SECRET}@127.0.0.1:{server.port}/0"
    good = RedisStore(f"{base}?ssl_ca_certs={certs['ca.crt']}", key_prefix="tls")
    untrusted = RedisStore(base, op_timeout=2.0)  # the system CAs do not know ours
    plaintext = RedisStore(f"redis://:{SECRET}@127.0.0.1:{server.port}/0", op_timeout=1.0)
    try:
        assert await roundtrip(good, "s") == [{"role": "user", "content": "hi"}]
        config = await good.call("config", lambda c: c.redis.config_get("port"))
        assert config == {"port": "0"}, "the test must only ever reach Redis over TLS"
        # An untrusted certificate is configuration (retrying cannot help); plain text
        # against a TLS port looks like a dropped connection.
        for store, kind in ((untrusted, ConfigurationError), (plaintext, StoreUnavailableError)):
            with pytest.raises(kind) as failed:
                await roundtrip(store, "s")
            assert_no_secret(everything_said(failed.value))
            if store is untrusted:
                assert "certificate" in str(failed.value)
                assert "ssl_ca_certs" in str(failed.value)
        assert_no_secret(repr(good), logs.text)
    finally:
        for store in (good, untrusted, plaintext):
            await store.aclose()


async def test_rediss_cluster_with_a_private_ca(
    tmp_path: Path, pg_dsn: str, migrated_schema: str, logs: pytest.LogCaptureFixture
) -> None:
    """A cluster behind a private CA takes its CA in the URL (``?ssl_ca_certs=``), like a
    single server; without it the certificate is refused as configuration, naming the fix."""
    from cluster import RedisClusterServers

    certs = make_certificates(tmp_path)
    with RedisClusterServers(masters=3, replicas=0, tls=certs) as cluster:
        assert cluster.url.startswith("rediss+cluster://")
        store = TieredStore(
            RedisStore(cluster.url, key_prefix="tlsc", write_behind=True, flush_delay=0),
            PostgresStore(pg_dsn, schema=migrated_schema),
            flusher=False,
        )
        no_ca = RedisStore(cluster.url.partition("?")[0], key_prefix="tlsc", op_timeout=2.0)
        try:
            assert store.hot.is_cluster
            for sid in ("c-1", "c-2", "{0}"):
                assert await roundtrip(store, sid) == [{"role": "user", "content": "hi"}]
            assert await store.flush(10)
            keys = store.hot.keys.session("c-1").data
            await store.hot.call("drop", lambda c: c.redis.delete(*keys))
            assert len(await store.load("c-1")) == 1  # warmed back over TLS
            with pytest.raises(ConfigurationError) as refused:
                await no_ca.load("c-1")
            assert "certificate" in str(refused.value)
            assert "ssl_ca_certs" in str(refused.value)
        finally:
            await store.aclose()
            await no_ca.aclose()
    assert "Traceback" not in logs.text


# -- Postgres password auth -------------------------------------------------------------------


@pytest.fixture
async def pg_password() -> AsyncIterator[PostgresServer]:
    with PostgresServer(password=SECRET) as pg:
        yield pg


async def test_postgres_password_auth(
    pg_password: PostgresServer, logs: pytest.LogCaptureFixture
) -> None:
    from vel.stores.postgres.migrate import migrate

    await migrate(pg_password.dsn, schema="app")
    good = PostgresStore(pg_password.dsn, schema="app")
    wrong_dsn = pg_password.dsn.replace(SECRET, "wrong-" + SECRET)
    wrong = PostgresStore(wrong_dsn, schema="app")
    missing = PostgresStore(pg_password.dsn.replace(f":{SECRET}", ""), schema="app")
    try:
        assert await roundtrip(good, "s") == [{"role": "user", "content": "hi"}]
        for store in (wrong, missing):
            with pytest.raises(ConfigurationError) as info:
                await roundtrip(store, "s")
            assert_no_secret(everything_said(info.value), repr(store))
        assert_no_secret(repr(good), logs.text)
    finally:
        for store in (good, wrong, missing):
            await store.aclose()


async def test_agent_with_secrets_in_both_urls_never_shows_them(
    pg_password: PostgresServer,
    srv: Any,
    monkeypatch: pytest.MonkeyPatch,
    logs: pytest.LogCaptureFixture,
) -> None:
    from conftest import model_for

    from vel.stores.postgres.migrate import migrate

    await migrate(pg_password.dsn, schema="agent")
    with RedisServer("--requirepass", SECRET) as redis_server:
        monkeypatch.setenv("POSTGRES_DSN", pg_password.dsn + "?search_path=agent")
        monkeypatch.setenv("REDIS_URL", f"redis://:{SECRET}@127.0.0.1:{redis_server.port}/0")
        async with Agent(id="a", model=model_for(srv), session_storage="redis") as agent:
            await agent.run({"message": "hello"}, session_id="s1")
            said = [repr(agent), repr(agent.store), str(await agent.store.stats())]
        redis_server.kill()
        # Redis gone: the error names the server, never the password.
        monkeypatch.setenv("VEL_OP_TIMEOUT", "1")
        async with Agent(id="b", model=model_for(srv), session_storage="redis") as agent:
            with pytest.raises(VelError) as info:
                await agent.run({"message": "again"}, session_id="s1")
        said.append(everything_said(info.value))
    assert_no_secret(*said, logs.text)


# -- two applications, one Redis --------------------------------------------------------------


async def test_two_prefixes_on_one_redis_stay_apart(
    redis_url: str, pg_dsn: str, migrated_schema: str
) -> None:
    from vel.stores.postgres.migrate import migrate

    other_schema = migrated_schema + "_b"
    await migrate(pg_dsn, schema=other_schema)
    tag = uuid.uuid4().hex[:6]
    apps = {
        name: TieredStore(
            RedisStore(redis_url, key_prefix=f"{name}-{tag}", write_behind=True, flush_delay=0),
            PostgresStore(pg_dsn, schema=schema),
            flusher=False,
        )
        for name, schema in (("a", migrated_schema), ("b", other_schema))
    }
    a, b = apps["a"], apps["b"]
    try:
        for sid in ("shared", "x", "{0}"):
            await a.append(sid, [{"role": "user", "content": f"a-{sid}"}])
            await b.append(sid, [{"role": "user", "content": f"b-{sid}"}] * 2)
        # a's flusher sees only a's backlog; b's stays dirty until b flushes.
        assert await a.flush(10)
        assert (await a.hot.backlog())[0] == 0
        assert (await b.hot.backlog())[0] == 6
        await a.clear("shared")
        assert await a.load("shared") == []
        assert await b.load("shared") == [{"role": "user", "content": "b-shared"}] * 2
        assert await b.flush(10)
        for sid in ("x", "{0}"):
            assert await a.load(sid) == [{"role": "user", "content": f"a-{sid}"}]
            assert len(await b.load(sid)) == 2
    finally:
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(redis_url)
        for store in apps.values():
            await store.aclose()
            keys = [k async for k in client.scan_iter(match=f"{store.hot.keys.prefix}:*")]
            if keys:
                await client.delete(*keys)
        await client.aclose()
        conn_store = PostgresStore(pg_dsn, schema=other_schema)
        await conn_store.aclose()
        import asyncpg

        conn = await asyncpg.connect(pg_dsn)
        await conn.execute(f'DROP SCHEMA "{other_schema}" CASCADE')
        await conn.close()
