"""Tool schemas and argument conversion with pydantic: every parameter type a tool can take is
described in full to the model, and the handler receives converted values (a dataclass, an
Enum member, a date, an int), or the model gets an error naming what to fix."""

from __future__ import annotations

import dataclasses
import datetime
import enum
import json
import re
import uuid
from typing import Annotated, Any, Literal, NotRequired, Optional, Union

import pydantic
import pytest
from conftest import model_for
from typing_extensions import TypedDict  # pydantic needs it before Python 3.12

from vel import Agent, Tool, ToolError
from vel.testing import FakeOpenAIServer


@dataclasses.dataclass
class Place:
    """A place on Earth.

    Attributes:
        city: The city's name.
        country: ISO 3166 country code.
    """

    city: str
    country: str = "NO"


class Unit(enum.Enum):
    """Temperature unit."""

    C = "celsius"
    F = "fahrenheit"


received: list[tuple[Any, ...]] = []


def weather(place: Place, unit: Unit, when: datetime.date, days: int = 1) -> str:
    """Forecast for a place.

    Args:
        place: Where.
        unit: Which scale.
        when: The first day.
        days: How many days.
    """
    received.append((place, unit, when, days))
    return f"{days} days of sun in {place.city} from {when.isoformat()} ({unit.value})"


def schema_of(func: Any) -> dict[str, Any]:
    return Tool.from_function(func).parameters


def test_weather_tool_gets_a_full_schema() -> None:
    assert schema_of(weather) == {
        "type": "object",
        "additionalProperties": False,
        "required": ["place", "unit", "when"],
        "properties": {
            "place": {
                "type": "object",
                "description": "Where.",
                "additionalProperties": False,
                "properties": {
                    "city": {"type": "string", "description": "The city's name."},
                    "country": {
                        "type": "string",
                        "default": "NO",
                        "description": "ISO 3166 country code.",
                    },
                },
                "required": ["city"],
            },
            "unit": {
                "type": "string",
                "enum": ["celsius", "fahrenheit"],
                "description": "Which scale.",
            },
            "when": {"type": "string", "format": "date", "description": "The first day."},
            "days": {"type": "integer", "default": 1, "description": "How many days."},
        },
    }


async def test_weather_handler_receives_converted_arguments(srv: FakeOpenAIServer) -> None:
    received.clear()
    args = '{"place": {"city": "Oslo"}, "unit": "celsius", "when": "2024-05-01", "days": "3"}'
    async with Agent(id="t", model=model_for(srv), tools=[weather]) as agent:
        answer = await agent.run({"message": f"[[call weather {args}]]"})
    assert received == [(Place("Oslo", "NO"), Unit.C, datetime.date(2024, 5, 1), 3)]
    assert [type(v) for v in received[0]] == [Place, Unit, datetime.date, int]
    assert answer == "Tool results: 3 days of sun in Oslo from 2024-05-01 (celsius)"
    # What the model saw is the same schema.
    assert srv.requests[0]["tools"][0]["function"]["parameters"] == schema_of(weather)


async def test_an_argument_left_out_takes_the_functions_default() -> None:
    received.clear()
    tool = Tool.from_function(weather)
    await tool.call(
        {"place": {"city": "Rome", "country": "IT"}, "unit": "fahrenheit", "when": "2024-01-02"}
    )
    assert received == [(Place("Rome", "IT"), Unit.F, datetime.date(2024, 1, 2), 1)]


class Coordinates(pydantic.BaseModel):
    """A point."""

    lat: float = pydantic.Field(ge=-90, le=90, description="Latitude in degrees.")
    lon: float = pydantic.Field(ge=-180, le=180)
    title: str = "unnamed"


class Filters(TypedDict):
    """Which results to keep."""

    tags: list[str]
    """Tags a result must carry."""
    min_score: NotRequired[float]


@dataclasses.dataclass
class Tree:
    """A node and its children."""

    label: str
    children: list[Tree] = dataclasses.field(default_factory=list)


seen: dict[str, Any] = {}


