"""Every code block of the session-management spec runs, on every storage mode.

Each snippet is copied verbatim from ``spec/session-management.md`` and executed as written
(top-level ``await`` included). The spec's model dicts carry no ``base_url`` or ``api_key``,
so the openai SDK's own ``OPENAI_BASE_URL`` / ``OPENAI_API_KEY`` point it at FakeOpenAIServer.
The snippets' ``from vel import ...`` hands out an ``Agent`` pinned to the storage mode under
test, so one snippet runs against memory, Postgres and Redis alike.
"""

from __future__ import annotations

import ast
import asyncio
import builtins
import datetime as dt
import json
import os
import types
from collections.abc import AsyncIterator, Iterator
from typing import Any, Optional

import asyncpg
import pytest

import vel
from vel.testing import FakeOpenAIServer

# -- the spec's code blocks, verbatim --------------------------------------------------------

BASIC_USAGE = """\
from vel import Agent

agent = Agent(
    id='my-agent',
    model={'provider': 'openai', 'model': 'gpt-4o'},
    session_storage='memory'  # Default
)

session_id = 'user-123'

# Turn 1
answer1 = await agent.run(
    {'message': 'My name is Alice'},
    session_id=session_id
)

# Turn 2 - remembers Alice
answer2 = await agent.run(
    {'message': 'What is my name?'},
    session_id=session_id
)
"""

IN_MEMORY_STORAGE = """\
agent = Agent(
    id='my-agent',
    model={'provider': 'openai', 'model': 'gpt-4o'},
    session_storage='memory'  # Default
)
"""

DATABASE_STORAGE = """\
agent = Agent(
    id='my-agent',
    model={'provider': 'openai', 'model': 'gpt-4o'},
    session_storage='database'
)
"""

FULL_MEMORY = """\
from vel import ContextManager

agent = Agent(
    id='my-agent',
    model={'provider': 'openai', 'model': 'gpt-4o'},
    context_manager=ContextManager()  # or omit (default)
)
"""

STATELESS = """\
from vel import StatelessContextManager

agent = Agent(
    id='my-agent',
    model={'provider': 'openai', 'model': 'gpt-4o'},
    context_manager=StatelessContextManager()
)
"""

LIMITED_HISTORY = """\
from vel import ContextManager

agent = Agent(
    id='my-agent',
    model={'provider': 'openai', 'model': 'gpt-4o'},
    context_manager=ContextManager(max_history=10)  # Last 10 messages
)
"""

HYBRID = """\
# Database + Limited History
# Persistent storage, but only keeps last 20 messages
agent = Agent(
    id='my-agent',
    model={'provider': 'openai', 'model': 'gpt-4o'},
    session_storage='database',
    context_manager=ContextManager(max_history=20)
)
"""

CUSTOM_CONTEXT_MANAGER = """\
from vel import ContextManager

class RAGContextManager(ContextManager):
    \"\"\"Context manager with RAG support\"\"\"

    def messages_for_llm(self, run_id: str, session_id: Optional[str] = None):
        # Get standard messages
        messages = super().messages_for_llm(run_id, session_id)

        # Add RAG-retrieved context
        if session_id:
            retrieved_docs = self.retrieve_relevant_docs(session_id)
            messages.insert(0, {
                'role': 'system',
                'content': f"Relevant context: {retrieved_docs}"
            })

        return messages

    def retrieve_relevant_docs(self, session_id: str):
        # Your RAG logic here
        return "..."

agent = Agent(
    id='my-agent',
    model={'provider': 'openai', 'model': 'gpt-4o'},
    context_manager=RAGContextManager()
)
"""

SESSION_OPERATIONS = """\
# Get session context
context = agent.ctxmgr.get_session_context('user-123')

# Clear a session
agent.ctxmgr.clear_session('user-123')

# Set session context (e.g., loaded from external source)
messages = [
    {'role': 'user', 'content': 'Hello'},
    {'role': 'assistant', 'content': 'Hi there!'}
]
agent.ctxmgr.set_session_context('user-123', messages)
"""

