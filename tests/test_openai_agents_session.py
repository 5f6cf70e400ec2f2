"""VelSession under the real OpenAI Agents SDK: the same items as the SDK's own SQLiteSession,
turn after turn in fresh processes, with pop and clear agreeing too."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from agents import (
    Agent,
    OpenAIChatCompletionsModel,
    Runner,
    SQLiteSession,
    function_tool,
    set_tracing_disabled,
)
from agents.memory import Session, SessionSettings
from conftest import schema_dsn
from openai import AsyncOpenAI

from vel.errors import InvalidInputError
from vel.integrations.openai_agents import VelSession
from vel.stores import MemoryStore
from vel.stores.postgres import PostgresStore
from vel.testing import FakeOpenAIServer

HERE = Path(__file__).resolve().parent
TURNS = ["My name is Ada", '[[call weather {"city": "Paris"}]]', "What is my name?"]


@pytest.fixture
def storage_env(
    monkeypatch: pytest.MonkeyPatch,
    pg_dsn: str,
    migrated_schema: str,
    redis_url: str,
    key_prefix: str,
    srv: FakeOpenAIServer,
) -> dict[str, str]:
    """This test's storage and model settings, in this process and for its children."""
    env = {
        "POSTGRES_DSN": schema_dsn(pg_dsn, migrated_schema),
        "REDIS_URL": redis_url,
        "VEL_KEY_PREFIX": key_prefix,
        "OPENAI_BASE_URL": srv.base_url,
        "OPENAI_API_KEY": "test",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


def run_turn(storage: str, session_id: str, sqlite: Path, text: str) -> dict[str, Any]:
    """One turn in a fresh OS process (tests/agents_worker.py)."""
    done = subprocess.run(
        [
            sys.executable,
            str(HERE / "agents_worker.py"),
            "--storage",
            storage,
            "--session-id",
            session_id,
            "--sqlite",
            str(sqlite),
            text,
        ],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=HERE.parent,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.slow  # six fresh processes, each importing the SDK (seconds apiece)
@pytest.mark.parametrize("storage", ["redis", "database"])
async def test_three_turns_in_three_processes_keep_what_sqlite_session_keeps(
    storage: str, storage_env: dict[str, str], tmp_path: Path
) -> None:
    session_id = f"agents-{uuid.uuid4().hex[:8]}"
    sqlite = tmp_path / "reference.db"
    results = [await asyncio.to_thread(run_turn, storage, session_id, sqlite, t) for t in TURNS]

    assert len({r["pid"] for r in results}) == 3
    assert [r["vel"] for r in results] == [r["sqlite"] for r in results]
    assert results[1]["vel"] == "Tool results: sunny in Paris"
    assert results[2]["vel"] == "Your name is Ada."  # answered from the first turn

    reference = SQLiteSession(session_id, str(sqlite))
    async with VelSession(session_id, storage) as session:
        items = await session.get_items()
        expected = await reference.get_items()
        assert items == expected
        kinds = [i.get("type", "message") for i in items]
        assert kinds.count("function_call") == 1 and kinds.count("function_call_output") == 1
        assert await session.get_items(limit=2) == await reference.get_items(limit=2)
        if storage == "redis":
            # Each process drained its writes on close: Postgres holds the same items.
            async with PostgresStore(storage_env["POSTGRES_DSN"]) as durable:
                assert await durable.load(session_id) == expected

        for _ in range(2):
            assert await session.pop_item() == await reference.pop_item()
            assert await session.get_items() == await reference.get_items()
        await session.clear_session()
        await reference.clear_session()
        assert await session.get_items() == await reference.get_items() == []
        assert await session.pop_item() is await reference.pop_item() is None
    reference.close()


# -- the protocol, in this process ------------------------------------------------------


@function_tool
def weather(city: str) -> str:
    """Today's weather in a city."""
    return f"sunny in {city}"


@pytest.fixture
async def sdk_agent(srv: FakeOpenAIServer) -> AsyncIterator[Agent[Any]]:
    """An SDK agent on the fake server (its client closed on this test's loop)."""
    set_tracing_disabled(True)
    async with AsyncOpenAI(api_key="test", base_url=srv.base_url) as client:
        model = OpenAIChatCompletionsModel("fake-model", client)
        yield Agent(name="assistant", instructions="Be brief.", tools=[weather], model=model)


def test_vel_session_is_a_session_of_the_sdk() -> None:
    assert isinstance(VelSession("s"), Session)


async def test_items_are_kept_verbatim_and_windows_follow_the_sdk() -> None:
    items: list[Any] = [
        {"role": "user", "content": "hi"},
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "e=="},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}", "id": "fc"},
        {"type": "function_call_output", "call_id": "c1", "output": "ok"},
    ]
    reference = SQLiteSession("s")
    async with VelSession("s", MemoryStore()) as session:
        await session.add_items(items[:1])
        await session.add_items(items[1:])
        await session.add_items([])
        await reference.add_items(items)
        for limit in (None, 0, 1, 3, 10, -1):
            assert await session.get_items(limit) == await reference.get_items(limit), limit
    reference.close()


