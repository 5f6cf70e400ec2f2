"""What tools return and what models say is stored, not refused: any Python value a tool returns
becomes JSON or a clear tool error; NUL characters and lone or split surrogate halves in model
and tool output are made storable; a user's own NUL is still refused before the model runs.
Every turn here is read back from the store, and in 'redis' mode from Postgres as well."""

from __future__ import annotations

import base64
import dataclasses
import datetime
import decimal
import enum
import json
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pydantic
import pytest
from conftest import model_for
from hypothesis import given
from hypothesis import strategies as st

from vel import Agent, InvalidInputError, ToolError
from vel.messages import TextCleaner, clean_text, encode_message
from vel.testing import FakeOpenAIServer
from vel.tools import tool_result

FFFD = "\ufffd"


class Colour(enum.Enum):
    RED = "red"


@dataclasses.dataclass
class Point:
    x: int
    y: int


class Reading(pydantic.BaseModel):
    sensor: str
    at: datetime.date
    values: list[float]


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text")


def deep(levels: int) -> dict[str, Any]:
    root: dict[str, Any] = {}
    node = root
    for _ in range(levels):
        node["n"] = {}
        node = node["n"]
    return root


def cyclic() -> list[Any]:
    items: list[Any] = []
    items.append(items)
    return items


# (name, return value, expected stored text, expected event output)
VALUES: list[tuple[str, Any, str, Any]] = [
    (
        "model",
        Reading(sensor="t1", at=datetime.date(2024, 5, 1), values=[1.5]),
        '{"sensor": "t1", "at": "2024-05-01", "values": [1.5]}',
        None,
    ),
    ("dataclass", Point(1, 2), '{"x": 1, "y": 2}', {"x": 1, "y": 2}),
    ("enum", Colour.RED, "red", "red"),
    ("date", datetime.date(2024, 5, 1), "2024-05-01", "2024-05-01"),
    ("set", {3}, "[3]", [3]),
    ("tuple-keys", {(1, 2): "a"}, '{"1,2": "a"}', {"1,2": "a"}),
    ("bytes-text", b"plain", "plain", "plain"),
    ("bytes-binary", b"\xff\xfe\x00", base64.urlsafe_b64encode(b"\xff\xfe\x00").decode(), None),
    ("zip-header", "PK\x03\x04\x14\x00\x00\x00", f"PK\x03\x04\x14{FFFD * 3}", None),
    ("nul-in-dict", {"blob": "a\x00b"}, '{"blob": "a\ufffdb"}', {"blob": f"a{FFFD}b"}),
    ("lone-surrogate", "half \ud83d only", f"half {FFFD} only", None),
    ("split-pair", "joined \ud83d\ude00", "joined \U0001f600", None),
    ("uuid", uuid.UUID(int=1), "00000000-0000-0000-0000-000000000001", None),
    ("decimal", decimal.Decimal("1.25"), "1.25", None),
    ("nan", {"v": float("nan")}, '{"v": "NaN"}', {"v": "NaN"}),
    ("none", None, "null", None),
    (
        "nested",
        [Point(0, 0), Colour.RED, {"d": datetime.date(2000, 1, 1)}],
        '[{"x": 0, "y": 0}, "red", {"d": "2000-01-01"}]',
        None,
    ),
]


@pytest.mark.parametrize(
    ("value", "text", "output"), [v[1:] for v in VALUES], ids=[v[0] for v in VALUES]
)
def test_any_python_value_becomes_json_text(value: Any, text: str, output: Any) -> None:
    got_output, got_text = tool_result(value)
    assert got_text == text
    if output is not None:
        assert got_output == output
    assert json.loads(json.dumps(got_output, allow_nan=False)) == got_output  # plain JSON
    encode_message({"role": "tool", "tool_call_id": "c", "content": got_text})  # storable


@pytest.mark.parametrize(
    "value",
    [object(), cyclic(), {1: object()}, deep(50_000)],
    ids=["object", "cycle", "nested-object", "nested-50k"],
)
def test_a_value_that_is_no_json_is_a_tool_error_not_its_repr(value: Any) -> None:
    with pytest.raises(ToolError, match="cannot be sent as JSON"):
        tool_result(value)


def returning(name: str, value: Any) -> Callable[[], Any]:
    def tool() -> Any:
        return value

    tool.__name__ = name
    return tool


def raising_unprintable() -> None:
    raise Unprintable


def returning_object() -> object:
    return object()


def call_all(names: list[str]) -> str:
    return "[[parallel]] " + " ".join(f"[[call {n} {{}}]]" for n in names)


async def stored_everywhere(storage_mode: str, srv: FakeOpenAIServer, sid: str) -> list[Any]:
    """The session as its own mode reads it; in 'redis' mode, checked equal in Postgres too."""
    async with Agent(id="r", model=model_for(srv), session_storage=storage_mode) as agent:
        history = await agent.ctxmgr.aget_session_context(sid)
    if storage_mode == "redis":  # closed: drained to Postgres
        async with Agent(id="r", model=model_for(srv), session_storage="database") as agent:
            assert await agent.ctxmgr.aget_session_context(sid) == history
    return history