STREAMING = """\
session_id = 'user-123'

# Turn 1: streaming
async for event in agent.run_stream(
    {'message': 'My name is Alice'},
    session_id=session_id
):
    print(event)

# Turn 2: non-streaming (context preserved)
answer = await agent.run(
    {'message': 'What is my name?'},
    session_id=session_id
)
"""

SESSION_ID_STRATEGY = """\
# User-based sessions
session_id = f"user-{user_id}"

# Conversation-based sessions
session_id = f"conv-{conversation_id}"

# Time-based sessions
session_id = f"session-{timestamp}"
"""

SESSION_CLEANUP = """\
# Periodic cleanup
def cleanup_old_sessions():
    # Get sessions older than 1 hour
    old_sessions = get_inactive_sessions(max_age_hours=1)
    for session_id in old_sessions:
        agent.ctxmgr.clear_session(session_id)
"""

# The same recipe written with the real call, and an age a test can wait for.
SESSION_CLEANUP_REAL_CALLS = """\
def cleanup_old_sessions(max_age_seconds):
    old_sessions = agent.ctxmgr.get_inactive_sessions(max_age_seconds=max_age_seconds)
    for session_id in old_sessions:
        agent.ctxmgr.clear_session(session_id)
"""

SQL_CLEANUP = """\
-- Cleanup sessions older than 7 days
DELETE FROM vel_sessions
WHERE updated_at < NOW() - INTERVAL '7 days';
"""

MEMORY_MANAGEMENT = """\
# Optimize for long conversations
agent = Agent(
    id='my-agent',
    model={'provider': 'openai', 'model': 'gpt-4o'},
    context_manager=ContextManager(
        max_history=50,      # Limit context window
        summarize=False       # Future: enable summarization
    ),
    session_storage='database'
)
"""

# Columns of the spec's "Database Schema" block (``context`` is served by a view).
SPEC_SESSION_COLUMNS = {"id", "created_at", "updated_at", "expires_at"}


# -- running snippets -----------------------------------------------------------------------


