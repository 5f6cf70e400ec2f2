"""Agent turns through the real openai SDK against FakeOpenAIServer: the event stream's
invariants, tools, failures, cancellation, concurrency and what each turn stores."""

from __future__ import annotations

import asyncio
import gc
import itertools
import warnings
from typing import Any

import pytest
from conftest import model_for

import vel
import vel.providers
from vel import Agent
from vel.testing import FakeOpenAIServer

Event = dict[str, Any]

CONTENT_EVENTS = {
    "text-start",
    "text-delta",
    "text-end",
    "tool-input-start",
    "tool-input-delta",
    "tool-input-available",
    "tool-output-available",
    "tool-output-error",
}


def assert_stream_invariants(events: list[Event]) -> None:
    """Check the shape every ``run_stream`` must have, whatever happened in the turn."""
    types = [e["type"] for e in events]
    assert types, "the stream is empty"
    assert types[0] == "start", types
    assert types.count("start") == 1, types
    terminals = [i for i, t in enumerate(types) if t in ("finish", "error")]
    assert terminals == [len(types) - 1], f"exactly one terminal event, last: {types}"
    in_step = False
    open_text: set[str] = set()
    seen_text: set[str] = set()
    open_tools: dict[str, str] = {}  # toolCallId -> toolName
    seen_tools: set[str] = set()
    for i, event in enumerate(events):
        kind = event["type"]
        if kind in CONTENT_EVENTS:
            assert in_step, f"{kind} outside a step at {i}: {types}"
        if kind == "start-step":
            assert not in_step, f"nested start-step at {i}: {types}"
            in_step = True
        elif kind == "finish-step":
            assert in_step, f"finish-step without start-step at {i}: {types}"
            assert not open_text, f"step {i} ends with open text blocks {open_text}"
            in_step = False
        elif kind == "text-start":
            assert event["id"] not in seen_text, f"text block {event['id']} started twice"
            seen_text.add(event["id"])
            open_text.add(event["id"])
        elif kind == "text-delta":
            assert event["id"] in open_text, f"text-delta outside its block at {i}"
            assert isinstance(event["delta"], str)
        elif kind == "text-end":
            assert event["id"] in open_text, f"text-end without text-start at {i}"
            open_text.remove(event["id"])
        elif kind == "tool-input-start":
            call_id = event["toolCallId"]
            assert call_id not in seen_tools, f"tool call {call_id} started twice"
            seen_tools.add(call_id)
            open_tools[call_id] = event["toolName"]
        elif kind in ("tool-input-delta", "tool-input-available"):
            assert event["toolCallId"] in open_tools, f"{kind} for a call not open at {i}"
        elif kind in ("tool-output-available", "tool-output-error"):
            assert event["toolCallId"] in open_tools, f"{kind} for a call not open at {i}"
            del open_tools[event["toolCallId"]]
        elif kind == "abort":
            assert types[i + 1 :] == ["finish"], f"abort must be followed by finish only: {types}"
    assert not in_step, f"a step is left open: {types}"
    assert not open_text, f"text blocks left open: {open_text}"
    assert not open_tools, f"tool calls never closed: {open_tools}"


def types_of(events: list[Event]) -> list[str]:
    return [e["type"] for e in events]


def text_of(events: list[Event]) -> str:
    return "".join(e["delta"] for e in events if e["type"] == "text-delta")


async def collect(
    agent: Agent, message: str, session_id: str | None = None, **kw: Any
) -> list[Event]:
    return [e async for e in agent.run_stream({"message": message}, session_id=session_id, **kw)]


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def fail(reason: str) -> str:
    """Always fails."""
    raise ValueError(reason)


HISTORY = [
    {"role": "user", "content": "My name is Alice"},
    {"role": "assistant", "content": "Hello Alice"},
]


# -- the checker itself ------------------------------------------------------------------


S, F = {"type": "start", "messageId": "m"}, {"type": "finish"}
SS, FS = {"type": "start-step"}, {"type": "finish-step"}