def everything(
    point: Coordinates,
    filters: Filters,
    tree: Tree,
    at: datetime.datetime,
    ident: uuid.UUID,
    choice: Literal["a", "b"] = "a",
    maybe: Optional[int] = None,  # noqa: UP045 - the older spelling must work too
    either: Union[int, str] = 0,  # noqa: UP007
    counts: dict[str, int] | None = None,
    pair: tuple[int, str] = (1, "x"),
    unique: set[int] = frozenset(),  # type: ignore[assignment]
    flag: Annotated[bool, pydantic.Field(description="From Field, not the docstring.")] = False,
    book: Coordinates = Coordinates(lat=1, lon=2, title="home"),  # noqa: B008
) -> str:
    """Use every kind of parameter.

    Args:
        point: Where to look.
        flag: From the docstring.
        book: A default whose JSON has a 'title' key.
    """
    seen.update(locals())
    return "ok"


def test_models_typeddicts_recursion_literals_unions_and_containers_are_described() -> None:
    schema = schema_of(everything)
    props = schema["properties"]
    assert props["point"] == {
        "type": "object",
        "description": "Where to look.",
        "properties": {
            "lat": {
                "type": "number",
                "minimum": -90,
                "maximum": 90,
                "description": "Latitude in degrees.",
            },
            "lon": {"type": "number", "minimum": -180, "maximum": 180},
            "title": {"type": "string", "default": "unnamed"},
        },
        "required": ["lat", "lon"],
    }
    assert props["filters"]["description"] == "Which results to keep."
    assert props["filters"]["properties"] == {
        "tags": {
            "type": "array",
            "items": {"type": "string"},
            "description": "Tags a result must carry.",
        },
        "min_score": {"type": "number"},
    }
    assert props["filters"]["required"] == ["tags"]
    # A recursive type keeps one definition, referred to from inside itself.
    assert props["tree"]["properties"]["children"]["items"] == {"$ref": "#/$defs/Tree"}
    assert set(schema["$defs"]) == {"Tree"}
    assert schema["$defs"]["Tree"]["properties"]["label"] == {"type": "string"}
    assert props["at"] == {"type": "string", "format": "date-time"}
    assert props["ident"] == {"type": "string", "format": "uuid"}
    assert props["choice"] == {"type": "string", "enum": ["a", "b"], "default": "a"}
    assert props["maybe"] == {"anyOf": [{"type": "integer"}, {"type": "null"}], "default": None}
    assert props["either"] == {"anyOf": [{"type": "integer"}, {"type": "string"}], "default": 0}
    assert props["counts"]["anyOf"][0] == {
        "type": "object",
        "additionalProperties": {"type": "integer"},
    }
    assert props["pair"]["prefixItems"] == [{"type": "integer"}, {"type": "string"}]
    assert props["pair"]["default"] == [1, "x"]
    assert props["unique"] == {
        "type": "array",
        "items": {"type": "integer"},
        "uniqueItems": True,
        "default": [],
    }
    assert props["flag"]["description"] == "From Field, not the docstring."
    assert props["book"]["default"] == {"lat": 1.0, "lon": 2.0, "title": "home"}
    assert schema["required"] == ["point", "filters", "tree", "at", "ident"]
    # No generated titles anywhere: the only string-valued "title" is the default's data
    # (a property named "title" is a schema, and stays).
    assert re.findall(r'"title": "[^"]*"', json.dumps(schema)) == ['"title": "home"']
    assert props["point"]["properties"]["title"] == {"type": "string", "default": "unnamed"}
    assert "$ref" not in json.dumps({k: v for k, v in props.items() if k != "tree"})