async def test_session_settings_limit_is_the_default_window() -> None:
    store = MemoryStore()
    async with VelSession("s", store, session_settings={"limit": 2}) as session:
        assert session.session_settings == SessionSettings(limit=2)
        await session.add_items([{"role": "user", "content": str(i)} for i in range(5)])
        assert [i["content"] for i in await session.get_items()] == ["3", "4"]  # type: ignore[typeddict-item]
        assert len(await session.get_items(limit=4)) == 4


async def test_pop_from_an_empty_session_is_none() -> None:
    async with VelSession("empty", MemoryStore()) as session:
        assert await session.pop_item() is None


async def test_an_item_json_cannot_carry_is_refused_and_nothing_is_stored() -> None:
    async with VelSession("s", MemoryStore()) as session:
        await session.add_items([{"role": "user", "content": "kept"}])
        with pytest.raises(InvalidInputError):
            await session.add_items([{"role": "user", "content": "x"}, {"bad": {1, 2}}])  # type: ignore[list-item]
        assert await session.get_items() == [{"role": "user", "content": "kept"}]


def test_a_bad_session_id_is_refused_at_once() -> None:
    with pytest.raises(InvalidInputError):
        VelSession("")


def test_without_the_sdk_the_import_error_names_the_extra(tmp_path: Path) -> None:
    script = (
        "import sys; sys.modules['agents'] = None\n"
        "try:\n"
        "    import vel.integrations.openai_agents\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
        "import vel\n"
        "print('agents' in sys.modules and sys.modules['agents'] is not None)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    message, loaded = done.stdout.strip().splitlines()
    assert "[agents]" in message and "pip install" in message
    assert loaded == "False"


def test_importing_vel_does_not_import_the_sdk() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import sys, vel; print('agents' in sys.modules)"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stdout.strip() == "False"


async def test_runs_in_turns_never_interleave(
    srv: FakeOpenAIServer, sdk_agent: Agent[Any], storage_env: Any
) -> None:
    agent = sdk_agent
    session_id = f"turns-{uuid.uuid4().hex[:8]}"

    async def run(text: str) -> str:
        async with VelSession(session_id, "database") as session, session.turn():
            result = await Runner.run(agent, f"[[slow 0.02]] {text}", session=session)
            return str(result.final_output)

    await asyncio.gather(run("first run"), run("second run"))
    async with VelSession(session_id, "database") as session:
        items: list[Any] = await session.get_items()
    users = [i["content"] for i in items if i.get("role") == "user"]
    assert [i.get("role") for i in items] == ["user", "assistant", "user", "assistant"]
    # The second run saw the first one's items: its request carried the whole first run.
    assert len(srv.requests[-1]["messages"]) == 1 + 3
    assert srv.requests[-1]["messages"][1]["content"] == users[0]