@pytest.mark.parametrize(
    "events",
    [
        pytest.param([SS, FS, F], id="no-start"),
        pytest.param([S, SS, FS], id="no-terminal"),
        pytest.param([S, F, F], id="two-terminals"),
        pytest.param([S, {"type": "error", "errorText": "x"}, SS], id="event-after-error"),
        pytest.param([S, SS, SS, FS, FS, F], id="nested-steps"),
        pytest.param([S, SS, F], id="open-step"),
        pytest.param(
            [S, SS, {"type": "text-start", "id": "a"}, FS, F],
            id="unclosed-text",
        ),
        pytest.param(
            [S, SS, {"type": "text-delta", "id": "a", "delta": "x"}, FS, F],
            id="delta-outside-block",
        ),
        pytest.param(
            [S, SS, {"type": "tool-input-start", "toolCallId": "c", "toolName": "t"}, FS, F],
            id="unclosed-tool",
        ),
        pytest.param(
            [S, SS, {"type": "tool-output-error", "toolCallId": "c", "errorText": "e"}, FS, F],
            id="tool-output-without-start",
        ),
        pytest.param([S, {"type": "abort"}, SS, FS, F], id="abort-not-before-finish"),
    ],
)
def test_invariant_checker_rejects_broken_streams(events: list[Event]) -> None:
    with pytest.raises(AssertionError):
        assert_stream_invariants(events)


# -- well-formed streams -----------------------------------------------------------------


async def test_plain_text_answer_is_one_step_with_one_text_block(srv: FakeOpenAIServer) -> None:
    async with Agent(id="t", model=model_for(srv)) as agent:
        events = await collect(agent, "hello there")
    assert_stream_invariants(events)
    assert types_of(events).count("start-step") == 1
    assert types_of(events).count("text-start") == 1
    assert text_of(events) == "You said: hello there"
    usage = {"inputTokens": 2, "outputTokens": 4, "totalTokens": 6}
    assert events[-1] == {"type": "finish", "messageMetadata": {"usage": usage}}


async def test_one_tool_call_streams_input_output_then_answer(srv: FakeOpenAIServer) -> None:
    async with Agent(id="t", model=model_for(srv), tools=[add]) as agent:
        events = await collect(agent, '[[call add {"a": 1, "b": 2}]]')
    assert_stream_invariants(events)
    available = [e for e in events if e["type"] == "tool-input-available"]
    assert [(e["toolName"], e["input"]) for e in available] == [("add", {"a": 1, "b": 2})]
    outputs = [e for e in events if e["type"] == "tool-output-available"]
    assert [(e["toolCallId"], e["output"]) for e in outputs] == [(available[0]["toolCallId"], 3)]
    assert types_of(events).count("start-step") == 2
    assert text_of(events) == "Tool results: 3"


async def test_two_sequential_tool_calls_take_one_step_each(srv: FakeOpenAIServer) -> None:
    async with Agent(id="t", model=model_for(srv), tools=[add]) as agent:
        events = await collect(agent, '[[call add {"a": 1, "b": 2}]] [[call add {"a": 3, "b": 4}]]')
    assert_stream_invariants(events)
    assert types_of(events).count("start-step") == 3
    outputs = [e["output"] for e in events if e["type"] == "tool-output-available"]
    assert outputs == [3, 7]
    assert text_of(events) == "Tool results: 3; 7"
    assert len(srv.requests) == 3


async def test_parallel_tool_calls_share_one_step_and_run_concurrently(
    srv: FakeOpenAIServer,
) -> None:
    both_running = asyncio.Barrier(2)

    async def meet(name: str) -> str:
        """Wait until the other call is running too."""
        async with asyncio.timeout(2):
            await both_running.wait()
        return f"met {name}"

    async with Agent(id="t", model=model_for(srv), tools=[meet]) as agent:
        message = '[[parallel]] [[call meet {"name": "x"}]] [[call meet {"name": "y"}]]'
        events = await collect(agent, message)
    assert_stream_invariants(events)
    first_step = types_of(events)[: types_of(events).index("finish-step")]
    assert first_step.count("tool-input-start") == 2
    outputs = [e["output"] for e in events if e["type"] == "tool-output-available"]
    assert outputs == ["met x", "met y"]
    assert text_of(events) == "Tool results: met x; met y"


