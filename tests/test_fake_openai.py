"""The fake OpenAI server, exercised through the real ``openai.AsyncOpenAI`` client."""

from __future__ import annotations

import http.client
import json
import os
import selectors
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import openai
import pytest

from vel.testing import FakeOpenAIServer

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def srv() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as server:
        yield server


def client_for(srv: FakeOpenAIServer, **kwargs: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key="test", base_url=srv.base_url, **kwargs)


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


async def stream_chunks(
    client: openai.AsyncOpenAI, messages: list[dict[str, Any]], **kwargs: Any
) -> list[Any]:
    stream = await client.chat.completions.create(
        model="gpt-test", messages=messages, stream=True, **kwargs
    )
    return [chunk async for chunk in stream]


def tool_calls_from(chunks: list[Any]) -> dict[int, dict[str, Any]]:
    """Accumulate streamed tool-call deltas the way an agent loop would."""
    calls: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            for tc in choice.delta.tool_calls or []:
                entry = calls.setdefault(tc.index, {"id": None, "name": None, "fragments": []})
                if tc.id is not None:
                    assert entry["id"] is None, "id must only be on the first fragment"
                    entry["id"] = tc.id
                    assert tc.type == "function"
                if tc.function is not None:
                    if tc.function.name is not None:
                        assert entry["name"] is None, "name must only be on the first fragment"
                        entry["name"] = tc.function.name
                    if tc.function.arguments:
                        entry["fragments"].append(tc.function.arguments)
    return calls


def assistant_with_calls(calls: dict[int, dict[str, Any]]) -> dict[str, Any]:
    return {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": c["id"],
                "type": "function",
                "function": {"name": c["name"], "arguments": "".join(c["fragments"])},
            }
            for _, c in sorted(calls.items())
        ],
    }


async def test_streaming_text_has_several_deltas_and_usage(srv: FakeOpenAIServer) -> None:
    async with client_for(srv) as client:
        chunks = await stream_chunks(
            client,
            [{"role": "system", "content": "be nice"}, user("hello there world")],
            stream_options={"include_usage": True},
        )
    deltas = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert len(deltas) >= 3
    assert "".join(deltas) == "You said: hello there world"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.prompt_tokens == 5
    assert last.usage.completion_tokens == 5
    assert last.usage.total_tokens == 10
    assert srv.requests[-1]["stream"] is True
    assert srv.requests[-1]["model"] == "gpt-test"


async def test_streaming_without_include_usage_has_no_usage_chunk(srv: FakeOpenAIServer) -> None:
    async with client_for(srv) as client:
        chunks = await stream_chunks(client, [user("hi")])
    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)


async def test_non_stream_text_records_request_and_headers(srv: FakeOpenAIServer) -> None:
    async with client_for(srv) as client:
        resp = await client.chat.completions.create(model="gpt-test", messages=[user("ping")])
    assert resp.object == "chat.completion"
    assert resp.choices[0].message.content == "You said: ping"
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (1, 3)
    assert len(srv.requests) == len(srv.request_headers) == 1
    assert srv.requests[0]["messages"] == [user("ping")]
    assert srv.request_headers[0]["authorization"] == "Bearer test"
    srv.clear()
    assert srv.requests == [] and srv.request_headers == []


async def test_memory_of_name_from_history(srv: FakeOpenAIServer) -> None:
    history = [
        user("Hi! My name is Alice."),
        {"role": "assistant", "content": "Hello Alice."},
        user("What is my name?"),
    ]
    async with client_for(srv) as client:
        resp = await client.chat.completions.create(model="m", messages=history)
        assert resp.choices[0].message.content == "Your name is Alice."
        chunks = await stream_chunks(client, history)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "Your name is Alice."
        resp = await client.chat.completions.create(model="m", messages=[user("what's my name")])
        assert resp.choices[0].message.content == "I don't know your name."
        # The last "my name is" wins; list content is understood.
        history = [
            user("my name is Bob"),
            {"role": "user", "content": [{"type": "text", "text": "Actually my name is Carol"}]},
            {"role": "user", "content": [{"type": "text", "text": "What's my name?"}]},
        ]
        resp = await client.chat.completions.create(model="m", messages=history)
        assert resp.choices[0].message.content == "Your name is Carol."