async def test_odd_tool_values_and_failures_are_stored_in_every_mode(
    srv: FakeOpenAIServer, storage_mode: str
) -> None:
    tools = [returning(f"t_{name.replace('-', '_')}", value) for name, value, _, _ in VALUES]
    tools += [raising_unprintable, returning_object]
    names = [t.__name__ for t in tools]
    sid = f"odd-{uuid.uuid4().hex[:8]}"
    agent = Agent(id="t", model=model_for(srv), session_storage=storage_mode, tools=tools)
    async with agent:
        events = [e async for e in agent.run_stream({"message": call_all(names)}, sid)]
        in_memory = await agent.ctxmgr.aget_session_context(sid)
    assert events[-1]["type"] == "finish", events[-3:]
    history = in_memory if storage_mode == "memory" else await stored(storage_mode, srv, sid)
    assert history == in_memory
    texts = [m["content"] for m in history if m["role"] == "tool"]
    object_error = (
        "the tool returned a value of type object that cannot be sent as JSON: "
        "Unable to serialize unknown type: <class 'object'>"
    )
    assert texts == [
        *(text for _, _, text, _ in VALUES),
        "Error: Unprintable",
        f"Error: {object_error}",
    ]
    errors = [e["errorText"] for e in events if e["type"] == "tool-output-error"]
    assert errors == ["Unprintable", object_error]
    outputs = {e["toolCallId"]: e["output"] for e in events if e["type"] == "tool-output-available"}
    assert len(outputs) == len(VALUES)
    assert all("object at 0x" not in json.dumps(o) for o in outputs.values())  # never a repr
    # The model's answer quoted every tool result, cleaned text included: stored as said.
    assert history[-1]["content"].startswith("Tool results: ")


async def stored(storage_mode: str, srv: FakeOpenAIServer, sid: str) -> list[Any]:
    """The session read back by a fresh Agent; in 'redis' mode also from Postgres alone
    (the first Agent closed, so it drained), which must hold the same."""
    async with Agent(id="r", model=model_for(srv), session_storage=storage_mode) as agent:
        history = await agent.ctxmgr.aget_session_context(sid)
    if storage_mode == "redis":
        async with Agent(id="r", model=model_for(srv), session_storage="database") as agent:
            assert await agent.ctxmgr.aget_session_context(sid) == history
    return history


