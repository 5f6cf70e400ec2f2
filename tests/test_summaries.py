"""ContextManager(summarize=True): recall beyond the window through a summary kept beside
the originals, brought up to date in the background (see vel.summaries)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest
from conftest import model_for

from vel import Agent, ConfigurationError, ContextManager
from vel.summaries.prompt import HEADER, INSTRUCTIONS
from vel.testing import FakeOpenAIServer

SID = "summary-session"


@pytest.fixture
async def make_agent(srv: FakeOpenAIServer) -> AsyncIterator[Any]:
    """Agents on 'memory' (the default) or a store given; all are closed afterwards."""
    agents: list[Agent] = []

    def build(storage: Any = "memory", **ctx: Any) -> Agent:
        agent = Agent(
            id="summ",
            model=model_for(srv),
            session_storage=storage,
            context_manager=ContextManager(**ctx),
        )
        agents.append(agent)
        return agent

    yield build
    for agent in agents:
        await agent.aclose()


async def converse(agent: Agent, turns: int) -> None:
    """Turn 1 names the user, then ``turns`` unrelated turns; summaries settle meanwhile."""
    await agent.run({"message": "My name is Alice"}, session_id=SID)
    for i in range(turns):
        await agent.run({"message": f"unrelated topic number {i}"}, session_id=SID)
        summaries = agent.ctxmgr.summaries
        if summaries is not None:
            assert await summaries.idle(10)


def summary_requests(srv: FakeOpenAIServer) -> list[dict[str, Any]]:
    return [r for r in srv.requests if r["messages"][0].get("content") == INSTRUCTIONS]


async def test_recall_beyond_the_window_through_a_summary(
    srv: FakeOpenAIServer, make_agent: Any, storage_mode: str
) -> None:
    agent = make_agent(storage_mode, max_history=4, summarize=True)
    await converse(agent, 20)
    assert await agent.run({"message": "What is my name?"}, session_id=SID) == (
        "Your name is Alice."
    )
    last = srv.requests[-1]["messages"]
    assert last[0]["role"] == "system" and last[0]["content"].startswith(HEADER)
    assert len(last) == 1 + 4 + 1  # the summary, the window, the question


async def test_without_summarize_the_window_forgets(
    srv: FakeOpenAIServer, make_agent: Any, storage_mode: str
) -> None:
    agent = make_agent(storage_mode, max_history=4)
    await converse(agent, 20)
    answer = await agent.run({"message": "What is my name?"}, session_id=SID)
    assert answer == "I don't know your name."
    assert summary_requests(srv) == []


async def test_originals_are_kept_whole(make_agent: Any, storage_mode: str) -> None:
    agent = make_agent(storage_mode, max_history=4, summarize=True)
    await converse(agent, 20)
    stored = await agent.ctxmgr.aget_session_context(SID)
    assert len(stored) == 42
    assert stored[0] == {"role": "user", "content": "My name is Alice"}
    assert stored[1] == {"role": "assistant", "content": "You said: My name is Alice"}
    assert all(m["role"] in ("user", "assistant") for m in stored)
    summary = await agent.ctxmgr.aget_summary(SID)
    assert summary is not None and "Alice" in summary.text
    assert 0 < summary.covered_seq <= 42 - 4


async def test_at_most_one_call_per_k_new_messages(srv: FakeOpenAIServer, make_agent: Any) -> None:
    agent = make_agent(max_history=4, summarize=True, summarize_every=6)
    await converse(agent, 20)  # 42 messages, 38 older than the window
    calls = summary_requests(srv)
    assert 1 <= len(calls) <= 38 // 6
    summary = await agent.ctxmgr.aget_summary(SID)
    assert summary is not None and 42 - 4 - summary.covered_seq < 6
    # Incremental: each call gets the previous summary and only the newly uncovered ones.
    for request in calls[1:]:
        body = request["messages"][1]["content"]
        assert "The user's name is Alice." in body
        assert body.count("\nuser: ") + body.count("New messages:\nuser: ") <= 6 + 2


async def test_tool_pairs_are_never_split(srv: FakeOpenAIServer, make_agent: Any) -> None:
    def lookup() -> str:
        return "looked up"

    agent = Agent(
        id="tools",
        model=model_for(srv),
        tools=[lookup],
        context_manager=ContextManager(max_history=3, summarize=True, summarize_every=2),
    )
    try:
        for i in range(8):
            await agent.run({"message": f"[[call lookup {{}}]] round {i}"}, session_id=SID)
            assert agent.ctxmgr.summaries is not None
            assert await agent.ctxmgr.summaries.idle(10)
            summary = await agent.ctxmgr.aget_summary(SID)
            stored = await agent.ctxmgr.aget_session_context(SID)
            if summary is not None:
                # Never ends on a tool call whose results would be left to the window.
                assert stored[summary.covered_seq - 1].get("tool_calls") is None
                if summary.covered_seq < len(stored):
                    assert stored[summary.covered_seq]["role"] != "tool"
        assert await agent.ctxmgr.aget_summary(SID) is not None
    finally:
        await agent.aclose()


async def test_clear_and_set_drop_the_summary(make_agent: Any, storage_mode: str) -> None:
    agent = make_agent(storage_mode, max_history=4, summarize=True)
    await converse(agent, 10)
    assert await agent.ctxmgr.aget_summary(SID) is not None
    await agent.ctxmgr.aclear_session(SID)
    assert await agent.ctxmgr.aget_summary(SID) is None
    await converse(agent, 10)
    assert await agent.ctxmgr.aget_summary(SID) is not None
    await agent.ctxmgr.aset_session_context(SID, [{"role": "user", "content": "hi"}])
    assert await agent.ctxmgr.aget_summary(SID) is None
    answer = await agent.run({"message": "What is my name?"}, session_id=SID)
    assert answer == "I don't know your name."


async def test_a_clear_by_the_store_itself_retires_the_summary(
    make_agent: Any, storage_mode: str
) -> None:
    agent = make_agent(storage_mode, max_history=4, summarize=True)
    await converse(agent, 10)
    await agent.store.clear(SID)  # not through the context manager
    assert await agent.ctxmgr.aget_summary(SID) is None


async def test_summarizer_failures_do_not_fail_turns(
    srv: FakeOpenAIServer, make_agent: Any, caplog: pytest.LogCaptureFixture
) -> None:
    failures = 0

    async def broken(previous: str | None, messages: list[dict[str, Any]]) -> str:
        nonlocal failures
        failures += 1
        raise RuntimeError("summariser down")

    agent = make_agent(max_history=4, summarize=True, summarizer=broken)
    assert agent.ctxmgr.summaries is not None
    object.__setattr__(agent.ctxmgr.summaries, "policy", _fast(agent.ctxmgr.summaries.policy))
    with caplog.at_level(logging.WARNING, logger="vel.summaries"):
        await converse(agent, 12)
    assert failures >= 1
    figures = agent.ctxmgr.summaries.figures()
    assert figures["summary_failures"] == failures
    assert figures["summary_lag_messages"] > 0
    assert "summariser down" in caplog.text and SID in caplog.text


async def test_http_500_from_the_model_is_retried_then_counted(
    srv: FakeOpenAIServer, make_agent: Any
) -> None:
    agent = make_agent(max_history=4, summarize=True)
    summaries = agent.ctxmgr.summaries
    assert summaries is not None
    object.__setattr__(summaries, "policy", _fast(summaries.policy))
    await converse(agent, 5)  # 12 messages: 8 older than the window, none summarised yet
    srv.fail_summaries(500, count=1000)  # the SDK retries too: every attempt fails
    await agent.run({"message": "one more"}, session_id=SID)  # lag 10: summarisation due
    assert await summaries.idle(30)
    assert summaries.figures()["summary_failures"] == summaries.policy.attempts
    assert summaries.figures()["summary_calls"] == summaries.policy.attempts
    assert await agent.ctxmgr.aget_summary(SID) is None
    srv.clear()
    await asyncio.sleep(0.1)  # the session's pause after a failed summarisation ends
    await agent.run({"message": "again"}, session_id=SID)
    assert await summaries.idle(30)
    assert await agent.run({"message": "What is my name?"}, session_id=SID) == (
        "Your name is Alice."
    )


def _fast(policy: Any) -> Any:
    from dataclasses import replace

    return replace(policy, backoff=0.01, max_backoff=0.05)


def test_summarize_needs_a_window() -> None:
    with pytest.raises(ConfigurationError, match="max_history"):
        ContextManager(summarize=True)


def test_summarize_every_must_be_positive() -> None:
    with pytest.raises(ConfigurationError):
        ContextManager(max_history=4, summarize=True, summarize_every=0)


async def test_turn_does_not_wait_for_the_summariser(
    srv: FakeOpenAIServer, make_agent: Any
) -> None:
    release = asyncio.Event()

    async def slow(previous: str | None, messages: list[dict[str, Any]]) -> str:
        await release.wait()
        return "The user's name is Alice."

    agent = make_agent(max_history=4, summarize=True, summarizer=slow)
    await agent.run({"message": "My name is Alice"}, session_id=SID)
    for i in range(10):  # the summariser blocks from the 7th turn on
        async with asyncio.timeout(5):
            await agent.run({"message": f"topic {i}"}, session_id=SID)
    release.set()
    assert agent.ctxmgr.summaries is not None
    assert await agent.ctxmgr.summaries.idle(10)
    assert await agent.run({"message": "What is my name?"}, session_id=SID) == (
        "Your name is Alice."
    )


@pytest.mark.parametrize("storage_mode", ["database", "redis"], indirect=True)
async def test_summariser_failures_show_in_vel_stats(
    srv: FakeOpenAIServer, make_agent: Any, storage_mode: str
) -> None:
    agent = make_agent(storage_mode, max_history=4, summarize=True)
    summaries = agent.ctxmgr.summaries
    object.__setattr__(summaries, "policy", _fast(summaries.policy))
    await converse(agent, 5)
    srv.fail_summaries(500, count=1000)
    assert await agent.run({"message": "one more"}, session_id=SID) == "You said: one more"
    assert await summaries.idle(30)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "vel", "stats", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    attempts = summaries.policy.attempts
    assert figures["summary_failures"] == attempts and figures["summary_calls"] == attempts
    assert figures["summary_sessions_behind"] == 1
    assert figures["summary_max_lag"] == 14 - 4  # 7 turns stored, none summarised


@pytest.mark.parametrize("storage_mode", ["database"], indirect=True)
async def test_a_session_deleted_in_sql_takes_its_summary_along(
    make_agent: Any, storage_mode: str, pg_dsn: str, migrated_schema: str
) -> None:
    import asyncpg

    agent = make_agent(storage_mode, max_history=4, summarize=True)
    await converse(agent, 10)
    assert await agent.ctxmgr.aget_summary(SID) is not None
    conn = await asyncpg.connect(pg_dsn, server_settings={"search_path": migrated_schema})
    try:
        # The spec's cleanup statement, by id here.
        await conn.execute("DELETE FROM vel_sessions WHERE id = $1", SID)
        assert await agent.ctxmgr.aget_summary(SID) is None
        rows = await conn.fetchval("SELECT count(*) FROM vel_summaries WHERE session_id = $1", SID)
        assert rows == 0
    finally:
        await conn.close()
    answer = await agent.run({"message": "What is my name?"}, session_id=SID)
    assert answer == "I don't know your name."


@pytest.mark.parametrize("storage_mode", ["database"], indirect=True)
async def test_a_purged_session_row_takes_its_summary_along_unread(
    make_agent: Any, storage_mode: str, pg_dsn: str, migrated_schema: str
) -> None:
    import asyncpg

    agent = make_agent(storage_mode, max_history=4, summarize=True)
    await converse(agent, 10)
    assert await agent.ctxmgr.aget_summary(SID) is not None
    conn = await asyncpg.connect(pg_dsn, server_settings={"search_path": migrated_schema})
    try:
        # What the purge of an expired or deleted session does to its row.
        await conn.execute("DELETE FROM vel_session_rows WHERE id = $1", SID)
        rows = await conn.fetchval("SELECT count(*) FROM vel_summaries WHERE session_id = $1", SID)
        assert rows == 0
    finally:
        await conn.close()


async def test_redis_only_mode_summarises_too(
    srv: FakeOpenAIServer, make_agent: Any, redis_url: str, key_prefix: str
) -> None:
    from vel.stores.redis import RedisStore

    store = RedisStore(redis_url, key_prefix=key_prefix, write_behind=False)
    try:
        agent = make_agent(store, max_history=4, summarize=True)
        await converse(agent, 20)
        assert await agent.run({"message": "What is my name?"}, session_id=SID) == (
            "Your name is Alice."
        )
        await agent.ctxmgr.aset_session_context(SID, [{"role": "user", "content": "hi"}])
        assert await agent.ctxmgr.aget_summary(SID) is None
    finally:
        await store.aclose()


def entries_of(roles: str) -> list[Any]:
    """u: user, a: assistant text, c: assistant tool calls, t: tool result (seq from 1)."""
    from vel.summaries.base import Entry

    kinds = {
        "u": {"role": "user", "content": "q"},
        "a": {"role": "assistant", "content": "a"},
        "c": {"role": "assistant", "content": None, "tool_calls": [{"id": "x"}]},
        "t": {"role": "tool", "tool_call_id": "x", "content": "r"},
    }
    return [Entry(i, f"id{i}", dict(kinds[r])) for i, r in enumerate(roles, start=1)]


@pytest.mark.parametrize(
    ("roles", "window", "batch", "expected"),
    [
        ("uauauaua", 4, 200, 4),  # everything older than the window
        ("uauctttauaua", 5, 200, 7),  # the window would start on results: they go along
        ("uauctttaua", 4, 200, 7),  # a cut right after the calls takes their results
        ("uctttauaua", 5, 2, 5),  # the batch ends on the calls: their results go too
        ("uaua", 4, 200, 0),  # nothing older than the window
    ],
)
def test_a_cut_never_splits_tool_calls_from_their_results(
    roles: str, window: int, batch: int, expected: int
) -> None:
    from vel.summaries.policy import cut

    entries = entries_of(roles)
    upto = cut(entries, len(entries), window, 0, batch)
    assert upto == expected
    if upto:
        assert entries[upto - 1].message.get("tool_calls") is None
    if upto < len(entries):
        assert entries[upto].message["role"] != "tool"


@pytest.mark.parametrize("storage_mode", ["redis"], indirect=True)
async def test_a_windowed_warm_summarises_from_both_tiers(
    srv: FakeOpenAIServer, make_agent: Any, storage_mode: str
) -> None:
    agent = make_agent(storage_mode, max_history=4, summarize=True)
    history = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i}"}
        for i in range(100)  # more than a warm loads (64)
    ]
    history[0]["content"] = "My name is Alice"
    await agent.ctxmgr.aset_session_context(SID, history)
    assert await agent.store.flush()
    assert await agent.store.hot.drop_clean([SID]) == 1  # cold: the next turn warms a window
    await agent.run({"message": "hello again"}, session_id=SID)
    window = await agent.store.hot.read(SID, 4)
    assert window is not None and window.base > 0  # the copy holds the window, not it all
    assert await agent.ctxmgr.summaries.idle(30)
    summary = await agent.ctxmgr.aget_summary(SID)
    assert summary is not None and summary.covered_seq == 102 - 4
    assert "The user's name is Alice." in summary.text


async def test_a_forked_child_summarises_while_its_parent_still_is(srv: FakeOpenAIServer) -> None:
    """gunicorn --preload: the parent forks while its summariser works on a session; the
    child's own turns on that session must get their summary all the same."""
    import threading

    from test_fork import in_child

    parent = os.getpid()
    release = threading.Event()

    async def summarizer(previous: str | None, messages: list[dict[str, Any]]) -> str:
        if os.getpid() == parent:
            await asyncio.to_thread(release.wait, 30)
        return "The user's name is Alice."

    ctx = ContextManager(max_history=4, summarize=True, summarizer=summarizer)
    async with Agent(id="fork", model=model_for(srv), context_manager=ctx) as agent:
        await converse(agent, 0)
        for i in range(6):  # 14 messages: the parent's summariser starts, and waits
            await agent.run({"message": f"topic {i}"}, session_id=SID)
        assert ctx.summaries is not None and not await ctx.summaries.idle(0.2)

        def child() -> str | None:
            async def turn() -> str | None:
                async with agent:
                    await agent.run({"message": "in the child"}, session_id=SID)
                    assert ctx.summaries is not None and await ctx.summaries.idle(10)
                    summary = await ctx.aget_summary(SID)
                    return summary.text if summary is not None else None

            return asyncio.run(turn())

        assert in_child(child) == "The user's name is Alice."
        release.set()
        assert await ctx.summaries.idle(10)