async def test_failing_tool_is_reported_and_the_model_still_answers(
    srv: FakeOpenAIServer,
) -> None:
    async with Agent(id="t", model=model_for(srv), tools=[fail]) as agent:
        events = await collect(agent, '[[call fail {"reason": "boom"}]]', session_id="s")
        stored = await agent.ctxmgr.aget_session_context("s")
    assert_stream_invariants(events)
    errors = [e["errorText"] for e in events if e["type"] == "tool-output-error"]
    assert len(errors) == 1 and "boom" in errors[0]
    assert text_of(events) == "Tool results: Error: ValueError: boom"
    assert events[-1]["type"] == "finish"
    assert [m["role"] for m in stored] == ["user", "assistant", "tool", "assistant"]


async def test_tool_turn_is_stored_in_openai_format(srv: FakeOpenAIServer) -> None:
    async with Agent(id="t", model=model_for(srv), tools=[add]) as agent:
        await agent.run({"message": '[[call add {"a": 1, "b": 2}]]'}, session_id="s")
        stored = await agent.ctxmgr.aget_session_context("s")
    user, call, result, answer = stored
    assert user == {"role": "user", "content": '[[call add {"a": 1, "b": 2}]]'}
    assert call["role"] == "assistant"
    assert call.get("content") is None
    [tool_call] = call["tool_calls"]
    assert tool_call["type"] == "function"
    assert tool_call["function"] == {"name": "add", "arguments": '{"a": 1, "b": 2}'}
    assert result == {"role": "tool", "tool_call_id": tool_call["id"], "content": "3"}
    assert answer == {"role": "assistant", "content": "Tool results: 3"}


async def test_next_turn_sends_stored_tool_messages_back(srv: FakeOpenAIServer) -> None:
    async with Agent(id="t", model=model_for(srv), tools=[add]) as agent:
        await agent.run({"message": '[[call add {"a": 1, "b": 2}]]'}, session_id="s")
        stored = await agent.ctxmgr.aget_session_context("s")
        await agent.run({"message": "thanks"}, session_id="s")
    assert srv.requests[-1]["messages"] == [*stored, {"role": "user", "content": "thanks"}]


async def test_max_steps_policy_stops_the_tool_loop(srv: FakeOpenAIServer) -> None:
    calls: list[tuple[int, int]] = []

    def tally(a: int, b: int) -> int:
        calls.append((a, b))
        return a + b

    policies = {"max_steps": 1}
    async with Agent(id="t", model=model_for(srv), tools=[tally], policies=policies) as agent:
        events = await collect(
            agent, '[[call tally {"a": 1, "b": 2}]] [[call tally {"a": 3, "b": 4}]]'
        )
    assert_stream_invariants(events)
    assert len(srv.requests) == 1
    assert calls == [(1, 2)]
    assert types_of(events).count("start-step") == 1
    assert events[-1]["type"] == "finish"


# -- failures -----------------------------------------------------------------------------


async def test_provider_http_error_ends_the_stream_with_one_error(srv: FakeOpenAIServer) -> None:
    async with Agent(id="t", model=model_for(srv)) as agent:
        await agent.ctxmgr.aset_session_context("s", HISTORY)
        events = await collect(agent, "[[error 400]]", session_id="s")
        stored = await agent.ctxmgr.aget_session_context("s")
    assert_stream_invariants(events)
    assert types_of(events).count("error") == 1
    assert events[-1]["type"] == "error"
    assert "400" in events[-1]["errorText"]
    assert "finish" not in types_of(events)
    assert stored == HISTORY


