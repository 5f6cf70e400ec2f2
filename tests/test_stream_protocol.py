"""run_stream speaks the AI SDK UI message stream protocol: only chunk types the SDK knows,
token usage as message metadata with the SDK's field names, and SSE framing by vel.sse.
(tests/test_ai_sdk_stream.py feeds the same streams to the SDK's own client.)"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from conftest import model_for

from vel import Agent
from vel import events as ev
from vel.sse import DONE, UI_MESSAGE_STREAM_HEADERS, encode_event, sse_stream
from vel.testing import FakeOpenAIServer

# Every chunk type of uiMessageChunkSchema in `ai` 5 and 6 (src/ui-message-stream/
# ui-message-chunks.ts), apart from the data-* family.
AI_SDK_CHUNK_TYPES = {
    "text-start",
    "text-delta",
    "text-end",
    "error",
    "tool-input-start",
    "tool-input-delta",
    "tool-input-available",
    "tool-input-error",
    "tool-approval-request",
    "tool-output-available",
    "tool-output-error",
    "tool-output-denied",
    "reasoning-start",
    "reasoning-delta",
    "reasoning-end",
    "source-url",
    "source-document",
    "file",
    "start-step",
    "finish-step",
    "start",
    "finish",
    "abort",
    "message-metadata",
}


async def collect(agent: Agent, message: str, **kw: Any) -> list[dict[str, Any]]:
    return [e async for e in agent.run_stream({"message": message}, **kw)]


async def reported_usage(srv: FakeOpenAIServer, bodies: list[dict[str, Any]]) -> list[Any]:
    """What the server reports as usage for each of ``bodies``, asked again, unstreamed."""
    async with openai.AsyncOpenAI(api_key="test", base_url=srv.base_url) as client:
        usages = []
        for body in bodies:
            request = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
            usages.append((await client.chat.completions.create(**request)).usage)
        return usages


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


# -- usage -------------------------------------------------------------------------------


def test_openai_usage_becomes_the_sdks_language_model_usage() -> None:
    reported = {
        "prompt_tokens": 100,
        "completion_tokens": 30,
        "total_tokens": 130,
        "prompt_tokens_details": {"cached_tokens": 60, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 10},
    }
    assert ev.usage(reported) == {
        "inputTokens": 100,
        "outputTokens": 30,
        "totalTokens": 130,
        "cachedInputTokens": 60,
        "inputTokenDetails": {"cacheReadTokens": 60, "noCacheTokens": 40},
        "reasoningTokens": 10,
        "outputTokenDetails": {"reasoningTokens": 10, "textTokens": 20},
    }


def test_usage_leaves_out_what_the_provider_did_not_report() -> None:
    assert ev.usage({"prompt_tokens": 3, "completion_tokens": 4}) == {
        "inputTokens": 3,
        "outputTokens": 4,
        "totalTokens": 7,
    }
    assert ev.usage({"total_tokens": None, "prompt_tokens": True}) == {}


def test_usage_of_several_model_calls_is_summed_field_by_field() -> None:
    first = ev.usage({"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12})
    second = ev.usage(
        {
            "prompt_tokens": 20,
            "completion_tokens": 5,
            "total_tokens": 25,
            "prompt_tokens_details": {"cached_tokens": 8},
        }
    )
    total = ev.add_usage(ev.add_usage(None, first), second)
    assert total == {
        "inputTokens": 30,
        "outputTokens": 7,
        "totalTokens": 37,
        "cachedInputTokens": 8,
        "inputTokenDetails": {"cacheReadTokens": 8, "noCacheTokens": 12},
    }
    assert first == {"inputTokens": 10, "outputTokens": 2, "totalTokens": 12}  # not mutated


async def test_tool_turn_reports_the_sum_of_both_model_calls_in_finish_metadata(
    srv: FakeOpenAIServer,
) -> None:
    async with Agent(id="t", model=model_for(srv), tools=[add]) as agent:
        events = await collect(agent, '[[call add {"a": 1, "b": 2}]]')
    assert len(srv.requests) == 2
    first, second = await reported_usage(srv, srv.requests[:2])
    assert events[-1] == {
        "type": "finish",
        "messageMetadata": {
            "usage": {
                "inputTokens": first.prompt_tokens + second.prompt_tokens,
                "outputTokens": first.completion_tokens + second.completion_tokens,
                "totalTokens": first.total_tokens + second.total_tokens,
            }
        },
    }


async def test_every_event_is_a_chunk_type_the_ai_sdk_knows(srv: FakeOpenAIServer) -> None:
    def fail(reason: str) -> str:
        """Always fails."""
        raise ValueError(reason)

    async with Agent(id="t", model=model_for(srv), tools=[add, fail]) as agent:
        streams = [
            await collect(agent, "hello"),
            await collect(agent, '[[call add {"a": 1, "b": 2}]]'),
            await collect(agent, '[[call fail {"reason": "no"}]]'),
            await collect(agent, "[[error 400]]"),
        ]
    seen = {e["type"] for events in streams for e in events}
    assert seen <= AI_SDK_CHUNK_TYPES, seen - AI_SDK_CHUNK_TYPES
    assert "response-metadata" not in seen


async def test_an_error_after_a_model_call_still_reports_its_usage_first(
    srv: FakeOpenAIServer,
) -> None:
    def break_the_next_call(a: int, b: int) -> int:
        """Makes the model's next answer an HTTP 400."""
        srv.fail_next(400)
        return a + b

    async with Agent(id="t", model=model_for(srv), tools=[break_the_next_call]) as agent:
        events = await collect(agent, '[[call break_the_next_call {"a": 1, "b": 2}]]')
    [spent] = await reported_usage(srv, srv.requests[:1])
    assert [e["type"] for e in events[-2:]] == ["message-metadata", "error"]
    assert events[-2]["messageMetadata"]["usage"]["totalTokens"] == spent.total_tokens