async def test_sequential_tool_calls_over_two_steps(srv: FakeOpenAIServer) -> None:
    messages: list[dict[str, Any]] = [
        user('weather? [[call get_weather {"city": "Paris"}]] [[call get_time {"tz": "UTC"}]]')
    ]
    async with client_for(srv) as client:
        # Step 1 (streamed): the first call only, arguments in several fragments.
        chunks = await stream_chunks(client, messages)
        calls = tool_calls_from(chunks)
        assert list(calls) == [0]
        assert calls[0]["name"] == "get_weather"
        assert calls[0]["id"].startswith("call_0_")
        assert len(calls[0]["fragments"]) >= 2
        assert json.loads("".join(calls[0]["fragments"])) == {"city": "Paris"}
        assert [c.choices[0].finish_reason for c in chunks][-1] == "tool_calls"
        messages.append(assistant_with_calls(calls))
        messages.append({"role": "tool", "tool_call_id": calls[0]["id"], "content": "sunny"})

        # Step 2 (non-streamed): the second call.
        resp = await client.chat.completions.create(model="m", messages=messages)
        choice = resp.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None
        assert choice.message.tool_calls is not None and len(choice.message.tool_calls) == 1
        call = choice.message.tool_calls[0]
        assert call.type == "function"
        assert call.id.startswith("call_1_")
        assert call.function.name == "get_time"
        assert json.loads(call.function.arguments) == {"tz": "UTC"}
        messages.append(choice.message.model_dump(exclude_none=True))
        messages.append({"role": "tool", "tool_call_id": call.id, "content": "noon"})

        # Step 3: all calls done -> text built from the tool results.
        resp = await client.chat.completions.create(model="m", messages=messages)
        assert resp.choices[0].message.content == "Tool results: sunny; noon"
        assert resp.choices[0].finish_reason == "stop"

        # Replaying the same history is deterministic (same ids).
        again = await stream_chunks(client, messages[:1])
        assert tool_calls_from(again)[0]["id"] == calls[0]["id"]


async def test_parallel_tool_calls_in_one_step(srv: FakeOpenAIServer) -> None:
    messages: list[dict[str, Any]] = [
        user(
            '[[parallel]] [[call lookup {"q": "alpha", "n": [1, 2]}]] '
            '[[call lookup {"q": "beta"}]] [[call noop]]'
        )
    ]
    async with client_for(srv) as client:
        chunks = await stream_chunks(client, messages, stream_options={"include_usage": True})
        calls = tool_calls_from(chunks)
        assert sorted(calls) == [0, 1, 2]
        assert [calls[i]["name"] for i in range(3)] == ["lookup", "lookup", "noop"]
        assert len({c["id"] for c in calls.values()}) == 3
        for c in calls.values():
            assert len(c["fragments"]) >= 2
        assert json.loads("".join(calls[0]["fragments"])) == {"q": "alpha", "n": [1, 2]}
        assert json.loads("".join(calls[1]["fragments"])) == {"q": "beta"}
        assert json.loads("".join(calls[2]["fragments"])) == {}
        assert chunks[-1].usage is not None and chunks[-1].choices == []

        messages.append(assistant_with_calls(calls))
        for i, result in enumerate(["A", "B", "C"]):
            messages.append({"role": "tool", "tool_call_id": calls[i]["id"], "content": result})
        resp = await client.chat.completions.create(model="m", messages=messages)
        assert resp.choices[0].message.content == "Tool results: A; B; C"


async def test_error_directive_raises_bad_request(srv: FakeOpenAIServer) -> None:
    async with client_for(srv) as client:
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(model="m", messages=[user("[[error 400]]")])
        with pytest.raises(openai.BadRequestError):
            await stream_chunks(client, [user("[[error 400]]")])
    assert info.value.status_code == 400
    body = info.value.body
    assert isinstance(body, dict) and body["type"] == "invalid_request_error"
    assert len(srv.requests) == 2  # 400 is not retried


async def test_fail_next(srv: FakeOpenAIServer) -> None:
    srv.fail_next(500, message="boom")
    async with client_for(srv, max_retries=0) as client:
        with pytest.raises(openai.InternalServerError, match="boom"):
            await client.chat.completions.create(model="m", messages=[user("hi")])
        resp = await client.chat.completions.create(model="m", messages=[user("hi")])
        assert resp.choices[0].message.content == "You said: hi"
    # Retryable errors carry a short retry-after-ms, so SDK retries are quick.
    srv.clear()
    srv.fail_next(429, count=2)
    async with client_for(srv, max_retries=2) as client:
        started = time.monotonic()
        resp = await client.chat.completions.create(model="m", messages=[user("hi")])
        assert time.monotonic() - started < 1.0
    assert resp.choices[0].message.content == "You said: hi"
    assert len(srv.requests) == 3
    assert srv.request_headers[-1]["x-stainless-retry-count"] == "2"


async def test_echo_say_and_message_shapes(srv: FakeOpenAIServer) -> None:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "Relevant context: nothing"},
        user("[[call f {}]]"),
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "r"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "done"}]},
        user("[[echo]]"),
    ]
    async with client_for(srv) as client:
        resp = await client.chat.completions.create(model="m", messages=messages)
        assert resp.choices[0].message.content == "Roles: system,user,assistant,tool,assistant,user"
        messages[-1] = user("[[say  exactly this ]]")
        resp = await client.chat.completions.create(model="m", messages=messages)
        assert resp.choices[0].message.content == " exactly this "
        # Directives in earlier user messages have no effect.
        messages[-1] = user("plain")
        resp = await client.chat.completions.create(model="m", messages=messages)
        assert resp.choices[0].message.content == "You said: plain"
        resp = await client.chat.completions.create(model="m", messages=[user("x" * 300)])
        assert resp.choices[0].message.content == "You said: " + "x" * 200


