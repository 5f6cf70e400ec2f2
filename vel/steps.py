"""One model step of a turn: stream the model's answer as UI events, run the tools it
calls, and record the step's messages with the context manager.

The step's text is cleaned as it streams (what a client sees is what is stored); a tool's
failure is reported to the model, never raised out of the turn; a set cancel token ends the
step at once (:class:`Cancelled`), the model stream closed and running tools cancelled.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncGenerator, Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, Protocol

from vel import events as ev
from vel._shield import CancelWatch
from vel.context import ContextManager
from vel.messages import Message, TextCleaner, clean_text
from vel.outcome import TurnReceipt
from vel.providers import Provider, TextChunk, ToolCallChunk, UsageChunk
from vel.tools import Tool, error_text, tool_result


class CancelToken(Protocol):
    """Anything with ``is_set()`` and ``wait()``, such as ``asyncio.Event``."""

    def is_set(self) -> bool: ...

    async def wait(self) -> Any: ...


class Cancelled(Exception):
    """The turn's cancel token was set: the turn ends with ``abort``, nothing stored."""


class StepHost(Protocol):
    """What a step needs of its Agent."""

    ctxmgr: ContextManager
    system_prompt: str | None
    tools: dict[str, Tool]
    provider: Provider
    generation_config: dict[str, Any]


@dataclass
class Outcome:
    """What a turn came to, filled in as it runs: the final text, the error or cancellation
    that ended it, whether it is stored (``receipt``), and the tokens its model calls used."""

    text: str = ""
    error: BaseException | None = None
    cancelled: bool = False
    receipt: TurnReceipt = field(default_factory=TurnReceipt)
    usage: ev.Usage | None = None  # summed over the turn's model calls

    def metadata(self) -> dict[str, Any] | None:
        """What the stream's client gets as ``message.metadata``."""
        return None if self.usage is None else {"usage": self.usage}


@dataclass
class PendingCall:
    """A tool call as it streams in: its arguments arrive in pieces."""

    call_id: str
    name: str
    arguments: str = ""


@dataclass
class Step:
    """One model call's text and tool calls, gathered as they stream."""

    text: list[str] = field(default_factory=list)
    calls: dict[int, PendingCall] = field(default_factory=dict)
    text_block: str | None = None
    # Model text is stored, never refused: NUL and split or lone surrogates are cleaned as
    # they stream, so the deltas a client sees are the text that is stored.
    cleaner: TextCleaner = field(default_factory=TextCleaner)