async def test_provider_http_error_makes_run_raise_provider_error(srv: FakeOpenAIServer) -> None:
    async with Agent(id="t", model=model_for(srv)) as agent:
        await agent.ctxmgr.aset_session_context("s", HISTORY)
        with pytest.raises(vel.ProviderError, match="400"):
            await agent.run({"message": "[[error 400]]"}, session_id="s")
        assert await agent.ctxmgr.aget_session_context("s") == HISTORY


async def test_cancel_token_set_mid_answer_aborts_and_stores_nothing(
    srv: FakeOpenAIServer,
) -> None:
    token = asyncio.Event()
    events: list[Event] = []
    async with Agent(id="t", model=model_for(srv)) as agent:
        await agent.ctxmgr.aset_session_context("s", HISTORY)
        message = "[[slow 0.05]] one two three four five six seven"
        async for event in agent.run_stream(
            {"message": message}, session_id="s", cancel_token=token
        ):
            events.append(event)
            if event["type"] == "text-delta":
                token.set()
        stored = await agent.ctxmgr.aget_session_context("s")
    assert_stream_invariants(events)
    assert types_of(events)[-2:] == ["abort", "finish"]
    assert types_of(events).count("text-delta") == 1
    assert stored == HISTORY


async def test_run_with_a_set_cancel_token_raises_turn_cancelled(srv: FakeOpenAIServer) -> None:
    token = asyncio.Event()
    token.set()
    async with Agent(id="t", model=model_for(srv)) as agent:
        await agent.ctxmgr.aset_session_context("s", HISTORY)
        with pytest.raises(vel.TurnCancelledError):
            await agent.run({"message": "hello"}, session_id="s", cancel_token=token)
        assert await agent.ctxmgr.aget_session_context("s") == HISTORY


@pytest.mark.parametrize("close_after", [2, 4], ids=["before-request", "mid-answer"])
async def test_closing_the_stream_early_stores_nothing(
    srv: FakeOpenAIServer, close_after: int
) -> None:
    async with Agent(id="t", model=model_for(srv)) as agent:
        await agent.ctxmgr.aset_session_context("s", HISTORY)
        stream = agent.run_stream({"message": "[[slow 0.05]] a b c d e f"}, session_id="s")
        seen = [await anext(stream) for _ in range(close_after)]
        await stream.aclose()
        assert seen[-1]["type"] != "finish"
        assert await agent.ctxmgr.aget_session_context("s") == HISTORY


@pytest.mark.parametrize("close_after", [2, 4], ids=["before-request", "mid-answer"])
async def test_agent_keeps_working_after_a_stream_is_closed_early(
    srv: FakeOpenAIServer, close_after: int
) -> None:
    async with Agent(id="t", model=model_for(srv)) as agent:
        stream = agent.run_stream({"message": "[[slow 0.05]] a b c d e f"}, session_id="s")
        for _ in range(close_after):
            await anext(stream)
        await stream.aclose()
        answer = await agent.run({"message": "still there?"}, session_id="s")
        stored = await agent.ctxmgr.aget_session_context("s")
    assert answer == "You said: still there?"
    assert stored == [
        {"role": "user", "content": "still there?"},
        {"role": "assistant", "content": answer},
    ]


async def test_closing_the_stream_releases_the_session_at_once(srv: FakeOpenAIServer) -> None:
    # lock_timeout=0: a turn of the same session fails at once if the closed one still holds it.
    policies = {"lock_timeout": 0}
    async with Agent(id="t", model=model_for(srv), policies=policies) as agent:
        stream = agent.run_stream({"message": "[[slow 0.05]] a b c d e f"}, session_id="s")
        async for event in stream:
            if event["type"] == "text-delta":
                break
        await stream.aclose()
        assert await agent.run({"message": "next"}, session_id="s") == "You said: next"