def sse_model(
    deltas: list[str], tool_call: tuple[str, str] | None = None, call_id: str = "call_1"
) -> dict[str, Any]:
    """A model dict whose OpenAI-compatible endpoint (an httpx MockTransport, so the real
    openai client parses it) streams ``deltas`` one chunk each, or one tool call."""

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        body = {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        # ensure_ascii: a lone surrogate travels as its \\udXXX escape, as real servers send it
        return b"data: " + json.dumps(body).encode() + b"\n\n"

    def handle(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if tool_call is not None and not any(m["role"] == "tool" for m in body["messages"]):
            name, arguments = tool_call
            call = {
                "index": 0,
                "id": call_id,
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            }
            parts = [chunk({"role": "assistant", "tool_calls": [call]}), chunk({}, "tool_calls")]
        else:
            parts = [chunk({"role": "assistant", "content": ""})]
            parts += [chunk({"content": d}) for d in deltas]
            parts.append(chunk({}, "stop"))
        return httpx.Response(
            200,
            headers={"content-type": "text/event-stream"},
            content=b"".join(parts) + b"data: [DONE]\n\n",
        )

    client = httpx.AsyncClient(transport=httpx.MockTransport(handle))
    return {
        "provider": "openai",
        "model": "m",
        "api_key": "k",
        "base_url": "http://model.test/v1",
        "client": {"http_client": client},
    }


async def test_model_text_with_nul_and_split_or_lone_surrogates_is_stored(
    srv: FakeOpenAIServer, storage_mode: str
) -> None:
    # An emoji's two UTF-16 halves in separate chunks, a NUL, a lone low half at the end.
    deltas = ["Smile ", "\ud83d", "\ude00", " zero\x00here", " end\udc00"]
    sid = f"model-{uuid.uuid4().hex[:8]}"
    async with Agent(id="m", model=sse_model(deltas), session_storage=storage_mode) as agent:
        events = [e async for e in agent.run_stream({"message": "hi"}, sid)]
        answer_now = await agent.ctxmgr.aget_session_context(sid)
    expected = f"Smile \U0001f600 zero{FFFD}here end{FFFD}"
    assert events[-1]["type"] == "finish", events[-3:]
    streamed = "".join(e["delta"] for e in events if e["type"] == "text-delta")
    assert streamed == expected  # the client saw what is stored
    history = answer_now if storage_mode == "memory" else await stored(storage_mode, srv, sid)
    assert history == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": expected},
    ]


async def test_tool_call_arguments_and_names_from_the_model_are_stored(
    srv: FakeOpenAIServer, storage_mode: str
) -> None:
    got: list[str] = []

    def echo(text: str) -> str:
        got.append(text)
        return text

    # JSON escapes of a NUL and a lone half inside the arguments, as a model may write them.
    arguments = '{"text": "a\\u0000b\\ud83d"}'
    model = sse_model(["done"], tool_call=("echo", arguments))
    sid = f"args-{uuid.uuid4().hex[:8]}"
    async with Agent(id="m", model=model, session_storage=storage_mode, tools=[echo]) as agent:
        answer = await agent.run({"message": "go"}, session_id=sid)
        now = await agent.ctxmgr.aget_session_context(sid)
    assert answer == "done"
    assert got == ["a\x00b\ud83d"]  # the tool gets exactly what the model sent
    history = now if storage_mode == "memory" else await stored(storage_mode, srv, sid)
    assert history[1]["tool_calls"][0]["function"]["arguments"] == arguments
    assert history[2] == {"role": "tool", "tool_call_id": "call_1", "content": f"a{FFFD}b{FFFD}"}


async def test_a_user_nul_is_refused_before_the_model_but_an_escaped_one_is_text(
    srv: FakeOpenAIServer, storage_mode: str
) -> None:
    sid = f"user-{uuid.uuid4().hex[:8]}"
    async with Agent(id="u", model=model_for(srv), session_storage=storage_mode) as agent:
        with pytest.raises(InvalidInputError, match="NUL"):
            await agent.run({"message": "real \x00 NUL"}, session_id=sid)
        assert srv.requests == []
        text = 'printf("\\u0000") and \\\\u0000'
        answer = await agent.run({"message": f"[[say {text}]]"}, session_id=sid)
        now = await agent.ctxmgr.aget_session_context(sid)
    assert answer == text
    history = now if storage_mode == "memory" else await stored(storage_mode, srv, sid)
    assert [m["content"] for m in history] == [f"[[say {text}]]", text]


@pytest.mark.parametrize(
    ("text", "nul"),
    [
        ("\x00", True),
        ("a\\\x00", True),  # backslash, then a real NUL
        ("\\u0000", False),  # the six characters \u0000
        ("\\\\u0000", False),
        ("\\\\\x00", True),
    ],
)
def test_only_a_real_nul_is_refused(text: str, nul: bool) -> None:
    message = {"role": "user", "content": text, "extra": {"k": [text]}}
    if nul:
        with pytest.raises(InvalidInputError, match="NUL"):
            encode_message(message)
    else:
        assert json.loads(encode_message(message)) == message


def test_cleaning_joins_pairs_across_pieces_and_replaces_what_is_left() -> None:
    assert clean_text("ok") == "ok"
    assert clean_text("\ud83d\ude00") == "\U0001f600"
    assert clean_text("\ude00\ud83d") == FFFD * 2  # wrong order: not a pair
    assert clean_text("a\x00") == f"a{FFFD}"
    cleaner = TextCleaner()
    pieces = [cleaner.feed(p) for p in ["x\ud83d", "\ude00", "\ud83d", "y", "\ud83d"]]
    assert pieces == ["x", "\U0001f600", "", f"{FFFD}y", ""]
    assert cleaner.flush() == FFFD
    assert cleaner.flush() == ""


# Hypothesis never draws surrogates by itself: mix them in, with NUL.
any_text = st.text(
    st.one_of(st.characters(), st.integers(0xD800, 0xDFFF).map(chr), st.just("\x00")),
    max_size=8,
)


@given(st.lists(any_text, max_size=8))
def test_pieces_cleaned_as_they_stream_equal_the_whole_text_cleaned(pieces: list[str]) -> None:
    cleaner = TextCleaner()
    streamed = "".join(cleaner.feed(p) for p in pieces) + cleaner.flush()
    assert streamed == clean_text("".join(pieces))
    assert "\x00" not in streamed
    streamed.encode("utf-8")  # no lone surrogate left
    encode_message({"role": "assistant", "content": streamed})


async def test_a_tool_call_id_and_name_with_nul_or_half_pairs_are_stored(
    srv: FakeOpenAIServer, storage_mode: str
) -> None:
    model = sse_model(["done"], tool_call=("echo\x00", "{}"), call_id="call_\ud83d")
    sid = f"ids-{uuid.uuid4().hex[:8]}"
    async with Agent(id="m", model=model, session_storage=storage_mode) as agent:
        events = [e async for e in agent.run_stream({"message": "go"}, sid)]
        now = await agent.ctxmgr.aget_session_context(sid)
    assert events[-1]["type"] == "finish", events[-3:]
    ids = {e["toolCallId"] for e in events if "toolCallId" in e}
    assert ids == {f"call_{FFFD}"}  # one id from the first event to the stored message
    history = now if storage_mode == "memory" else await stored(storage_mode, srv, sid)
    call = history[1]["tool_calls"][0]
    assert (call["id"], call["function"]["name"]) == (f"call_{FFFD}", f"echo{FFFD}")
    assert history[2]["content"] == f"Error: unknown tool 'echo{FFFD}'"
