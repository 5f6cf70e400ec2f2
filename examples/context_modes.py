"""Full, stateless and limited-history context modes, side by side.

Each mode has the same three-turn conversation: the user gives their name, says something
else, then asks for their name back.

- Full memory (``ContextManager()``, the default) sends the whole history: it remembers.
- Stateless (``StatelessContextManager()``) sends and stores nothing: it cannot remember.
- Limited history (``ContextManager(max_history=2)``) sends only the last two stored
  messages: by the third turn the name has left the window, although it is still stored.

Run it with ``python examples/context_modes.py``. With ``OPENAI_API_KEY`` set it talks to
the OpenAI API (model ``gpt-4o-mini``, or ``VEL_EXAMPLE_MODEL``); without it, it starts vel's
fake OpenAI-compatible server in-process, so it runs offline with deterministic answers.
"""

from __future__ import annotations

import asyncio
import os
from contextlib import ExitStack
from typing import Any

from vel import Agent, ContextManager, StatelessContextManager

TURNS = [
    "My name is Alice.",
    "I like green tea.",
    "What is my name?",
]

MODES: list[tuple[str, str, ContextManager]] = [
    ("full", "ContextManager()", ContextManager()),
    ("stateless", "StatelessContextManager()", StatelessContextManager()),
    ("limited", "ContextManager(max_history=2)", ContextManager(max_history=2)),
]


async def demonstrate(name: str, label: str, ctxmgr: ContextManager, model: dict[str, Any]) -> str:
    """Hold the conversation in one mode; return the answer to the last question."""
    print(f"\n== {name}: {label} ==")
    session_id = f"demo-{name}"
    answer = ""
    async with Agent(id=f"{name}-agent", model=model, context_manager=ctxmgr) as agent:
        for message in TURNS:
            answer = await agent.run({"message": message}, session_id=session_id)
            print(f"  user:      {message}")
            print(f"  assistant: {answer}")
        stored = await agent.ctxmgr.aget_session_context(session_id)
    print(f"  ({len(stored)} messages stored in session {session_id!r})")
    return answer


async def main(model: dict[str, Any]) -> None:
    results = [(name, await demonstrate(name, label, ctx, model)) for name, label, ctx in MODES]
    print("\nWhat each mode answered to 'What is my name?':")
    for name, answer in results:
        print(f"  {name:<10} {answer}")


def run() -> None:
    with ExitStack() as stack:
        if os.environ.get("OPENAI_API_KEY"):
            model_name = os.environ.get("VEL_EXAMPLE_MODEL", "gpt-4o-mini")
            model: dict[str, Any] = {"provider": "openai", "model": model_name}
            print(f"Using the OpenAI API (model {model_name}).")
        else:
            from vel.testing import FakeOpenAIServer

            server = stack.enter_context(FakeOpenAIServer())
            model = {
                "provider": "openai",
                "model": "gpt-4o",
                "api_key": "fake",
                "base_url": server.base_url,
            }
            print(
                f"OPENAI_API_KEY is not set: using vel's fake OpenAI server at {server.base_url}."
            )
        asyncio.run(main(model))


if __name__ == "__main__":
    run()