async def test_a_stream_dropped_mid_answer_is_closed_by_vel(srv: FakeOpenAIServer) -> None:
    """A stream nobody closes and nobody references ends its turn in a task of vel's own
    (vel._asyncgens): the session is released and nothing of the turn is stored."""
    async with Agent(id="t", model=model_for(srv), policies={"lock_timeout": 0}) as agent:
        await agent.ctxmgr.aset_session_context("s", HISTORY)
        stream = agent.run_stream({"message": "[[slow 0.05]] a b c d e f"}, session_id="s")
        async for event in stream:
            if event["type"] == "text-delta":
                break
        del stream
        gc.collect()
        await asyncio.sleep(0)  # the finalizer's callback makes the task
        closing = [t for t in asyncio.all_tasks() if t.get_name() == "vel stream close"]
        assert len(closing) == 1
        await asyncio.wait_for(closing[0], 5)
        assert await agent.ctxmgr.aget_session_context("s") == HISTORY
        assert await agent.run({"message": "next"}, session_id="s") == "You said: next"


@pytest.mark.parametrize("with_token", [False, True], ids=["no-token", "with-token"])
async def test_cancelling_the_consuming_task_raises_cancelled_and_stores_nothing(
    srv: FakeOpenAIServer, with_token: bool
) -> None:
    token = asyncio.Event() if with_token else None
    answering = asyncio.Event()

    async def consume(agent: Agent) -> None:
        message = {"message": "[[slow 0.05]] a b c d e f"}
        async for event in agent.run_stream(message, session_id="s", cancel_token=token):
            if event["type"] == "text-delta":
                answering.set()

    async with Agent(id="t", model=model_for(srv), policies={"lock_timeout": 0}) as agent:
        await agent.ctxmgr.aset_session_context("s", HISTORY)
        task = asyncio.create_task(consume(agent))
        await answering.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await agent.ctxmgr.aget_session_context("s") == HISTORY
        assert await agent.run({"message": "next"}, session_id="s") == "You said: next"


# -- concurrency and input forms ------------------------------------------------------------


async def test_concurrent_streams_on_one_agent_stay_separate(srv: FakeOpenAIServer) -> None:
    order: list[str] = []

    async def consume(agent: Agent, label: str, session_id: str) -> list[Event]:
        events: list[Event] = []
        message = f"[[slow 0.01]] [[say {label} one two three four five]]"
        async for event in agent.run_stream({"message": message}, session_id=session_id):
            order.append(label)
            events.append(event)
        return events

    async with Agent(id="t", model=model_for(srv)) as agent:
        alpha, beta = await asyncio.gather(
            consume(agent, "alpha", "s-alpha"), consume(agent, "beta", "s-beta")
        )
        stored_alpha = await agent.ctxmgr.aget_session_context("s-alpha")
        stored_beta = await agent.ctxmgr.aget_session_context("s-beta")
    switches = sum(1 for a, b in itertools.pairwise(order) if a != b)
    assert switches >= 3, "the two turns did not overlap"
    for label, events, stored in (("alpha", alpha, stored_alpha), ("beta", beta, stored_beta)):
        assert_stream_invariants(events)
        assert text_of(events) == f"{label} one two three four five"
        assert [m["role"] for m in stored] == ["user", "assistant"]
        assert stored[1]["content"] == f"{label} one two three four five"
        assert label in stored[0]["content"]


async def test_messages_input_loads_and_stores_nothing(srv: FakeOpenAIServer) -> None:
    given = [{"role": "user", "content": "What is my name?"}]
    async with Agent(id="t", model=model_for(srv)) as agent:
        await agent.ctxmgr.aset_session_context("s", HISTORY)
        answer = await agent.run({"messages": given}, session_id="s")
        stored = await agent.ctxmgr.aget_session_context("s")
    assert answer == "I don't know your name."
    assert srv.requests[-1]["messages"] == given
    assert stored == HISTORY


