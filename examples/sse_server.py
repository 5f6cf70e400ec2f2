"""A chat endpoint streaming ``Agent.run_stream`` as Server-Sent Events, scaled out.

Plain ASGI (no framework): ``POST /chat`` with ``{"session_id": "...", "message": "..."}``
answers ``text/event-stream`` with the ``x-vercel-ai-ui-message-stream: v1`` header, one
``data: {json}`` line per event and ``data: [DONE]`` at the end, which is what the Vercel AI
SDK's ``useChat`` reads. Run it with several worker processes::

    uvicorn examples.sse_server:app --workers 4 --port 8000
    curl -N localhost:8000/chat -d '{"session_id": "s1", "message": "My name is Alice"}'
    curl -N localhost:8000/chat -d '{"session_id": "s1", "message": "What is my name?"}'

Each request may land on any worker; with ``session_storage='redis'`` they all see the same
history. Configuration is the library's environment (``POSTGRES_DSN``, ``REDIS_URL``,
``VEL_*``) plus ``OPENAI_API_KEY``/``OPENAI_BASE_URL`` for the model and
``VEL_EXAMPLE_STORAGE`` (default ``redis``) / ``VEL_EXAMPLE_MODEL`` (default ``gpt-4o-mini``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from vel import Agent

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-vercel-ai-ui-message-stream", b"v1"),
    (b"x-accel-buffering", b"no"),  # nginx: do not buffer the stream
]

_agent: Agent | None = None


def _new_agent() -> Agent:
    return Agent(
        id="sse-chat",
        model={"provider": "openai", "model": os.environ.get("VEL_EXAMPLE_MODEL", "gpt-4o-mini")},
        session_storage=os.environ.get("VEL_EXAMPLE_STORAGE", "redis"),
        system_prompt="You are a concise assistant.",
    )


async def _lifespan(receive: Receive, send: Send) -> None:
    global _agent
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            _agent = _new_agent()
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            if _agent is not None:
                await _agent.aclose()  # drains what this worker has not flushed yet
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def _plain(send: Send, status: int, text: str) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"text/plain; charset=utf-8")],
        }
    )
    await send({"type": "http.response.body", "body": text.encode()})


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """The ASGI application."""
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    if scope["type"] != "http":
        return
    if scope["path"] != "/chat" or scope["method"] != "POST":
        await _plain(send, 404, 'POST /chat {"session_id": ..., "message": ...}\n')
        return
    try:
        request = json.loads(await _body(receive))
        session_id, text = str(request["session_id"]), str(request["message"])
    except (ValueError, KeyError, TypeError):
        await _plain(send, 400, 'expected JSON {"session_id": ..., "message": ...}\n')
        return
    agent = _agent or _new_agent()
    await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
    # run_stream reports failures as a final error event, so the stream always ends cleanly.
    async for event in agent.run_stream({"message": text}, session_id=session_id):
        line = f"data: {json.dumps(event)}\n\n"
        await send({"type": "http.response.body", "body": line.encode(), "more_body": True})
    await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
