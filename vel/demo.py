"""``vel demo``: a multi-turn conversation whose memory survives losing Redis.

Uses the real OpenAI API when ``OPENAI_API_KEY`` is set, otherwise vel's fake
OpenAI-compatible server (so the demo runs offline, through the real openai SDK).
"""

from __future__ import annotations

import os
import socket
import uuid
from contextlib import ExitStack
from typing import Any

from vel.agent import Agent
from vel.context import StatelessContextManager
from vel.settings import load_settings, openai_key_present


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _say(text: str) -> None:
    print(text, flush=True)


def _fake_model(stack: ExitStack) -> dict[str, Any]:
    model: dict[str, Any] = {"provider": "openai", "model": "gpt-4o-mini"}
    if not openai_key_present():
        from vel.testing.fake_openai import FakeOpenAIServer

        server = stack.enter_context(FakeOpenAIServer())
        model.update(api_key="demo", base_url=server.base_url)
    return model


async def run_shared_turn(storage: str, session_id: str, worker: str) -> int:
    """One worker's part of a conversation several workers share: it introduces the user
    when the session is new, otherwise asks for the name that another worker stored."""
    with ExitStack() as stack:
        model = _fake_model(stack)
        # The demo holds the session's turn lock itself, around choosing what to say and the
        # turn, so workers started together still take turns: exactly one introduces.
        async with Agent(
            id="demo", model=model, session_storage=storage, policies={"turn_lock": False}
        ) as agent:
            async with agent.store.turn_lock(session_id, 60):
                history = await agent.ctxmgr.aget_session_context(session_id)
                message = "What is my name?" if history else "My name is Alice"
                answer = await agent.run({"message": message}, session_id=session_id)
                stored = await agent.ctxmgr.aget_session_context(session_id)
            _say(f"[{worker}] session {session_id}: had {len(history)} messages")
            _say(f"[{worker}] user: {message}\n[{worker}] assistant: {answer}")
            _say(f"[{worker}] session now holds {len(stored)} messages")
    return 0


async def run_demo(
    storage: str = "auto", session_id: str | None = None, worker: str | None = None
) -> int:
    """Run the demo; with ``session_id``, run one shared-session turn as ``worker``."""
    settings = load_settings()
    if storage == "auto":
        storage = "redis" if settings.postgres_dsn and _answers(6379) else "memory"
    if session_id is not None:
        return await run_shared_turn(storage, session_id, worker or f"worker-{os.getpid()}")
    with ExitStack() as stack:
        model: dict[str, Any] = {"provider": "openai", "model": "gpt-4o-mini"}
        if not openai_key_present():
            from vel.testing.fake_openai import FakeOpenAIServer

            server = stack.enter_context(FakeOpenAIServer())
            model.update(api_key="demo", base_url=server.base_url)
            _say(
                f"model: vel's fake OpenAI server at {server.base_url} "
                "(set OPENAI_API_KEY to talk to the real API)"
            )
        else:
            _say("model: OpenAI gpt-4o-mini")
        if storage in ("redis", "database"):
            from vel.stores.postgres.migrate import migrate

            assert settings.postgres_dsn
            await migrate(settings.postgres_dsn)
        _say(f"session_storage: {storage!r}\n")
        session_id = f"demo-{uuid.uuid4().hex[:8]}"

        async with Agent(
            id="demo",
            model=model,
            session_storage=storage,
            system_prompt="You are a concise assistant.",
        ) as agent:
            _say(f"[worker 1] user: My name is Alice   (session {session_id})")
            print("[worker 1] assistant (streamed): ", end="", flush=True)
            async for event in agent.run_stream(
                {"message": "My name is Alice"}, session_id=session_id
            ):
                if event["type"] == "text-delta":
                    print(event["delta"], end="", flush=True)
            print(flush=True)
            answer = await agent.run({"message": "What is my name?"}, session_id=session_id)
            _say(f"[worker 1] user: What is my name?\n[worker 1] assistant: {answer}")
            history = await agent.ctxmgr.aget_session_context(session_id)
            _say(
                f"[worker 1] stored history: {len(history)} messages "
                "(the system prompt is never stored)"
            )
            store: Any = agent.store
            if storage == "redis":
                await store.flush()
                stats = await store.stats()
                _say(
                    f"[worker 1] flushed to Postgres: {int(stats['flushed_messages'])} "
                    f"messages, unflushed now {int(stats['unflushed_messages'])}"
                )
                keys = store.hot.keys.session(session_id)
                client = await store.hot.client()
                await client.redis.delete(*keys.data)
                _say("[redis] session keys deleted (as if expired or evicted)")

        async with Agent(id="demo", model=model, session_storage=storage) as worker2:
            answer = await worker2.run({"message": "What is my name?"}, session_id=session_id)
            where = "warmed back from Postgres" if storage == "redis" else "same process"
            _say(f"[worker 2] user: What is my name?\n[worker 2] assistant: {answer}  ({where})")

        async with Agent(
            id="demo",
            model=model,
            session_storage=storage,
            context_manager=StatelessContextManager(),
        ) as stateless:
            answer = await stateless.run({"message": "What is my name?"}, session_id=session_id)
            _say(f"[stateless] user: What is my name?\n[stateless] assistant: {answer}")
    return 0