async def test_a_failed_first_call_reports_no_usage(srv: FakeOpenAIServer) -> None:
    async with Agent(id="t", model=model_for(srv)) as agent:
        events = await collect(agent, "[[error 400]]")
    assert "message-metadata" not in [e["type"] for e in events]


async def test_a_cancelled_turn_reports_what_it_spent_in_finish(srv: FakeOpenAIServer) -> None:
    token = asyncio.Event()

    def cancel(a: int, b: int) -> int:
        """Cancels the turn."""
        token.set()
        return a + b

    async with Agent(id="t", model=model_for(srv), tools=[cancel]) as agent:
        events = await collect(agent, '[[call cancel {"a": 1, "b": 2}]]', cancel_token=token)
    assert [e["type"] for e in events[-2:]] == ["abort", "finish"]
    assert events[-1]["messageMetadata"]["usage"]["totalTokens"] > 0


# -- SSE framing -------------------------------------------------------------------------


def test_an_event_is_one_data_line_of_compact_json() -> None:
    event = ev.text_delta("b1", 'two\nlines "quoted" ✓')
    frame = encode_event(event)
    assert frame.startswith(b"data: ") and frame.endswith(b"\n\n")
    assert b"\n" not in frame[:-2] and b"\r" not in frame
    assert json.loads(frame[6:]) == event
    assert "✓".encode() in frame  # UTF-8, not \\u escapes


def test_an_event_json_cannot_carry_is_refused() -> None:
    with pytest.raises(ValueError):
        encode_event({"type": "tool-output-available", "toolCallId": "c", "output": float("nan")})


def test_headers_are_the_ai_sdks_ui_message_stream_headers() -> None:
    assert UI_MESSAGE_STREAM_HEADERS["x-vercel-ai-ui-message-stream"] == "v1"
    assert UI_MESSAGE_STREAM_HEADERS["content-type"] == "text/event-stream"


async def test_sse_stream_frames_a_turn_and_ends_with_done(srv: FakeOpenAIServer) -> None:
    async with Agent(id="t", model=model_for(srv)) as agent:
        frames = [f async for f in sse_stream(agent.run_stream({"message": "hi"}))]
    assert frames[-1] == DONE == b"data: [DONE]\n\n"
    events = [json.loads(f[6:]) for f in frames[:-1]]
    assert events[0]["type"] == "start" and events[-1]["type"] == "finish"


async def test_closing_the_sse_stream_early_closes_the_turn(srv: FakeOpenAIServer) -> None:
    closed = asyncio.Event()

    async def turn() -> AsyncIterator[dict[str, Any]]:
        try:
            yield ev.start("m")
            yield ev.start_step()
            await asyncio.sleep(60)
        finally:
            closed.set()

    frames = sse_stream(turn())
    assert json.loads((await anext(frames))[6:])["type"] == "start"
    await frames.aclose()  # what a server does when its client goes away
    assert closed.is_set()


@pytest.mark.parametrize("closable", [True, False], ids=["generator", "plain-iterable"])
async def test_the_sse_stream_lets_the_loop_run_between_frames(closable: bool) -> None:
    """A server learns that its client went away from a loop callback (the transport's
    connection_lost). Events that came in one burst (model deltas read in one network
    chunk) were framed and written with no loop turn between them: asyncio logged
    "socket.send() raised exception." once per write past the fifth after the disconnect
    (newuser: 10-30 lines per 20-40 disconnects under uvicorn), and the turn streamed on."""
    loop = asyncio.get_running_loop()

    async def burst() -> AsyncIterator[dict[str, Any]]:
        for i in range(5):
            yield ev.text_delta("t", str(i))

    class Plain:
        def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
            return burst()

    seen: list[int] = []
    ran: list[int] = []
    events: Any = burst() if closable else Plain()
    async for frame in sse_stream(events):
        if frame == DONE:
            break
        seen.append(len(seen))
        loop.call_soon(ran.append, seen[-1])  # as the transport schedules connection_lost
        # Each frame's callback has run by the time the next frame is handed out.
        assert ran == seen[:-1]
    assert len(seen) == 5
