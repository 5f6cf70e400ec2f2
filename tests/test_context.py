"""Context managers: the window the model sees, and the session operations."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from conftest import model_for

from vel import (
    Agent,
    ConfigurationError,
    ContextManager,
    InvalidInputError,
    StatelessContextManager,
)
from vel.testing import FakeOpenAIServer


@pytest.fixture
async def make_agent(srv: FakeOpenAIServer, storage_mode: str) -> AsyncIterator[Any]:
    """Build agents on the storage mode under test; all are closed after the test."""
    agents: list[Agent] = []

    def build(**kwargs: Any) -> Agent:
        agent = Agent(id="ctx", model=model_for(srv), session_storage=storage_mode, **kwargs)
        agents.append(agent)
        return agent

    yield build
    for agent in agents:
        await agent.aclose()


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": text}


def call(call_id: str, name: str = "lookup") -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": "{}"}}


# Index:            0        1 (two calls)                                   2      3
HISTORY_WITH_TOOLS = [
    user("q1"),
    {"role": "assistant", "content": None, "tool_calls": [call("c1"), call("c2")]},
    {"role": "tool", "tool_call_id": "c1", "content": "r1"},
    {"role": "tool", "tool_call_id": "c2", "content": "r2"},
    assistant("a1"),  # 4
    user("q2"),  # 5
    assistant("a2"),  # 6
]


@pytest.mark.parametrize(
    ("max_history", "first_sent"),
    [
        pytest.param(4, 4, id="cut-on-second-tool-message"),
        pytest.param(5, 4, id="cut-on-first-tool-message"),
        pytest.param(6, 1, id="cut-on-tool-calls-parent"),
        pytest.param(7, 0, id="whole-history"),
        pytest.param(None, 0, id="unlimited"),
    ],
)
async def test_window_never_starts_on_an_orphaned_tool_message(
    srv: FakeOpenAIServer, make_agent: Any, max_history: int | None, first_sent: int
) -> None:
    agent = make_agent(context_manager=ContextManager(max_history=max_history))
    await agent.ctxmgr.aset_session_context("s", HISTORY_WITH_TOOLS)
    await agent.run({"message": "q3"}, session_id="s")
    sent = srv.requests[-1]["messages"]
    assert sent[:-1] == HISTORY_WITH_TOOLS[first_sent:]
    assert sent[-1] == user("q3")
    assert sent[0]["role"] != "tool"


async def test_window_sends_the_most_recent_messages(
    srv: FakeOpenAIServer, make_agent: Any
) -> None:
    history = [m for i in range(6) for m in (user(f"u{i}"), assistant(f"a{i}"))]
    agent = make_agent(context_manager=ContextManager(max_history=3))
    await agent.ctxmgr.aset_session_context("s", history)
    await agent.run({"message": "next"}, session_id="s")
    assert srv.requests[-1]["messages"] == [*history[-3:], user("next")]


async def test_window_does_not_count_or_drop_the_system_prompt(
    srv: FakeOpenAIServer, make_agent: Any
) -> None:
    history = [user("u0"), assistant("a0"), user("u1"), assistant("a1")]
    agent = make_agent(context_manager=ContextManager(max_history=2), system_prompt="Be kind.")
    await agent.ctxmgr.aset_session_context("s", history)
    await agent.run({"message": "next"}, session_id="s")
    sent = srv.requests[-1]["messages"]
    assert sent == [{"role": "system", "content": "Be kind."}, *history[-2:], user("next")]
    stored = await agent.ctxmgr.aget_session_context("s")
    assert all(m["role"] != "system" for m in stored)


async def test_max_history_zero_sends_no_history_but_still_stores(
    srv: FakeOpenAIServer, make_agent: Any
) -> None:
    agent = make_agent(context_manager=ContextManager(max_history=0))
    await agent.run({"message": "My name is Alice"}, session_id="s")
    answer = await agent.run({"message": "What is my name?"}, session_id="s")
    assert answer == "I don't know your name."
    assert srv.requests[-1]["messages"] == [user("What is my name?")]
    assert len(await agent.ctxmgr.aget_session_context("s")) == 4


async def test_stateless_context_manager_sends_and_stores_nothing(
    srv: FakeOpenAIServer, make_agent: Any
) -> None:
    agent = make_agent(context_manager=StatelessContextManager())
    await agent.run({"message": "My name is Alice"}, session_id="s")
    answer = await agent.run({"message": "What is my name?"}, session_id="s")
    assert answer == "I don't know your name."
    assert srv.requests[-1]["messages"] == [user("What is my name?")]
    assert await agent.ctxmgr.aget_session_context("s") == []


async def test_get_session_context_returns_a_copy(make_agent: Any) -> None:
    agent = make_agent()
    history = [user("hello"), assistant("hi")]
    await agent.ctxmgr.aset_session_context("s", history)
    context = agent.ctxmgr.get_session_context("s")
    context[0]["content"] = "changed"
    context.append(user("extra"))
    assert agent.ctxmgr.get_session_context("s") == history


async def test_set_session_context_keeps_a_copy_of_the_callers_list(make_agent: Any) -> None:
    agent = make_agent()
    history = [user("hello"), assistant("hi")]
    agent.ctxmgr.set_session_context("s", history)
    history[0]["content"] = "changed"
    history.append(user("extra"))
    assert agent.ctxmgr.get_session_context("s") == [user("hello"), assistant("hi")]


async def test_async_twins_read_replace_and_clear(make_agent: Any) -> None:
    ctx = make_agent().ctxmgr
    assert await ctx.aget_session_context("s") == []
    await ctx.aset_session_context("s", [user("one")])
    await ctx.aset_session_context("s", [user("two"), assistant("2")])
    assert await ctx.aget_session_context("s") == [user("two"), assistant("2")]
    await ctx.aclear_session("s")
    assert await ctx.aget_session_context("s") == []


async def test_plain_and_async_operations_see_the_same_store(make_agent: Any) -> None:
    ctx = make_agent().ctxmgr
    ctx.set_session_context("s", [user("plain")])
    assert await ctx.aget_session_context("s") == [user("plain")]
    await ctx.aset_session_context("s", [user("async")])
    assert ctx.get_session_context("s") == [user("async")]
    ctx.clear_session("s")
    assert await ctx.aget_session_context("s") == []


async def test_inactive_sessions_are_those_not_updated_for_the_given_age(
    make_agent: Any,
) -> None:
    ctx = make_agent().ctxmgr
    await ctx.aset_session_context("old", [user("a")])
    # In 'redis' mode the listing reads Postgres: wait for the write-behind to bring "old"
    # there (within the flusher's lag budget), not for a guessed time.
    deadline = asyncio.get_running_loop().time() + 10
    while "old" not in await ctx.aget_inactive_sessions(max_age_seconds=0):
        assert asyncio.get_running_loop().time() < deadline, "'old' never reached the listing"
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.4)
    await ctx.aset_session_context("new", [user("b")])
    assert await ctx.aget_inactive_sessions(max_age_seconds=0.25) == ["old"]
    assert await ctx.aget_inactive_sessions(max_age_hours=0.25 / 3600) == ["old"]
    assert await ctx.aget_inactive_sessions(max_age_hours=1) == []


async def test_list_sessions_reports_sizes_least_recently_updated_first(make_agent: Any) -> None:
    ctx = make_agent().ctxmgr
    await ctx.aset_session_context("old", [user("a")])
    await asyncio.sleep(0.15)
    await ctx.aset_session_context("new", [user("b"), assistant("c")])
    # The redis store lists what its write-behind has copied to Postgres: wait for the flush
    # (polled, so a loaded machine only makes it slower, not wrong).
    deadline = asyncio.get_running_loop().time() + 10
    infos = await ctx.alist_sessions()
    while len(infos) < 2 and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
        infos = await ctx.alist_sessions()
    assert [(i.session_id, i.message_count) for i in infos] == [("old", 1), ("new", 2)]
    assert infos[0].updated_at < infos[1].updated_at


async def test_cleared_session_is_not_listed(make_agent: Any) -> None:
    ctx = make_agent().ctxmgr
    await ctx.aset_session_context("gone", [user("a")])
    await ctx.aclear_session("gone")
    assert await ctx.aget_inactive_sessions(max_age_seconds=0) == []


@pytest.mark.parametrize(
    "messages",
    [
        pytest.param([{"role": "wizard", "content": "x"}], id="unknown-role"),
        pytest.param(["hello"], id="not-a-dict"),
        pytest.param("hello", id="a-string"),
        pytest.param({"role": "user", "content": "x"}, id="a-single-dict"),
    ],
)
async def test_set_session_context_rejects_bad_messages(make_agent: Any, messages: Any) -> None:
    ctx = make_agent().ctxmgr
    await ctx.aset_session_context("s", [user("kept")])
    with pytest.raises(InvalidInputError):
        await ctx.aset_session_context("s", messages)
    assert await ctx.aget_session_context("s") == [user("kept")]


@pytest.mark.parametrize("session_id", ["", 42, None, "x" * 513, "a\x00b"])
def test_session_operations_reject_bad_session_ids(session_id: Any) -> None:
    ctx = ContextManager()
    with pytest.raises(InvalidInputError):
        ctx.get_session_context(session_id)
    with pytest.raises(InvalidInputError):
        ctx.set_session_context(session_id, [])
    with pytest.raises(InvalidInputError):
        ctx.clear_session(session_id)


def test_summarize_true_without_a_window_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="summar"):
        ContextManager(summarize=True)


def test_summarize_false_is_accepted() -> None:
    assert ContextManager(max_history=50, summarize=False).max_history == 50


@pytest.mark.parametrize("max_history", [-1, 1.5, "10", True])
def test_invalid_max_history_is_refused(max_history: Any) -> None:
    with pytest.raises(ConfigurationError, match="max_history"):
        ContextManager(max_history=max_history)


def test_one_context_manager_cannot_serve_two_agents() -> None:
    shared = ContextManager()
    model = {"provider": "openai", "model": "gpt-4o", "api_key": "test"}
    Agent(id="first", model=model, context_manager=shared)
    with pytest.raises(ConfigurationError, match="ContextManager"):
        Agent(id="second", model=model, context_manager=shared)


async def test_subclass_edits_to_messages_for_llm_are_not_stored(
    srv: FakeOpenAIServer, make_agent: Any
) -> None:
    class Redacting(ContextManager):
        def messages_for_llm(self, run_id: str, session_id: str | None = None) -> list[Any]:
            messages = super().messages_for_llm(run_id, session_id)
            for message in messages:
                if message["role"] == "user":
                    message["content"] = "[redacted]"
            return messages

    agent = make_agent(context_manager=Redacting())
    await agent.run({"message": "secret"}, session_id="s")
    assert srv.requests[-1]["messages"] == [user("[redacted]")]
    assert (await agent.ctxmgr.aget_session_context("s"))[0] == user("secret")
