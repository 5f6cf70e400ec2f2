"""Tools: JSON schemas from Python signatures and docstrings, spec dicts, and invocation."""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Literal, Optional

import pytest
from conftest import model_for

from vel import Agent, Tool, ToolError
from vel.testing import FakeOpenAIServer


def search_docs(
    query: str,
    limit: int = 5,
    threshold: float = 0.5,
    exact: bool = False,
    tags: list[str] | None = None,
    language: Optional[str] = None,  # noqa: UP045 - the spec's style must work too
    mode: Literal["fast", "deep"] = "fast",
) -> list[str]:
    """Search the documentation.

    Looks through every page.

    Args:
        query: The words to look for.
        limit (int): How many results at most.
        threshold: Minimum relevance score.
        exact: Match whole words only.
        tags: Only pages with one of these tags.
        language: Two-letter language code.
        mode: Search strategy.

    Returns:
        The matching page titles.
    """
    return []


def test_each_python_type_maps_to_its_json_schema_type() -> None:
    props = Tool.from_function(search_docs).parameters["properties"]
    assert props["query"]["type"] == "string"
    assert props["limit"]["type"] == "integer"
    assert props["threshold"]["type"] == "number"
    assert props["exact"]["type"] == "boolean"
    # Optional values may be null: the schema says so, as the model may send null.
    assert props["tags"]["anyOf"] == [
        {"type": "array", "items": {"type": "string"}},
        {"type": "null"},
    ]
    assert props["language"]["anyOf"] == [{"type": "string"}, {"type": "null"}]
    assert props["mode"] == {
        "type": "string",
        "enum": ["fast", "deep"],
        "default": "fast",
        "description": "Search strategy.",
    }
    assert (props["limit"]["default"], props["exact"]["default"], props["tags"]["default"]) == (
        5,
        False,
        None,
    )


def test_only_parameters_without_defaults_are_required() -> None:
    parameters = Tool.from_function(search_docs).parameters
    assert parameters["type"] == "object"
    assert parameters["required"] == ["query"]
    assert list(parameters["properties"]) == [
        "query",
        "limit",
        "threshold",
        "exact",
        "tags",
        "language",
        "mode",
    ]


def test_google_docstring_gives_argument_descriptions() -> None:
    props = Tool.from_function(search_docs).parameters["properties"]
    assert props["query"]["description"] == "The words to look for."
    assert props["limit"]["description"] == "How many results at most."
    assert props["mode"]["description"] == "Search strategy."


def test_docstring_summary_is_the_tool_description_without_sections() -> None:
    tool = Tool.from_function(search_docs)
    assert tool.name == "search_docs"
    assert tool.description.startswith("Search the documentation.")
    assert "Looks through every page." in tool.description
    assert "Args" not in tool.description
    assert "matching page titles" not in tool.description


def test_multi_line_argument_description_is_kept_whole() -> None:
    def book(room: str) -> str:
        """Book a meeting room.

        Args:
            room: The room's name, as printed on its door
                (for example "Blue 2").
                Note: names are case-sensitive.
        """
        return room

    description = Tool.from_function(book).parameters["properties"]["room"]["description"]
    assert description == (
        'The room\'s name, as printed on its door (for example "Blue 2"). '
        "Note: names are case-sensitive."
    )


def test_function_without_docstring_is_described_by_its_name() -> None:
    def ping(host):  # type: ignore[no-untyped-def]
        return host

    tool = Tool.from_function(ping)
    assert tool.description == "ping"
    assert tool.parameters["properties"] == {"host": {}}
    assert tool.parameters["required"] == ["host"]


def test_star_args_are_not_parameters() -> None:
    def log(message: str, *args: Any, **kwargs: Any) -> None:
        """Log a message."""

    assert list(Tool.from_function(log).parameters["properties"]) == ["message"]


def test_openai_schema_wraps_name_description_and_parameters() -> None:
    tool = Tool.from_function(search_docs)
    assert tool.openai_schema() == {
        "type": "function",
        "function": {
            "name": "search_docs",
            "description": tool.description,
            "parameters": tool.parameters,
        },
    }


PARAMS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


def weather(city: str) -> str:
    return f"sunny in {city}"


def test_flat_spec_dict_becomes_a_tool() -> None:
    spec = {
        "name": "get_weather",
        "description": "Weather now",
        "parameters": PARAMS,
        "handler": weather,
    }
    tool = Tool.from_spec(spec)
    assert (tool.name, tool.description, tool.parameters) == ("get_weather", "Weather now", PARAMS)
    assert tool.handler is weather


def test_openai_shaped_spec_dict_becomes_a_tool() -> None:
    spec = {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather now", "parameters": PARAMS},
        "handler": weather,
    }
    tool = Tool.from_spec(spec)
    assert tool.openai_schema() == {"type": "function", "function": spec["function"]}