async def model_step(
    host: StepHost,
    run_id: str,
    session_id: str | None,
    cancel_token: CancelToken | None,
    open_blocks: list[ev.Event],
    outcome: Outcome,
    watch: CancelWatch,
) -> AsyncGenerator[ev.Event, None]:
    yield ev.start_step()
    open_blocks.append(ev.finish_step())
    messages = host.ctxmgr.messages_for_llm(run_id, session_id)
    if host.system_prompt:
        messages.insert(0, {"role": "system", "content": host.system_prompt})
    step = Step()
    tools = [t.openai_schema() for t in host.tools.values()]
    chunks = host.provider.stream(messages, tools, host.generation_config)
    try:
        while True:
            chunk = await until_cancelled(anext(chunks, None), cancel_token)
            if chunk is None:
                break
            if isinstance(chunk, TextChunk):
                if step.text_block is None:
                    step.text_block = uuid.uuid4().hex
                    yield ev.text_start(step.text_block)
                    open_blocks.append(ev.text_end(step.text_block))
                piece = step.cleaner.feed(chunk.text)
                if piece:
                    step.text.append(piece)
                    yield ev.text_delta(step.text_block, piece)
            elif isinstance(chunk, ToolCallChunk):
                call = step.calls.get(chunk.index)
                if call is None:
                    call = PendingCall(
                        clean_text(chunk.call_id or f"call_{uuid.uuid4().hex[:24]}"),
                        clean_text(chunk.name or ""),
                    )
                    step.calls[chunk.index] = call
                    yield ev.tool_input_start(call.call_id, call.name)
                    open_blocks.append(ev.tool_output_error(call.call_id, "turn ended"))
                if chunk.arguments:
                    call.arguments += chunk.arguments
                    yield ev.tool_input_delta(call.call_id, chunk.arguments)
            elif isinstance(chunk, UsageChunk):
                outcome.usage = ev.add_usage(outcome.usage, ev.usage(chunk.usage))
    finally:
        await chunks.aclose()
    if step.text_block is not None:
        piece = step.cleaner.flush()
        if piece:
            step.text.append(piece)
            yield ev.text_delta(step.text_block, piece)
        open_blocks.remove(ev.text_end(step.text_block))
        yield ev.text_end(step.text_block)
    text = "".join(step.text)
    ordered = [step.calls[i] for i in sorted(step.calls)]
    for c in ordered:  # model output: stored, so made storable (ids and names already are)
        c.arguments = clean_text(c.arguments)
    assistant: Message = {"role": "assistant", "content": text or None}
    if ordered:
        assistant["tool_calls"] = [
            {
                "id": c.call_id,
                "type": "function",
                "function": {"name": c.name, "arguments": c.arguments},
            }
            for c in ordered
        ]
    else:
        assistant["content"] = text
    host.ctxmgr.record(run_id, [assistant])
    if ordered:
        parsed: list[Any] = []
        for call in ordered:
            try:
                value = json.loads(call.arguments) if call.arguments.strip() else {}
            except json.JSONDecodeError:
                value = call.arguments
            parsed.append(value)
            yield ev.tool_input_available(call.call_id, call.name, value)
        await watch.checkpoint()  # no tool runs after a deadline, even one a driver dropped
        results = await until_cancelled(
            asyncio.gather(
                *(call_tool(host.tools, c, a) for c, a in zip(ordered, parsed, strict=True))
            ),
            cancel_token,
        )
        tool_messages: list[Message] = []
        for call, (ok, value, content) in zip(ordered, results, strict=True):
            open_blocks.remove(ev.tool_output_error(call.call_id, "turn ended"))
            if ok:
                yield ev.tool_output_available(call.call_id, value)
            else:
                yield ev.tool_output_error(call.call_id, content)
                content = f"Error: {content}"
            tool_messages.append({"role": "tool", "tool_call_id": call.call_id, "content": content})
        host.ctxmgr.record(run_id, tool_messages)
    open_blocks.remove(ev.finish_step())
    yield ev.finish_step()
    outcome.text = text


async def call_tool(
    tools: Mapping[str, Tool], call: PendingCall, arguments: Any
) -> tuple[bool, Any, str]:
    """``(ok, output, text)``: the event's output and the tool message's text, or
    ``(False, None, error)``. A tool's failure (bad arguments, an exception, a result
    that is not JSON) is reported to the model, never raised out of the turn."""
    tool = tools.get(call.name)
    if tool is None:
        return False, None, f"unknown tool {call.name!r}"
    if not isinstance(arguments, dict):
        return False, None, f"tool arguments are not a JSON object: {call.arguments[:200]!r}"
    try:
        output, text = tool_result(await tool.call(arguments))
    except Exception as exc:
        return False, None, error_text(exc)
    return True, output, text


async def until_cancelled(awaitable: Any, cancel_token: CancelToken | None) -> Any:
    """Await ``awaitable`` unless ``cancel_token`` is set first (then raise Cancelled)."""
    if cancel_token is None:
        return await awaitable
    if cancel_token.is_set():
        if asyncio.iscoroutine(awaitable):
            awaitable.close()
        raise Cancelled
    work = asyncio.ensure_future(awaitable)
    waiter = asyncio.ensure_future(cancel_token.wait())
    try:
        await asyncio.wait({work, waiter}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        # Our task was cancelled: the work must end first, since the caller goes on to close
        # the generator it may still be iterating.
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        raise
    finally:
        waiter.cancel()
    if work.done():
        return work.result()
    work.cancel()
    with suppress(asyncio.CancelledError, Exception):
        await work
    raise Cancelled
