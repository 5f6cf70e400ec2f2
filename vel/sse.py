"""Server-Sent Events framing of ``Agent.run_stream`` for the AI SDK's chat clients.

The AI SDK's ``DefaultChatTransport`` (``useChat``) reads a UI message stream as SSE: one
``data: <json>`` event per chunk, ``data: [DONE]`` at the end, and the response header
``x-vercel-ai-ui-message-stream: v1``. Any ASGI framework can serve it::

    from starlette.responses import StreamingResponse
    from vel.sse import UI_MESSAGE_STREAM_HEADERS, sse_stream

    events = agent.run_stream({"message": text}, session_id=session_id)
    return StreamingResponse(sse_stream(events), headers=UI_MESSAGE_STREAM_HEADERS)

(the same framing as the SDK's own ``JsonToSseTransformStream`` and ``UI_MESSAGE_STREAM_HEADERS``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterable, Mapping
from contextlib import aclosing, nullcontext
from types import MappingProxyType
from typing import Any

from vel._asyncgens import Owned, stream

__all__ = ["DONE", "UI_MESSAGE_STREAM_HEADERS", "encode_event", "sse_stream"]

UI_MESSAGE_STREAM_HEADERS: Mapping[str, str] = MappingProxyType(
    {
        "content-type": "text/event-stream",
        "cache-control": "no-cache",
        "connection": "keep-alive",
        "x-vercel-ai-ui-message-stream": "v1",
        "x-accel-buffering": "no",  # nginx: pass each event on as it comes
    }
)
"""Response headers of a UI message stream (what the AI SDK's own responses send)."""

DONE = b"data: [DONE]\n\n"
"""The event that ends the stream."""


def encode_event(event: Mapping[str, Any]) -> bytes:
    """One event as an SSE ``data:`` line (UTF-8, compact JSON, no raw newline inside).

    Raises:
        TypeError, ValueError: the event holds something JSON cannot carry (a set, NaN).
    """
    text = json.dumps(event, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return b"data: " + text.encode("utf-8") + b"\n\n"


@stream
async def sse_stream(events: AsyncIterable[Mapping[str, Any]]) -> AsyncGenerator[bytes, None]:
    """Frame ``events`` (e.g. ``agent.run_stream(...)``) as SSE bytes, ending with ``DONE``.

    When the consumer stops early (the client went away and the server closes or cancels
    this generator), ``events`` is closed at once if it is an async generator, so an agent
    turn ends there: its lock is released and nothing of it is stored.
    """
    if isinstance(events, AsyncGenerator):
        # Owned: this generator closes ``events``, not the loop's shutdown (vel._asyncgens).
        events = Owned(events)
    # A loop turn after each frame: the server learns that its client went away from a loop
    # callback (connection_lost), and events that came in one burst would otherwise all be
    # written to the dead connection (asyncio logs each write past the fifth).
    closing = aclosing(events) if hasattr(events, "aclose") else nullcontext()  # type: ignore[type-var]
    async with closing:
        async for event in events:
            yield encode_event(event)
            await asyncio.sleep(0)
    yield DONE