@pytest.fixture
def srv(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", "test-key")
        yield server


class Spec:
    """A namespace in which spec snippets run, sharing variables like one script."""

    def __init__(self, storage_mode: str) -> None:
        self.agents: list[vel.Agent] = []
        self.printed: list[Any] = []
        agents = self.agents

        class Agent(vel.Agent):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                kwargs["session_storage"] = storage_mode
                super().__init__(*args, **kwargs)
                agents.append(self)

        shim = types.ModuleType("vel")
        shim.__dict__.update(vars(vel))
        shim.Agent = Agent  # type: ignore[attr-defined]

        def spec_import(name: str, *args: Any, **kwargs: Any) -> Any:
            return shim if name == "vel" else builtins.__import__(name, *args, **kwargs)

        self.ns: dict[str, Any] = {
            "__builtins__": {**vars(builtins), "__import__": spec_import},
            "__name__": "spec",
            "Agent": Agent,
            "Optional": Optional,
            "print": self.printed.append,
        }

    def __getitem__(self, name: str) -> Any:
        return self.ns[name]

    async def run(self, snippet: str, **names: Any) -> None:
        """Execute ``snippet`` here; top-level ``await`` / ``async for`` are awaited."""
        self.ns.update(names)
        code = compile(snippet, "<spec>", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        result = eval(code, self.ns)
        if result is not None:
            await result

    async def aclose(self) -> None:
        for agent in self.agents:
            await agent.aclose()


@pytest.fixture
async def spec(srv: FakeOpenAIServer, storage_mode: str) -> AsyncIterator[Spec]:
    namespace = Spec(storage_mode)
    yield namespace
    await namespace.aclose()


def history_sent(srv: FakeOpenAIServer) -> list[dict[str, Any]]:
    """What the last model call received besides the current user message."""
    return list(srv.requests[-1]["messages"][:-1])


async def name_memory(agent: vel.Agent, session_id: str, name: str = "Alice") -> str:
    await agent.run({"message": f"My name is {name}"}, session_id=session_id)
    return await agent.run({"message": "What is my name?"}, session_id=session_id)


# -- basic usage ------------------------------------------------------------------------------


async def test_basic_usage_remembers_alice(spec: Spec, storage_mode: str) -> None:
    await spec.run(BASIC_USAGE)
    assert "Alice" in spec["answer2"]
    stored = await spec["agent"].ctxmgr.aget_session_context("user-123")
    assert [m["role"] for m in stored] == ["user", "assistant", "user", "assistant"]
    assert stored[0]["content"] == "My name is Alice"


async def test_basic_usage_uses_the_pinned_storage(spec: Spec, storage_mode: str) -> None:
    await spec.run(BASIC_USAGE)
    expected = {"memory": "MemoryStore", "database": "PostgresStore", "redis": "TieredStore"}
    assert type(spec["agent"].store).__name__ == expected[storage_mode]


@pytest.mark.parametrize(
    "snippet",
    [IN_MEMORY_STORAGE, DATABASE_STORAGE, FULL_MEMORY, LIMITED_HISTORY, HYBRID, MEMORY_MANAGEMENT],
    ids=["in-memory", "database", "full-memory", "limited", "hybrid", "memory-management"],
)
async def test_agent_from_snippet_remembers_across_turns(spec: Spec, snippet: str) -> None:
    await spec.run(snippet, ContextManager=vel.ContextManager)
    assert "Alice" in await name_memory(spec["agent"], "user-123")


async def test_memory_management_snippet_builds_a_windowed_agent(spec: Spec) -> None:
    await spec.run(MEMORY_MANAGEMENT, ContextManager=vel.ContextManager)
    ctxmgr = spec["agent"].ctxmgr
    assert (ctxmgr.max_history, ctxmgr.summarize) == (50, False)


# -- context manager modes -----------------------------------------------------------------


async def test_stateless_snippet_forgets_and_stores_nothing(
    spec: Spec, srv: FakeOpenAIServer
) -> None:
    await spec.run(STATELESS)
    answer = await name_memory(spec["agent"], "user-123")
    assert "Alice" not in answer
    assert history_sent(srv) == []
    assert await spec["agent"].ctxmgr.aget_session_context("user-123") == []


async def test_limited_history_snippet_sends_the_last_ten_messages(
    spec: Spec, srv: FakeOpenAIServer
) -> None:
    await spec.run(LIMITED_HISTORY)
    agent = spec["agent"]
    for turn in range(7):
        await agent.run({"message": f"turn {turn}"}, session_id="user-123")
    stored = await agent.ctxmgr.aget_session_context("user-123")
    await agent.run({"message": "turn 7"}, session_id="user-123")
    assert len(stored) == 14
    assert history_sent(srv) == stored[-10:]


async def test_limited_history_snippet_forgets_what_left_the_window(spec: Spec) -> None:
    await spec.run(LIMITED_HISTORY)
    agent = spec["agent"]
    await agent.run({"message": "My name is Alice"}, session_id="user-123")
    for turn in range(5):
        await agent.run({"message": f"filler {turn}"}, session_id="user-123")
    answer = await agent.run({"message": "What is my name?"}, session_id="user-123")
    assert "Alice" not in answer
    assert len(await agent.ctxmgr.aget_session_context("user-123")) == 14


async def test_rag_snippet_system_message_reaches_the_model_first(
    spec: Spec, srv: FakeOpenAIServer
) -> None:
    await spec.run(CUSTOM_CONTEXT_MANAGER)
    await spec["agent"].run({"message": "hello"}, session_id="user-123")
    sent = srv.requests[-1]["messages"]
    assert sent[0] == {"role": "system", "content": "Relevant context: ..."}
    assert sent[1:] == [{"role": "user", "content": "hello"}]


async def test_rag_snippet_context_is_not_stored(spec: Spec) -> None:
    await spec.run(CUSTOM_CONTEXT_MANAGER)
    assert "Alice" in await name_memory(spec["agent"], "user-123")
    stored = await spec["agent"].ctxmgr.aget_session_context("user-123")
    assert all(m["role"] != "system" for m in stored)
    assert len(stored) == 4


async def test_rag_snippet_adds_nothing_without_a_session(
    spec: Spec, srv: FakeOpenAIServer
) -> None:
    await spec.run(CUSTOM_CONTEXT_MANAGER)
    await spec["agent"].run({"message": "hello"})
    assert srv.requests[-1]["messages"] == [{"role": "user", "content": "hello"}]


async def test_system_prompt_is_sent_but_never_stored(spec: Spec, srv: FakeOpenAIServer) -> None:
    agent = spec["Agent"](
        id="my-agent",
        model={"provider": "openai", "model": "gpt-4o"},
        system_prompt="You are terse.",
    )
    await name_memory(agent, "user-123")
    assert srv.requests[-1]["messages"][0] == {"role": "system", "content": "You are terse."}
    stored = await agent.ctxmgr.aget_session_context("user-123")
    assert [m["role"] for m in stored] == ["user", "assistant", "user", "assistant"]


# -- session management operations ---------------------------------------------------------


async def test_session_operations_snippet_runs_while_an_event_loop_runs(spec: Spec) -> None:
    await spec.run(BASIC_USAGE)
    before = await spec["agent"].ctxmgr.aget_session_context("user-123")
    await spec.run(SESSION_OPERATIONS)
    assert spec["context"] == before
    assert len(before) == 4
    assert spec["agent"].ctxmgr.get_session_context("user-123") == spec["messages"]


async def test_context_set_by_the_snippet_is_used_by_the_next_turn(
    spec: Spec, srv: FakeOpenAIServer
) -> None:
    await spec.run(BASIC_USAGE)
    await spec.run(SESSION_OPERATIONS)
    answer = await spec["agent"].run({"message": "What is my name?"}, session_id="user-123")
    assert history_sent(srv) == spec["messages"]
    assert "Alice" not in answer


async def test_cleared_session_is_forgotten(spec: Spec) -> None:
    await spec.run(BASIC_USAGE)
    spec["agent"].ctxmgr.clear_session("user-123")
    assert spec["agent"].ctxmgr.get_session_context("user-123") == []
    answer = await spec["agent"].run({"message": "What is my name?"}, session_id="user-123")
    assert "Alice" not in answer


def test_session_operations_snippet_runs_from_plain_code(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with FakeOpenAIServer() as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", "test-key")
        namespace = Spec("memory")
        asyncio.run(namespace.run(BASIC_USAGE))
        agent = namespace["agent"]
        code = compile(SESSION_OPERATIONS, "<spec>", "exec")
        exec(code, namespace.ns)
        assert len(namespace["context"]) == 4
        assert agent.ctxmgr.get_session_context("user-123") == namespace["messages"]
        answer = asyncio.run(agent.run({"message": "What is my name?"}, session_id="user-123"))
        assert "Alice" not in answer
        asyncio.run(namespace.aclose())


# -- streaming ------------------------------------------------------------------------------


async def test_streaming_turn_then_plain_turn_keeps_context(spec: Spec) -> None:
    await spec.run(IN_MEMORY_STORAGE)
    await spec.run(STREAMING)
    events = spec.printed
    assert events[0]["type"] == "start"
    assert events[-1]["type"] == "finish"
    assert events[-1]["messageMetadata"]["usage"]["totalTokens"] > 0
    deltas = "".join(e["delta"] for e in events if e["type"] == "text-delta")
    assert deltas == "You said: My name is Alice"
    assert "Alice" in spec["answer"]


# -- best practices -------------------------------------------------------------------------


async def test_session_id_strategy_strings_work_as_separate_sessions(spec: Spec) -> None:
    await spec.run(IN_MEMORY_STORAGE)
    names = {
        "user_id": 42,
        "conversation_id": "9f1c-ab",
        "timestamp": dt.datetime(2024, 5, 17, 9, 30, 12, 5, tzinfo=dt.UTC).isoformat(),
    }
    ids = []
    for statement in ast.parse(SESSION_ID_STRATEGY).body:
        await spec.run(ast.unparse(statement), **names)
        ids.append(spec["session_id"])
    assert ids == ["user-42", "conv-9f1c-ab", "session-2024-05-17T09:30:12.000005+00:00"]
    agent = spec["agent"]
    for i, session_id in enumerate(ids):
        await agent.run({"message": f"My name is Name{i}"}, session_id=session_id)
    for i, session_id in enumerate(ids):
        answer = await agent.run({"message": "What is my name?"}, session_id=session_id)
        assert answer == f"Your name is Name{i}."


async def test_session_cleanup_snippet_keeps_recent_sessions(spec: Spec) -> None:
    await spec.run(BASIC_USAGE)
    agent = spec["agent"]
    await spec.run(SESSION_CLEANUP, get_inactive_sessions=agent.ctxmgr.get_inactive_sessions)
    spec["cleanup_old_sessions"]()
    assert len(agent.ctxmgr.get_session_context("user-123")) == 4


async def test_session_cleanup_with_real_calls_clears_only_old_sessions(spec: Spec) -> None:
    await spec.run(IN_MEMORY_STORAGE)
    agent = spec["agent"]
    await agent.run({"message": "My name is Alice"}, session_id="old")
    # In 'redis' mode a session is listed once the write-behind has brought it to Postgres
    # (within the flusher's lag budget): wait for that, not for a guessed time.
    deadline = asyncio.get_running_loop().time() + 10
    while "old" not in await agent.ctxmgr.aget_inactive_sessions(max_age_seconds=0):
        assert asyncio.get_running_loop().time() < deadline, "'old' never reached the listing"
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.4)
    await agent.run({"message": "My name is Bob"}, session_id="new")
    await spec.run(SESSION_CLEANUP_REAL_CALLS)
    spec["cleanup_old_sessions"](max_age_seconds=0.25)
    assert agent.ctxmgr.get_session_context("old") == []
    assert len(agent.ctxmgr.get_session_context("new")) == 2


# -- the SQL blocks (Postgres only) ------------------------------------------------------------


@pytest.mark.parametrize("storage_mode", ["database"], indirect=True)
async def test_sql_cleanup_snippet_deletes_sessions_idle_for_seven_days(spec: Spec) -> None:
    await spec.run(DATABASE_STORAGE)
    agent = spec["agent"]
    await agent.run({"message": "My name is Alice"}, session_id="old")
    await agent.run({"message": "My name is Bob"}, session_id="new")
    conn = await asyncpg.connect(os.environ["POSTGRES_DSN"])
    try:
        await conn.execute(
            "UPDATE vel_sessions SET updated_at = now() - interval '8 days' WHERE id = 'old'"
        )
        status = await conn.execute(SQL_CLEANUP)
    finally:
        await conn.close()
    assert status == "DELETE 1"
    assert await agent.ctxmgr.aget_session_context("old") == []
    assert len(await agent.ctxmgr.aget_session_context("new")) == 2


@pytest.mark.parametrize("storage_mode", ["database"], indirect=True)
async def test_database_schema_has_the_documented_shape(spec: Spec) -> None:
    await spec.run(BASIC_USAGE)
    conn = await asyncpg.connect(os.environ["POSTGRES_DSN"])
    try:
        columns = {
            r["column_name"]
            for r in await conn.fetch(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_name = 'vel_sessions' AND table_schema = current_schema()"
            )
        }
        context = await conn.fetchval(
            "SELECT context FROM vel_session_contexts WHERE id = 'user-123'"
        )
    finally:
        await conn.close()
    assert columns >= SPEC_SESSION_COLUMNS
    stored = await spec["agent"].ctxmgr.aget_session_context("user-123")
    assert json.loads(context) == stored