async def test_nested_values_are_converted_to_their_types() -> None:
    seen.clear()
    tool = Tool.from_function(everything)
    await tool.call(
        {
            "point": {"lat": 59.9, "lon": 10.7},
            "filters": {"tags": ["x"]},
            "tree": {"label": "root", "children": [{"label": "leaf"}]},
            "at": "2024-05-01T12:00:00Z",
            "ident": "12345678-1234-5678-1234-567812345678",
            "maybe": None,
            "either": "word",
            "pair": [2, "y"],
            "unique": [3, 3, 4],
        }
    )
    assert seen["point"] == Coordinates(lat=59.9, lon=10.7)
    assert seen["filters"] == {"tags": ["x"]}
    assert seen["tree"] == Tree("root", [Tree("leaf")])
    assert seen["at"] == datetime.datetime(2024, 5, 1, 12, tzinfo=datetime.UTC)
    assert seen["ident"] == uuid.UUID("12345678-1234-5678-1234-567812345678")
    assert (seen["either"], seen["pair"], seen["unique"]) == ("word", (2, "y"), {3, 4})
    assert seen["book"] == Coordinates(lat=1, lon=2, title="home")  # the function's default


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ({"unit": "celsius", "when": "2024-05-01"}, "place: Field required"),
        (
            {"place": {"city": "Oslo"}, "unit": "kelvin", "when": "2024-05-01"},
            "unit: Input should be 'celsius' or 'fahrenheit'",
        ),
        (
            {"place": {"city": "Oslo"}, "unit": "celsius", "when": "May"},
            "when: Input should be a valid date",
        ),
        (
            {"place": {"city": "Oslo"}, "unit": "celsius", "when": "2024-05-01", "days": "three"},
            "days: Input should be a valid integer",
        ),
        ({"place": {}, "unit": "celsius", "when": "2024-05-01"}, "place.city: Field required"),
        (
            {"place": {"city": "Oslo"}, "unit": "celsius", "when": "2024-05-01", "hours": 3},
            "hours: Extra inputs are not permitted",
        ),
    ],
    ids=["missing", "bad-enum", "bad-date", "bad-int", "nested-missing", "unknown"],
)
async def test_invalid_arguments_raise_a_tool_error_naming_the_field(
    arguments: dict[str, Any], expected: str
) -> None:
    received.clear()
    with pytest.raises(ToolError, match="invalid arguments") as info:
        await Tool.from_function(weather).call(arguments)
    assert expected in str(info.value)
    assert received == []


async def test_invalid_arguments_are_reported_to_the_model_and_the_turn_is_stored(
    srv: FakeOpenAIServer,
) -> None:
    received.clear()
    args = '{"place": "Oslo", "unit": "celsius", "when": "tomorrow"}'
    async with Agent(id="t", model=model_for(srv), tools=[weather]) as agent:
        events = [
            e async for e in agent.run_stream({"message": f"[[call weather {args}]]"}, "bad-args")
        ]
        history = await agent.ctxmgr.aget_session_context("bad-args")
    errors = [e["errorText"] for e in events if e["type"] == "tool-output-error"]
    assert len(errors) == 1
    assert errors[0].startswith("invalid arguments: place: ")
    assert "when: Input should be a valid date" in errors[0]
    assert events[-1]["type"] == "finish"
    assert received == []
    tool_message = next(m for m in srv.requests[-1]["messages"] if m["role"] == "tool")
    assert tool_message["content"] == f"Error: {errors[0]}"
    assert [m["role"] for m in history] == ["user", "assistant", "tool", "assistant"]
    assert history[2]["content"] == f"Error: {errors[0]}"


async def test_positional_only_and_var_keyword_parameters() -> None:
    got: list[Any] = []

    def scale(value: float, factor: int = 2, /, *, label: str = "", **extra: int) -> None:
        got.append((value, factor, label, extra))

    schema = schema_of(scale)
    assert list(schema["properties"]) == ["value", "factor", "label"]
    assert schema["additionalProperties"] is True  # **extra takes unknown arguments
    tool = Tool.from_function(scale)
    await tool.call({"value": "1.5", "label": "x", "more": 1})
    await tool.call({"value": 1, "factor": "3"})
    assert got == [(1.5, 2, "x", {"more": 1}), (1.0, 3, "", {})]


class Socket:
    pass


def test_a_parameter_that_is_no_json_type_is_refused_when_the_tool_is_defined() -> None:
    def connect(sock: Socket) -> None:
        pass

    with pytest.raises(ToolError, match=r"'connect'.*cannot be described as JSON"):
        Tool.from_function(connect)


def test_an_unresolvable_type_hint_is_refused_with_the_fix() -> None:
    def local() -> Any:
        @dataclasses.dataclass
        class Inner:
            x: int

        def use(value: Inner) -> None:  # a string annotation naming a local class
            pass

        return use

    with pytest.raises(ToolError, match=r"Inner.*module level"):
        Tool.from_function(local())


def test_tool_objects_built_by_hand_pass_arguments_through() -> None:
    async def echo(**kwargs: Any) -> dict[str, Any]:
        return kwargs

    tool = Tool("echo", "Echo.", {"type": "object", "properties": {}}, echo)
    assert tool.signature is None


async def test_a_hand_built_tool_gets_the_json_values_unchanged() -> None:
    async def echo(**kwargs: Any) -> dict[str, Any]:
        return kwargs

    tool = Tool("echo", "Echo.", {"type": "object", "properties": {}}, echo)
    assert await tool.call({"days": "3"}) == {"days": "3"}
