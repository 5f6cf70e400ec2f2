"""The AI SDK's own client reads vel's streams: the real `ai` npm package, 5.x and 6.x.

Five turns (text, tool, failing tool, provider error, cancelled) are streamed through
``vel.sse_stream`` and handed to tests/js/check_stream.mjs, which validates every chunk with
the package's ``uiMessageChunkSchema``, reads the response through ``DefaultChatTransport``
(what ``useChat`` uses: it fails on the first chunk the schema refuses) and rebuilds the
message with ``readUIMessageStream``. The packages are installed from tests/js/package-lock.json
on first use (``npm ci``), so CI needs only Node 18+ and the npm registry.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aisdk
import pytest
from conftest import model_for

from vel import Agent
from vel.sse import DONE, UI_MESSAGE_STREAM_HEADERS, sse_stream
from vel.testing import FakeOpenAIServer

ADD_1_2 = '[[call add {"a": 1, "b": 2}]]'


@pytest.fixture(scope="module")
def node_packages() -> dict[str, str]:
    """tests/js's locked `ai` packages, installed on first use: alias -> version."""
    try:
        return aisdk.install()
    except RuntimeError as exc:
        pytest.fail(str(exc))


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def fail(reason: str) -> str:
    """Always fails."""
    raise ValueError(reason)


async def sse_text(events: AsyncIterator[dict[str, Any]]) -> str:
    return b"".join([frame async for frame in sse_stream(events)]).decode()


async def cancelled_at_first_text(agent: Agent, message: str) -> AsyncIterator[dict[str, Any]]:
    """A turn whose cancel token is set as soon as its answer starts streaming."""
    token = asyncio.Event()
    async for event in agent.run_stream({"message": message}, cancel_token=token):
        if event["type"] == "text-delta":
            token.set()
        yield event


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The five streams as SSE bodies, and the events each carried."""

    async def record() -> dict[str, str]:
        with FakeOpenAIServer() as srv:
            async with Agent(id="ui", model=model_for(srv), tools=[add, fail]) as agent:

                def turn(message: str) -> AsyncIterator[dict[str, Any]]:
                    return agent.run_stream({"message": message})

                return {
                    "text": await sse_text(turn("hello there")),
                    "tool": await sse_text(turn(ADD_1_2)),
                    "failing_tool": await sse_text(turn('[[call fail {"reason": "boom"}]]')),
                    "provider_error": await sse_text(turn("[[error 400]]")),
                    "cancelled": await sse_text(
                        cancelled_at_first_text(agent, f"[[slow 0.05]] {ADD_1_2}")
                    ),
                }

    streams = asyncio.run(record())
    path = tmp_path_factory.mktemp("ui") / "streams.json"
    path.write_text(json.dumps({"headers": dict(UI_MESSAGE_STREAM_HEADERS), "streams": streams}))
    events = {
        name: [json.loads(frame[6:]) for frame in body.split("\n\n")[:-2]]
        for name, body in streams.items()
    }
    return {"path": path, "streams": streams, "events": events}


@pytest.fixture(scope="module", params=sorted(aisdk.PACKAGES))
def client_view(
    request: pytest.FixtureRequest, node_packages: dict[str, str], recorded: dict[str, Any]
) -> dict[str, Any]:
    """What the AI SDK's client made of each stream (see tests/js/check_stream.mjs)."""
    view: dict[str, Any] = aisdk.run("check_stream.mjs", request.param, str(recorded["path"]))
    return view


STREAMS = ["text", "tool", "failing_tool", "provider_error", "cancelled"]


def test_the_packages_are_the_versions_under_test(node_packages: dict[str, str]) -> None:
    assert set(node_packages) == set(aisdk.PACKAGES)


def test_streams_are_sse_ending_with_done(recorded: dict[str, Any]) -> None:
    for name in STREAMS:
        body: str = recorded["streams"][name]
        assert body.endswith(DONE.decode()), name
        assert all(frame.startswith("data: ") for frame in body.split("\n\n") if frame), name


