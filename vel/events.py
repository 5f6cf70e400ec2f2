"""Stream events in the Vercel AI SDK UI message stream vocabulary.

``Agent.run_stream`` yields plain dicts built here. The stream always has exactly one
``start`` first and exactly one terminal event (``finish`` or ``error``) last; ``start-step``
/``finish-step`` and ``text-start``/``text-end`` are balanced; every ``tool-input-start`` is
closed by ``tool-output-available`` or ``tool-output-error``; a cancelled turn ends with
``abort`` then ``finish``.
"""

from __future__ import annotations

from typing import Any

Event = dict[str, Any]


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


def response_metadata(usage: dict[str, Any]) -> Event:
    return {"type": "response-metadata", "usage": usage}


def abort() -> Event:
    return {"type": "abort"}


def error(error_text: str) -> Event:
    return {"type": "error", "errorText": error_text}


def finish() -> Event:
    return {"type": "finish"}


TERMINAL = frozenset({"finish", "error"})