async def test_messages_input_carries_its_own_history(srv: FakeOpenAIServer) -> None:
    given = [*HISTORY, {"role": "user", "content": "What is my name?"}]
    async with Agent(id="t", model=model_for(srv)) as agent:
        answer = await agent.run({"messages": given})
    assert answer == "Your name is Alice."


@pytest.mark.parametrize("bad_input", [{}, {"message": 42}, {"messages": "hi"}, "hi"])
async def test_invalid_input_is_an_error_event(srv: FakeOpenAIServer, bad_input: Any) -> None:
    async with Agent(id="t", model=model_for(srv)) as agent:
        events = [e async for e in agent.run_stream(bad_input, session_id="s")]
        with pytest.raises(vel.InvalidInputError):
            await agent.run(bad_input)
    assert_stream_invariants(events)
    assert events[-1]["type"] == "error"
    assert srv.requests == []


# -- model configuration --------------------------------------------------------------------


async def test_openai_env_vars_are_used_when_the_model_dict_has_neither(
    srv: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", srv.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "key-from-env")
    async with Agent(id="t", model={"provider": "openai", "model": "gpt-4o"}) as agent:
        answer = await agent.run({"message": "hi"})
    assert answer == "You said: hi"
    assert srv.request_headers[-1]["authorization"] == "Bearer key-from-env"
    assert srv.requests[-1]["model"] == "gpt-4o"


async def test_missing_api_key_fails_at_the_first_run_not_at_construction(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    agent = Agent(id="t", model={"provider": "openai", "model": "gpt-4o"})
    try:
        with pytest.raises(vel.ConfigurationError, match="OPENAI_API_KEY"):
            await agent.run({"message": "hi"}, session_id="s")
        assert await agent.ctxmgr.aget_session_context("s") == []
    finally:
        await agent.aclose()


def test_agent_driven_by_successive_asyncio_runs_leaves_later_loops_undisturbed(
    srv: FakeOpenAIServer,
) -> None:
    agent = Agent(id="t", model=model_for(srv))
    assert asyncio.run(agent.run({"message": "one"})) == "You said: one"
    assert asyncio.run(agent.run({"message": "two"})) == "You said: two"
    problems: list[dict[str, Any]] = []

    async def later_loop() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _, ctx: problems.append(ctx))
        await agent.aclose()  # forgets the clients of the finished loops
        gc.collect()
        await asyncio.sleep(0.05)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        asyncio.run(later_loop())
    assert problems == []


def test_unknown_provider_is_a_configuration_error() -> None:
    with pytest.raises(vel.ConfigurationError):
        Agent(id="t", model={"provider": "nobody", "model": "m"})


async def test_system_prompt_is_sent_first_and_generation_config_passed(
    srv: FakeOpenAIServer,
) -> None:
    agent = Agent(
        id="t",
        model=model_for(srv),
        system_prompt="Be brief.",
        generation_config={"temperature": 0.2},
    )
    async with agent:
        await agent.run({"message": "hi"}, session_id="s")
    request = srv.requests[-1]
    assert request["messages"][0] == {"role": "system", "content": "Be brief."}
    assert request["temperature"] == 0.2


class _BrokenProvider:
    """A provider with a bug: it fails with a non-vel exception mid-stream."""

    async def stream(self, messages: Any, tools: Any, config: Any) -> Any:
        yield vel.providers.TextChunk("partial ")
        raise RuntimeError("provider bug")

    async def aclose(self) -> None:
        return None


async def test_an_unexpected_exception_still_ends_the_stream_with_one_error() -> None:
    agent = Agent(id="broken", model={"provider": "openai", "model": "m", "api_key": "k"})
    agent.provider = _BrokenProvider()
    events = [e async for e in agent.run_stream({"message": "hi"}, session_id="s")]
    assert_stream_invariants(events)
    assert events[-1] == {"type": "error", "errorText": "RuntimeError: provider bug"}
    assert await agent.ctxmgr.aget_session_context("s") == []
    with pytest.raises(RuntimeError, match="provider bug"):
        await agent.run({"message": "hi"}, session_id="s")
