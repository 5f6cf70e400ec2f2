"""Stream events: the AI SDK UI message stream protocol, in one place.

``Agent.run_stream`` yields plain dicts built here, each a UI message chunk as the ``ai`` npm
package (versions 5 and 6) defines it: ``uiMessageChunkSchema`` in its
``src/ui-message-stream/ui-message-chunks.ts``, documented at
https://ai-sdk.dev/docs/ai-sdk-ui/stream-protocol. Its ``DefaultChatTransport`` validates every
chunk with that schema and fails the whole response on the first one it does not know, so no
other type is ever emitted (tests/test_ai_sdk_stream.py checks with the package itself).

The stream always has exactly one ``start`` first and exactly one terminal event (``finish`` or
``error``) last; ``start-step``/``finish-step`` and ``text-start``/``text-end`` are balanced;
every ``tool-input-start`` is closed by ``tool-output-available`` or ``tool-output-error``; a
cancelled turn ends with ``abort`` then ``finish``. Token usage, summed over the turn's model
calls, travels as message metadata (``finish``'s ``messageMetadata``, or a ``message-metadata``
chunk before an ``error``): ``{"usage": {...}}`` with the SDK's ``LanguageModelUsage`` field
names (see :func:`usage`). :mod:`vel.sse` frames the events as Server-Sent Events.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

Event = dict[str, Any]
Usage = dict[str, Any]


def start(message_id: str) -> Event:
    return {"type": "start", "messageId": message_id}


def start_step() -> Event:
    return {"type": "start-step"}


def finish_step() -> Event:
    return {"type": "finish-step"}


def text_start(block_id: str) -> Event:
    return {"type": "text-start", "id": block_id}


def text_delta(block_id: str, delta: str) -> Event:
    return {"type": "text-delta", "id": block_id, "delta": delta}


def text_end(block_id: str) -> Event:
    return {"type": "text-end", "id": block_id}


def tool_input_start(call_id: str, name: str) -> Event:
    return {"type": "tool-input-start", "toolCallId": call_id, "toolName": name}


def tool_input_delta(call_id: str, delta: str) -> Event:
    return {"type": "tool-input-delta", "toolCallId": call_id, "inputTextDelta": delta}


def tool_input_available(call_id: str, name: str, tool_input: Any) -> Event:
    return {
        "type": "tool-input-available",
        "toolCallId": call_id,
        "toolName": name,
        "input": tool_input,
    }


def tool_output_available(call_id: str, output: Any) -> Event:
    return {"type": "tool-output-available", "toolCallId": call_id, "output": output}


def tool_output_error(call_id: str, error_text: str) -> Event:
    return {"type": "tool-output-error", "toolCallId": call_id, "errorText": error_text}


def message_metadata(metadata: Mapping[str, Any]) -> Event:
    """Metadata the client merges into the message (``message.metadata``)."""
    return {"type": "message-metadata", "messageMetadata": dict(metadata)}


def abort() -> Event:
    return {"type": "abort"}


def error(error_text: str) -> Event:
    return {"type": "error", "errorText": error_text}


def finish(metadata: Mapping[str, Any] | None = None) -> Event:
    """The last event of a turn that was not failed; ``metadata`` goes to the message."""
    if metadata is None:
        return {"type": "finish"}
    return {"type": "finish", "messageMetadata": dict(metadata)}


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def usage(reported: Mapping[str, Any]) -> Usage:
    """Translate an OpenAI ``usage`` object into the AI SDK's ``LanguageModelUsage``.

    ``prompt_tokens`` becomes ``inputTokens``, ``completion_tokens`` ``outputTokens`` and
    ``total_tokens`` ``totalTokens``; the cache and reasoning details go both where ``ai`` 6
    reads them (``inputTokenDetails``, ``outputTokenDetails``) and where 5 did
    (``cachedInputTokens``, ``reasoningTokens``). What the provider did not report is left
    out (JSON has no ``undefined``).
    """
    result: Usage = {}
    prompt = _count(reported.get("prompt_tokens"))
    completion = _count(reported.get("completion_tokens"))
    total = _count(reported.get("total_tokens"))
    if prompt is not None:
        result["inputTokens"] = prompt
    if completion is not None:
        result["outputTokens"] = completion
    if total is None and prompt is not None and completion is not None:
        total = prompt + completion
    if total is not None:
        result["totalTokens"] = total
    prompt_details = reported.get("prompt_tokens_details")
    cached = (
        _count(prompt_details.get("cached_tokens")) if isinstance(prompt_details, Mapping) else None
    )
    if cached is not None:
        result["cachedInputTokens"] = cached
        result["inputTokenDetails"] = {"cacheReadTokens": cached}
        if prompt is not None:
            result["inputTokenDetails"]["noCacheTokens"] = prompt - cached
    output_details = reported.get("completion_tokens_details")
    reasoning = (
        _count(output_details.get("reasoning_tokens"))
        if isinstance(output_details, Mapping)
        else None
    )
    if reasoning is not None:
        result["reasoningTokens"] = reasoning
        result["outputTokenDetails"] = {"reasoningTokens": reasoning}
        if completion is not None:
            result["outputTokenDetails"]["textTokens"] = completion - reasoning
    return result


def add_usage(total: Usage | None, step: Usage) -> Usage:
    """Sum two :func:`usage` values field by field (a turn makes one model call per step)."""
    if total is None:
        return {k: dict(v) if isinstance(v, dict) else v for k, v in step.items()}
    result: Usage = {}
    for key in [*total, *(k for k in step if k not in total)]:
        a, b = total.get(key), step.get(key)
        if isinstance(a, dict) or isinstance(b, dict):
            result[key] = add_usage(a or {}, b or {})
        else:
            result[key] = (a or 0) + (b or 0)
    return result


TERMINAL = frozenset({"finish", "error"})