def test_spec_dict_without_handler_is_rejected() -> None:
    with pytest.raises(ToolError, match="handler"):
        Tool.from_spec({"name": "get_weather", "parameters": PARAMS})


@pytest.mark.parametrize("name", ["", "has space", "x" * 65, None])
def test_spec_dict_with_invalid_name_is_rejected(name: object) -> None:
    with pytest.raises(ToolError):
        Tool.from_spec({"name": name, "handler": weather})


def test_two_tools_with_the_same_name_are_rejected() -> None:
    with pytest.raises(ToolError, match="weather"):
        Agent(id="a", model={"provider": "openai", "model": "m"}, tools=[weather, weather])


def test_function_and_spec_with_the_same_name_are_rejected() -> None:
    spec = {"name": "weather", "parameters": PARAMS, "handler": weather}
    with pytest.raises(ToolError, match="weather"):
        Agent(id="a", model={"provider": "openai", "model": "m"}, tools=[weather, spec])


def test_something_that_is_not_a_tool_is_rejected() -> None:
    with pytest.raises(ToolError):
        Agent(id="a", model={"provider": "openai", "model": "m"}, tools=[42])


async def test_sync_handler_runs_off_the_event_loop_thread() -> None:
    threads: list[int] = []

    def where(label: str) -> str:
        threads.append(threading.get_ident())
        return label

    assert await Tool.from_function(where).call({"label": "x"}) == "x"
    assert threads and threads[0] != threading.get_ident()


async def test_async_handler_is_awaited() -> None:
    async def later(value: int) -> int:
        await asyncio.sleep(0)
        return value * 2

    assert await Tool.from_function(later).call({"value": 21}) == 42


async def test_agent_calls_sync_and_async_tools_and_feeds_results_back(
    srv: FakeOpenAIServer,
) -> None:
    def add(a: int, b: int) -> int:
        """Add two numbers."""
        return a + b

    async def shout(text: str) -> str:
        """Upper-case some text."""
        return text.upper()

    async with Agent(id="t", model=model_for(srv), tools=[add, shout]) as agent:
        answer = await agent.run(
            {"message": '[[call add {"a": 2, "b": 3}]] [[call shout {"text": "hi"}]]'}
        )
    assert answer == "Tool results: 5; HI"
    sent = {t["function"]["name"] for t in srv.requests[0]["tools"]}
    assert sent == {"add", "shout"}


async def test_agent_accepts_spec_dict_and_tool_objects(srv: FakeOpenAIServer) -> None:
    spec = {"name": "get_weather", "description": "Weather now", "parameters": PARAMS}
    tools = [{**spec, "handler": weather}, Tool.from_function(search_docs)]
    async with Agent(id="t", model=model_for(srv), tools=tools) as agent:
        answer = await agent.run({"message": '[[call get_weather {"city": "Oslo"}]]'})
    assert answer == "Tool results: sunny in Oslo"
    assert srv.requests[0]["tools"][0] == {"type": "function", "function": spec}


async def test_structured_tool_result_is_sent_as_json_text(srv: FakeOpenAIServer) -> None:
    def lookup(key: str) -> dict[str, Any]:
        return {"key": key, "values": [1, 2]}

    async with Agent(id="t", model=model_for(srv), tools=[lookup]) as agent:
        events = [e async for e in agent.run_stream({"message": '[[call lookup {"key": "k"}]]'})]
    outputs = [e["output"] for e in events if e["type"] == "tool-output-available"]
    assert outputs == [{"key": "k", "values": [1, 2]}]
    tool_messages = [m for m in srv.requests[-1]["messages"] if m["role"] == "tool"]
    assert tool_messages[0]["content"] == '{"key": "k", "values": [1, 2]}'


async def test_unknown_tool_is_reported_to_the_model(srv: FakeOpenAIServer) -> None:
    async with Agent(id="t", model=model_for(srv), tools=[weather]) as agent:
        events = [e async for e in agent.run_stream({"message": "[[call nowhere {}]]"})]
    errors = [e["errorText"] for e in events if e["type"] == "tool-output-error"]
    assert len(errors) == 1 and "nowhere" in errors[0]
    assert events[-1]["type"] == "finish"


async def test_malformed_tool_arguments_are_reported_to_the_model(srv: FakeOpenAIServer) -> None:
    calls: list[str] = []

    def record(city: str) -> str:
        calls.append(city)
        return city

    async with Agent(id="t", model=model_for(srv), tools=[record]) as agent:
        events = [e async for e in agent.run_stream({"message": "[[call record {city: Oslo]]"})]
    assert [e["type"] for e in events if e["type"].startswith("tool-output")] == [
        "tool-output-error"
    ]
    assert calls == []
    assert events[-1]["type"] == "finish"
