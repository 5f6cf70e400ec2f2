"""Hostile input through the Agent and every store kind: odd session ids, messages that cannot
be stored, malformed URLs and DSNs. Each gets a clear typed error, nothing already stored
changes, and no two session ids ever share a Redis key or a Postgres row.

(The store contract already rejects bad ids and messages store by store; here they come in
through the public Agent API, and the stored bytes are checked tier by tier.)
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from checker import postgres_rows, redis_rows
from conftest import model_for, schema_dsn
from hypothesis import given, settings
from hypothesis import strategies as st
from stores import make_store

from vel import Agent
from vel.errors import ConfigurationError, InvalidInputError, VelError
from vel.stores.redis.keys import KeyLayout
from vel.testing import FakeOpenAIServer

ODD_IDS = [
    "ünïcødé ✓ 会话",
    "{",
    "}",
    "{0}",
    "a:b",
    "*",
    "a*",
    "line\nbreak",
    "tab\there",
    "{0}:h:x",
    "x",
    "x" * 512,
]
BAD_IDS: list[Any] = ["", "x" * 10_240, "nul\x00id", "\x00", 7, None, b"bytes"]
BAD_ID_NAMES = ["empty", "10KB", "NUL-inside", "NUL-only", "int", "None", "bytes"]


def deep(levels: int) -> dict[str, Any]:
    root: dict[str, Any] = {}
    node = root
    for _ in range(levels):
        node["n"] = {}
        node = node["n"]
    return root


# What no store can keep.
UNSTORABLE_MESSAGES: list[Any] = [
    {"role": "user", "content": {1, 2}},
    {"role": "user", "content": float("nan")},
    {"role": "user", "content": "x" * (10 * 1024 * 1024)},
    {"role": "user", "content": "x", "extra": deep(50_000)},
    {"role": "user", "content": "nul \x00 inside"},
    {"role": "user", "content": "lone \ud800 surrogate"},
    ["not", "an", "object"],
]
# Storable, but not chat messages: the Agent refuses them (stores keep any JSON object, such
# as the Agents SDK's role-less items).
NOT_CHAT_MESSAGES: list[Any] = [
    {"role": "wizard", "content": "x"},
    {"role": None, "content": "x"},
    {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
]
BAD_MESSAGES = UNSTORABLE_MESSAGES + NOT_CHAT_MESSAGES


async def agent_snapshot(agent: Agent, sids: list[str]) -> dict[str, list[Any]]:
    return {s: await agent.ctxmgr.aget_session_context(s) for s in sids}


@pytest.mark.parametrize(
    "bad_id",
    [b for b in BAD_IDS if b is not None],  # None is a one-off call, not a session
    ids=[n for n, b in zip(BAD_ID_NAMES, BAD_IDS, strict=True) if b is not None],
)
async def test_agent_rejects_bad_session_ids_before_calling_the_model(
    srv: FakeOpenAIServer, storage_mode: str, bad_id: Any
) -> None:
    async with Agent(id="h", model=model_for(srv), session_storage=storage_mode) as agent:
        keep = f"keep-{uuid.uuid4().hex[:6]}"
        await agent.run({"message": "hello"}, session_id=keep)
        before = await agent_snapshot(agent, [keep])
        calls = len(srv.requests)
        with pytest.raises(InvalidInputError) as info:
            await agent.run({"message": "hi"}, session_id=bad_id)
        assert "session_id" in str(info.value)
        for op in (agent.ctxmgr.aget_session_context, agent.ctxmgr.aclear_session):
            with pytest.raises(InvalidInputError):
                await op(bad_id)
        with pytest.raises(InvalidInputError):
            await agent.ctxmgr.aset_session_context(bad_id, [{"role": "user", "content": "x"}])
        assert len(srv.requests) == calls, "the model was called for a rejected id"
        assert await agent_snapshot(agent, [keep]) == before


BAD_INPUTS: list[Any] = [
    {"message": "x" * (10 * 1024 * 1024)},
    {"message": "nul \x00 inside"},
    {"message": "lone \ud800 surrogate"},
    {"message": [{"type": "text", "text": {1, 2}}]},
    {"message": [{"type": "text", "text": float("nan")}]},
    {"messages": [{"role": "wizard", "content": "x"}]},
    {"messages": [{"role": "user", "content": {1, 2}}]},
    {"messages": [{"role": "user", "content": "x", "extra": deep(50_000)}]},
    {"messages": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}]},
]
BAD_INPUT_NAMES = [
    "10MB",
    "NUL",
    "surrogate",
    "set-part",
    "nan-part",
    "unknown-role",
    "set-content",
    "nested-50k",
    "role-less-item",
]


@pytest.mark.parametrize("bad", BAD_INPUTS, ids=BAD_INPUT_NAMES)
async def test_agent_rejects_unstorable_input_before_calling_the_model(
    srv: FakeOpenAIServer, storage_mode: str, bad: Any
) -> None:
    async with Agent(id="h", model=model_for(srv), session_storage=storage_mode) as agent:
        sid = f"s-{uuid.uuid4().hex[:6]}"
        await agent.run({"message": "first"}, session_id=sid)
        before = await agent_snapshot(agent, [sid])
        assert len(before[sid]) == 2
        calls = len(srv.requests)
        with pytest.raises(InvalidInputError):
            await agent.run(bad, session_id=sid)
        assert len(srv.requests) == calls, "the model was called with unstorable input"
        assert await agent_snapshot(agent, [sid]) == before
        # The session still works afterwards.
        await agent.run({"message": "second"}, session_id=sid)
        assert len(await agent.ctxmgr.aget_session_context(sid)) == 4


async def test_agent_refuses_unstorable_histories(srv: FakeOpenAIServer, storage_mode: str) -> None:
    async with Agent(id="h", model=model_for(srv), session_storage=storage_mode) as agent:
        sid = f"s-{uuid.uuid4().hex[:6]}"
        await agent.run({"message": "first"}, session_id=sid)
        before = await agent_snapshot(agent, [sid])
        for bad in BAD_MESSAGES:
            with pytest.raises(InvalidInputError):
                await agent.ctxmgr.aset_session_context(
                    sid, [{"role": "user", "content": "ok"}, bad]
                )
        assert await agent_snapshot(agent, [sid]) == before


async def test_agent_keeps_odd_session_ids_apart_in_every_tier(
    srv: FakeOpenAIServer, storage_mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    tag = uuid.uuid4().hex[:4]
    ids = [f"{tag}{s}" if i % 2 else s + tag for i, s in enumerate(ODD_IDS[:-1])]
    ids += [tag, tag + " ", " " + tag, "X" + tag, tag + "x" * 508]
    ids += [tag + "y" * 400 + "1", tag + "y" * 400 + "2"]  # differ only past 400 bytes
    assert len(set(ids)) == len(ids)
    async with Agent(id="h", model=model_for(srv), session_storage=storage_mode) as agent:
        for i, sid in enumerate(ids):
            await agent.ctxmgr.aset_session_context(sid, [{"role": "user", "content": f"only-{i}"}])
        for i, sid in enumerate(ids):
            got = await agent.ctxmgr.aget_session_context(sid)
            assert got == [{"role": "user", "content": f"only-{i}"}], repr(sid)
        store: Any = agent.store
        if storage_mode == "redis":
            # Written behind: make Postgres catch up, then read both tiers raw.
            assert await store.flush(20)
            prefix = os.environ["VEL_KEY_PREFIX"]
            redis_url = os.environ["REDIS_URL"]
            for i, sid in enumerate(ids):
                rows = await redis_rows(redis_url, prefix, sid)
                assert [r.content for r in rows] == [f"only-{i}"], repr(sid)
        if storage_mode in ("database", "redis"):
            dsn = os.environ["POSTGRES_DSN"]
            base, _, query = dsn.partition("?search_path=")
            for i, sid in enumerate(ids):
                rows = await postgres_rows(base, query, sid)
                assert [r.content for r in rows] == [f"only-{i}"], repr(sid)


@settings(max_examples=300, deadline=None)
@given(ids=st.lists(st.text(min_size=1, max_size=40), min_size=2, max_size=6, unique=True))
def test_distinct_ids_never_share_a_key(ids: list[str]) -> None:
    layout = KeyLayout("app")
    seen: dict[str, str] = {}
    for sid in ids:
        keys = layout.session(sid)
        for key in (keys.meta, keys.messages, keys.replays, keys.warm_lock, keys.turn_lock):
            assert seen.setdefault(key, sid) == sid, (key, sid, seen[key])
        assert layout.session_id_of(keys.meta) == sid


# The kinds whose Redis is the shared one at ``redis_url`` (the raw comparison reads it).
RAW_KINDS = ["memory", "postgres", "redis", "tiered"]


@pytest.mark.parametrize("kind", RAW_KINDS)
async def test_rejected_input_leaves_raw_storage_untouched(
    kind: str, pg_dsn: str, migrated_schema: str, redis_url: str, key_prefix: str
) -> None:
    """Every bad id and message against every store kind, then the stored bytes compared."""
    async with make_store(
        kind, pg_dsn=pg_dsn, schema=migrated_schema, redis_url=redis_url, prefix=key_prefix
    ) as store:
        sid = f"k-{uuid.uuid4().hex[:6]}"
        good = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
        await store.append(sid, good)

        async def raw() -> Any:
            import redis.asyncio as aioredis

            client = aioredis.Redis.from_url(redis_url)
            try:
                # Not the process's counters (reported to Redis once a second, whenever a
                # call finds a report due) nor the flushers' last sweep time: they are not
                # session storage.
                keys = sorted(
                    [
                        k
                        async for k in client.scan_iter(match=f"{key_prefix}:*")
                        if b":{totals}:" not in k and b":{sweeps}:" not in k
                    ]
                )
                values = [await client.dump(k) for k in keys if b":h:" not in k]
            finally:
                await client.aclose()
            rows = await postgres_rows(pg_dsn, migrated_schema, sid) if kind != "redis" else []
            return keys, values, [(r.seq, r.message_id, r.message) for r in rows]

        if kind == "tiered":
            assert await store.flush(10)  # type: ignore[attr-defined]
        before = await raw()
        for bad_id in BAD_IDS:
            for call in (
                lambda b=bad_id: store.append(b, good),
                lambda b=bad_id: store.load(b),
                lambda b=bad_id: store.replace(b, good),
                lambda b=bad_id: store.clear(b),
            ):
                with pytest.raises(InvalidInputError):
                    await call()
        for bad in UNSTORABLE_MESSAGES:
            with pytest.raises(InvalidInputError):
                await store.append(sid, [good[0], bad])
            with pytest.raises(InvalidInputError):
                await store.replace(sid, [bad])
        for bad_ids in (["same", "same"], ["ok"], ["has space", "x"], ["x" * 65, "y"]):
            with pytest.raises(InvalidInputError):
                await store.append(sid, good, message_ids=bad_ids)
        assert await store.load(sid) == good
        assert await raw() == before


@pytest.mark.parametrize(
    "url",
    [
        "localhost:6379",
        "http://127.0.0.1:6379",
        "redis://127.0.0.1:notaport/0",
        "redis://user:s3cret-pw@127.0.0.1:99999/0",
        "redis://user:s3cret-pw@127.0.0.1:6379/notadb",
        "redis://127.0.0.1:6379/0?db=1",
        "redis://127.0.0.1:6379/0?socket_timeout=100",
        "redis://127.0.0.1:6379/0?ssl_ca_certs=/ca.pem",
        "redis://127.0.0.1:6379,127.0.0.1:6380/0",
        "redis://127.0.0.1:6379/0#frag",
        "rediss://127.0.0.1:6379/0?ssl_cert_reqs=maybe",
        "redis://127.0.0.1:6379/99999999",
    ],
    ids=[
        "no-scheme",
        "http",
        "port-text",
        "port-range",
        "db-text",
        "db-twice",
        "unknown-option",
        "tls-option-without-tls",
        "hosts-without-cluster",
        "fragment",
        "bad-cert-reqs",
        "db-range",
    ],
)
async def test_malformed_redis_url_is_a_configuration_error(
    srv: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    monkeypatch.delenv("POSTGRES_DSN", raising=False)
    monkeypatch.setenv("REDIS_URL", url)
    monkeypatch.setenv("VEL_KEY_PREFIX", f"veltest-{uuid.uuid4().hex[:10]}")
    with pytest.raises(ConfigurationError) as info:
        async with Agent(id="h", model=model_for(srv), session_storage="redis") as agent:
            await agent.run({"message": "hi"}, session_id="s")
    assert "s3cret-pw" not in str(info.value) and "s3cret-pw" not in repr(info.value)


@pytest.mark.parametrize(
    "dsn",
    [
        "127.0.0.1:5432/test",
        "mysql://127.0.0.1/test",
        "postgresql://postgres:s3cret-pw@127.0.0.1:notaport/test",
        "postgresql://postgres:s3cret-pw@127.0.0.1:99999/test",
        "postgresql://postgres@[::1/test",
    ],
    ids=["no-scheme", "mysql", "port-text", "port-range", "bad-host"],
)
async def test_malformed_postgres_dsn_is_a_configuration_error(
    srv: FakeOpenAIServer,
    monkeypatch: pytest.MonkeyPatch,
    dsn: str,
    redis_url: str,
    key_prefix: str,
) -> None:
    monkeypatch.setenv("POSTGRES_DSN", dsn)
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("VEL_KEY_PREFIX", key_prefix)
    for mode in ("database", "redis"):
        with pytest.raises(VelError) as info:
            async with Agent(id="h", model=model_for(srv), session_storage=mode) as agent:
                await agent.run({"message": "hi"}, session_id="s")
        assert isinstance(info.value, ConfigurationError), (mode, repr(info.value))
        text = str(info.value) + repr(info.value)
        assert "s3cret-pw" not in text, text


def test_schema_dsn_helper_is_what_the_agent_reads(pg_dsn: str) -> None:
    # The odd-ids test splits POSTGRES_DSN back into (dsn, schema); keep the two in step.
    assert schema_dsn(pg_dsn, "s1").partition("?search_path=") == (pg_dsn, "?search_path=", "s1")
