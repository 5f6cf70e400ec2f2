"""One OpenAI Agents SDK turn in a fresh OS process, kept by VelSession and by SQLiteSession.

    python tests/agents_worker.py --storage redis --session-id S --sqlite DB "My name is Ada"

The same ``Runner.run`` (real ``openai-agents``, ``OpenAIChatCompletionsModel`` on the fake
OpenAI server at ``OPENAI_BASE_URL``) runs twice: with ``VelSession(S, storage)`` inside its
turn lock, then with the SDK's own ``SQLiteSession(S, DB)``, so the two stores can be compared
item for item. Storage settings come from the environment (``POSTGRES_DSN``, ``REDIS_URL``,
``VEL_KEY_PREFIX``). Prints ``{"pid", "vel", "sqlite"}`` (both final outputs) as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os

from agents import (
    Agent,
    OpenAIChatCompletionsModel,
    Runner,
    SQLiteSession,
    function_tool,
    set_tracing_disabled,
)
from openai import AsyncOpenAI

from vel.integrations.openai_agents import VelSession


@function_tool
def weather(city: str) -> str:
    """Today's weather in a city."""
    return f"sunny in {city}"


async def main(storage: str, session_id: str, sqlite_path: str, text: str) -> dict[str, object]:
    set_tracing_disabled(True)
    client = AsyncOpenAI()  # OPENAI_BASE_URL / OPENAI_API_KEY from the environment
    agent = Agent(
        name="assistant",
        instructions="Be brief.",
        tools=[weather],
        model=OpenAIChatCompletionsModel("fake-model", client),
    )
    async with VelSession(session_id, storage) as session, session.turn():
        by_vel = await Runner.run(agent, text, session=session)
    reference = SQLiteSession(session_id, sqlite_path)
    try:
        by_sqlite = await Runner.run(agent, text, session=reference)
    finally:
        reference.close()
    await client.close()
    return {"pid": os.getpid(), "vel": by_vel.final_output, "sqlite": by_sqlite.final_output}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--storage", required=True)
    parser.add_argument("--session-id", required=True)
    parser.add_argument("--sqlite", required=True)
    parser.add_argument("text")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main(args.storage, args.session_id, args.sqlite, args.text))))
