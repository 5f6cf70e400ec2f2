"""The default summariser: the Agent's own model, asked incrementally.

Each call sends the documented instructions (:data:`INSTRUCTIONS`) as the system message and,
as the user message, the previous summary (if any) followed by the newly uncovered messages
rendered one per line (``role: text``; tool calls as ``assistant called NAME(ARGS)``). The
answer replaces the previous summary. The model thus never rereads what it already
summarised: a call's cost depends on K, not on the session's length.

The turn shows the summary to the model as one system message, :data:`HEADER` followed by
the summary, placed after the system prompt and before the window.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from vel.errors import ProviderError
from vel.messages import Message
from vel.providers import Provider, TextChunk

INSTRUCTIONS = (
    "You keep a running summary of a conversation between a user and an assistant.\n"
    "You get the previous summary (possibly empty) and the messages that followed it. "
    "Answer with the updated summary only: plain sentences, third person, at most 200 "
    "words. Keep every fact the user stated about themselves (name, preferences, "
    "decisions, numbers), open questions and commitments; drop small talk."
)
HEADER = "Summary of the earlier conversation (older messages are not shown):\n"
PREVIOUS = "Previous summary:\n"
NEW = "New messages:\n"
_MAX_LINE = 2000  # characters of one message shown to the summariser

Summarizer = Callable[[str | None, list[Message]], Awaitable[str] | str]
"""A user summariser: ``(previous summary or None, newly uncovered messages) -> summary``."""


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            str(part.get("text", "")) for part in content if isinstance(part, dict)
        ).strip()
    return "" if content is None else json.dumps(content)


def render(messages: Sequence[Message]) -> str:
    """The messages as the summariser reads them, one per line."""
    lines: list[str] = []
    for message in messages:
        role = str(message.get("role", "?"))
        text = _text(message.get("content"))
        if text:
            lines.append(f"{role}: {text[:_MAX_LINE]}")
        for call in message.get("tool_calls") or []:
            function = call.get("function", {}) if isinstance(call, dict) else {}
            args = str(function.get("arguments", ""))[:_MAX_LINE]
            lines.append(f"{role} called {function.get('name', '?')}({args})")
    return "\n".join(lines)


def request(previous: str | None, messages: Sequence[Message]) -> list[Message]:
    """The chat messages of one summarisation call."""
    body = f"{PREVIOUS}{previous or '(none)'}\n\n{NEW}{render(messages)}"
    return [{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": body}]


def summary_message(text: str) -> Message:
    """The system message a turn's model call gets for a summary."""
    return {"role": "system", "content": HEADER + text}


class ModelSummarizer:
    """Summarises with a provider (the Agent's model): one non-streamed completion where the
    provider offers it (``complete``), else its stream joined."""

    def __init__(self, provider: Provider) -> None:
        self.provider = provider

    async def __call__(self, previous: str | None, messages: list[Message]) -> str:
        body = request(previous, messages)
        complete = getattr(self.provider, "complete", None)
        if complete is not None:
            # Not streamed: nobody reads it as it comes, and one response costs the worker
            # far less CPU than a chunk per token.
            text = str(await complete(body)).strip()
        else:
            parts: list[str] = []
            chunks = self.provider.stream(body, [], {})
            try:
                async for chunk in chunks:
                    if isinstance(chunk, TextChunk):
                        parts.append(chunk.text)
            finally:
                await chunks.aclose()
            text = "".join(parts).strip()
        if not text:
            raise ProviderError("the summariser answered with no text")
        return text


async def call(summarizer: Summarizer, previous: str | None, messages: list[Message]) -> str:
    """Run a summariser (async or plain) and check what it returned."""
    result = summarizer(previous, messages)
    if inspect.isawaitable(result):
        result = await result
    if not isinstance(result, str) or not result.strip():
        raise ProviderError(f"the summariser returned {type(result).__name__}, not text")
    return result.strip()