@pytest.mark.parametrize("name", STREAMS)
def test_every_chunk_passes_the_sdks_schema(
    client_view: dict[str, Any], recorded: dict[str, Any], name: str
) -> None:
    chunks = client_view[name]["chunks"]
    assert [c["type"] for c in chunks] == [e["type"] for e in recorded["events"][name]]
    refused = [c for c in chunks if not c["valid"]]
    assert refused == []


@pytest.mark.parametrize("name", ["text", "tool", "failing_tool", "cancelled"])
def test_the_transport_reads_the_whole_stream_without_error(
    client_view: dict[str, Any], name: str
) -> None:
    assert client_view[name]["errors"] == []


def parts(message: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [p for p in message["parts"] if p["type"] == kind]


def usage_of(events: list[dict[str, Any]]) -> dict[str, Any]:
    finish = events[-1]
    assert finish["type"] == "finish"
    usage: dict[str, Any] = finish["messageMetadata"]["usage"]
    return usage


def test_text_turn_rebuilds_its_answer_and_usage(
    client_view: dict[str, Any], recorded: dict[str, Any]
) -> None:
    message = client_view["text"]["message"]
    events = recorded["events"]["text"]
    assert message["id"] == events[0]["messageId"]
    assert message["role"] == "assistant"
    assert [p["text"] for p in parts(message, "text")] == ["You said: hello there"]
    assert len(parts(message, "step-start")) == 1
    usage = usage_of(events)
    assert usage["totalTokens"] == usage["inputTokens"] + usage["outputTokens"] > 0
    assert message["metadata"] == {"usage": usage}


def test_tool_turn_rebuilds_the_tool_part_then_the_answer(
    client_view: dict[str, Any], recorded: dict[str, Any]
) -> None:
    message = client_view["tool"]["message"]
    [tool] = parts(message, "tool-add")
    call_id = next(
        e["toolCallId"] for e in recorded["events"]["tool"] if e["type"] == "tool-input-start"
    )
    assert tool["toolCallId"] == call_id
    assert (tool["state"], tool["input"], tool["output"]) == (
        "output-available",
        {"a": 1, "b": 2},
        3,
    )
    assert [p["text"] for p in parts(message, "text")] == ["Tool results: 3"]
    assert len(parts(message, "step-start")) == 2
    assert message["metadata"] == {"usage": usage_of(recorded["events"]["tool"])}


def test_failing_tool_is_an_output_error_part_and_the_model_still_answers(
    client_view: dict[str, Any], recorded: dict[str, Any]
) -> None:
    message = client_view["failing_tool"]["message"]
    [tool] = parts(message, "tool-fail")
    assert tool["state"] == "output-error"
    assert "boom" in tool["errorText"]
    assert [p["text"] for p in parts(message, "text")] == ["Tool results: Error: ValueError: boom"]
    assert message["metadata"] == {"usage": usage_of(recorded["events"]["failing_tool"])}


def test_provider_error_reaches_the_client_as_its_error(
    client_view: dict[str, Any], recorded: dict[str, Any]
) -> None:
    view = client_view["provider_error"]
    error_text = recorded["events"]["provider_error"][-1]["errorText"]
    assert "400" in error_text
    assert view["errors"] == [{"name": "Error", "message": error_text}]
    assert parts(view["message"], "text") == []


def test_cancelled_turn_keeps_what_streamed_and_the_usage_spent(
    client_view: dict[str, Any], recorded: dict[str, Any]
) -> None:
    events = recorded["events"]["cancelled"]
    assert [e["type"] for e in events[-2:]] == ["abort", "finish"]
    message = client_view["cancelled"]["message"]
    [tool] = parts(message, "tool-add")
    assert (tool["state"], tool["output"]) == ("output-available", 3)
    [text] = parts(message, "text")
    streamed = "".join(e["delta"] for e in events if e["type"] == "text-delta")
    assert text["text"] == streamed and "Tool results: 3".startswith(streamed)
    assert text["state"] == "done"  # the abort closed the open text block
    assert message["metadata"] == {"usage": usage_of(events)}