async def test_slow_stream_and_client_abort(srv: FakeOpenAIServer) -> None:
    async with client_for(srv) as client:
        started = time.monotonic()
        chunks = await stream_chunks(client, [user("[[slow 0.02]] [[say ab cd]]")])
        pieces = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
        assert len(pieces) >= 5 and "".join(pieces) == "ab cd"
        assert time.monotonic() - started >= 0.1

        stream = await client.chat.completions.create(
            model="m", messages=[user("[[slow 0.05]] tell me a long story")], stream=True
        )
        async for _ in stream:
            break
        await stream.close()
    for _ in range(100):  # the server notices the closed connection on its next write
        if srv.aborted_streams:
            break
        await anyio.sleep(0.02)
    assert srv.aborted_streams == 1


async def test_latency_and_models(srv: FakeOpenAIServer) -> None:
    srv.latency = 0.1
    async with client_for(srv) as client:
        started = time.monotonic()
        models = await client.models.list()
        assert time.monotonic() - started >= 0.1
    assert [m.id for m in models.data] == ["fake-model"]


def test_keep_alive_connection_reuse_and_404(srv: FakeOpenAIServer) -> None:
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=5)
    try:
        sockets = []
        for stream in (True, False, True):
            body = json.dumps({"model": "m", "messages": [user("hi")], "stream": stream})
            conn.request("POST", "/v1/chat/completions", body=body)
            resp = conn.getresponse()
            data = resp.read()
            assert resp.status == 200
            if stream:
                assert resp.getheader("Transfer-Encoding") == "chunked"
                assert data.endswith(b"data: [DONE]\n\n")
            else:
                assert json.loads(data)["choices"][0]["message"]["content"] == "You said: hi"
            sockets.append(conn.sock)
        assert sockets[0] is not None
        assert all(sock is sockets[0] for sock in sockets)  # one connection, kept alive
        conn.request("POST", "/v1/nope", body="{}")
        resp = conn.getresponse()
        assert resp.status == 404
        assert json.loads(resp.read())["error"]["type"] == "not_found_error"
        conn.request("POST", "/v1/chat/completions", body="{not json")
        resp = conn.getresponse()
        assert resp.status == 400
        resp.read()
    finally:
        conn.close()


def test_stop_closes_port() -> None:
    server = FakeOpenAIServer().start()
    url = server.base_url + "/models"
    with urllib.request.urlopen(url, timeout=5) as resp:
        assert resp.status == 200
    server.stop()
    server.stop()  # idempotent
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=2)


async def ask(base_url: str, text: str) -> str | None:
    async with openai.AsyncOpenAI(api_key="test", base_url=base_url) as client:
        resp = await client.chat.completions.create(model="m", messages=[user(text)])
    return resp.choices[0].message.content


def test_cli_subprocess_serves_until_sigterm() -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.Popen(
        [sys.executable, "-m", "vel.testing.fake_openai", "--port", "0", "--latency", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO_ROOT,
        env=env,
        text=True,
    )
    try:
        assert proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            assert sel.select(timeout=10), "fake server did not print its URL"
        line = proc.stdout.readline()
        assert line.startswith("FAKE_OPENAI_URL=http://127.0.0.1:")
        url = line.strip().split("=", 1)[1]
        assert url.endswith("/v1")
        assert anyio.run(ask, url, "yo") == "You said: yo"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert proc.stdout.read() == ""
        assert proc.stderr is not None and proc.stderr.read() == ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


async def test_argument_edge_cases_and_max_tokens(srv: FakeOpenAIServer) -> None:
    async with client_for(srv) as client:
        text = '[[parallel]] [[call a {"s": "]] [["}]] [[call b not json]]'
        resp = await client.chat.completions.create(model="m", messages=[user(text)])
        calls = resp.choices[0].message.tool_calls
        assert calls is not None
        assert [c.function.arguments for c in calls] == ['{"s": "]] [["}', "not json"]
        resp = await client.chat.completions.create(
            model="m", messages=[user("one two three four")], max_tokens=3
        )
        assert resp.choices[0].message.content == "You said: one"
        assert resp.choices[0].finish_reason == "length"


async def test_completion_ids_are_a_function_of_the_request(srv: FakeOpenAIServer) -> None:
    async with client_for(srv) as client:
        ping = [user("ping")]
        first = await client.chat.completions.create(model="gpt-test", messages=ping)
        again = await client.chat.completions.create(model="gpt-test", messages=ping)
        other = await client.chat.completions.create(model="gpt-test", messages=[user("pong")])
        chunks = await stream_chunks(client, ping)
    assert first.id == again.id != other.id
    assert first.id.startswith("chatcmpl-")
    assert len({c.id for c in chunks}) == 1 and chunks[0].id != first.id  # stream=True differs
