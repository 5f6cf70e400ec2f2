"""The examples run as documented, offline (against vel's fake OpenAI server)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(script: str, *args: str, env: dict[str, str], timeout: float = 120) -> str:
    """Run ``examples/<script>`` as a real process; return its output (exit 0 asserted)."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def context_modes_output() -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    return run_example("context_modes.py", env=env, timeout=60)


def final_answers(output: str) -> dict[str, str]:
    summary = output.split("What each mode answered to 'What is my name?':", 1)[1]
    return dict(re.findall(r"^\s+(full|stateless|limited)\s+(.+)$", summary, re.MULTILINE))


def test_context_modes_runs_offline_on_the_fake_server(context_modes_output: str) -> None:
    assert "using vel's fake OpenAI server" in context_modes_output


def test_context_modes_full_memory_remembers_the_name(context_modes_output: str) -> None:
    assert "Alice" in final_answers(context_modes_output)["full"]


def test_context_modes_stateless_forgets_and_stores_nothing(context_modes_output: str) -> None:
    assert "Alice" not in final_answers(context_modes_output)["stateless"]
    assert "(0 messages stored in session 'demo-stateless')" in context_modes_output


def test_context_modes_limited_history_forgets_but_still_stores(
    context_modes_output: str,
) -> None:
    assert "Alice" not in final_answers(context_modes_output)["limited"]
    assert "(6 messages stored in session 'demo-limited')" in context_modes_output


# -- several processes, one conversation -----------------------------------------------------


def example_env(pg_dsn: str, schema: str, redis_url: str, prefix: str) -> dict[str, str]:
    from conftest import schema_dsn

    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "VEL_"))}
    env.update(
        POSTGRES_DSN=schema_dsn(pg_dsn, schema),
        REDIS_URL=redis_url,
        VEL_KEY_PREFIX=prefix,
        PYTHONUNBUFFERED="1",
    )
    return env


async def test_multi_worker_shares_one_conversation_across_processes(
    pg_dsn: str, migrated_schema: str, redis_url: str, key_prefix: str
) -> None:
    env = example_env(pg_dsn, migrated_schema, redis_url, key_prefix)
    out = await asyncio.to_thread(
        run_example, "multi_worker.py", "--workers", "3", "--session-id", "mw", env=env
    )
    pids = re.findall(r"\[worker (\d), pid (\d+)\] assistant: (.*)", out)
    assert [w for w, _, _ in pids] == ["1", "2", "3", "1"]
    assert len({pid for _, pid, _ in pids[:3]}) == 3  # three different processes
    # Worker 3 answers from what the user told worker 1.
    assert pids[2][2] == "Your name is Alice."
    assert "(the session now holds 8 messages)" in out


async def test_multi_worker_in_memory_mode_does_not_share(
    pg_dsn: str, migrated_schema: str, redis_url: str, key_prefix: str
) -> None:
    """The control: 'memory' keeps history per process, so worker 2 cannot know the name."""
    env = example_env(pg_dsn, migrated_schema, redis_url, key_prefix)
    out = await asyncio.to_thread(
        run_example, "multi_worker.py", "--workers", "2", "--storage", "memory", env=env
    )
    answers = re.findall(r"\[worker (\d), pid \d+\] assistant: (.*)", out)
    assert answers[3] == ("2", "I don't know your name.")


# -- the FastAPI chat behind uvicorn with two worker processes, read by the AI SDK ---------


def post_chat(port: int, token: str, chat_id: str, text: str) -> tuple[dict[str, str], list[str]]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        parts = [{"type": "text", "text": text}]
        body = json.dumps({"id": chat_id, "messages": [{"role": "user", "parts": parts}]})
        headers = {"content-type": "application/json", "authorization": f"Bearer {token}"}
        conn.request("POST", "/api/chat", body, headers)
        response = conn.getresponse()
        assert response.status == 200
        response_headers = {k.lower(): v for k, v in response.getheaders()}
        answer = response.read().decode()
    finally:
        conn.close()
    return response_headers, [chunk for chunk in answer.split("\n\n") if chunk]


async def test_fastapi_chat_serves_the_ai_sdk_client_across_uvicorn_workers(
    pg_dsn: str, migrated_schema: str, redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    await asyncio.to_thread(
        run_fastapi_chat_turns, pg_dsn, migrated_schema, redis_url, key_prefix, tmp_path
    )


def run_fastapi_chat_turns(
    pg_dsn: str, migrated_schema: str, redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    import aisdk
    from servers import free_port, wait_port

    from vel.testing import FakeOpenAIServer

    aisdk.install()
    port = free_port()
    api = f"http://127.0.0.1:{port}/api/chat"
    with FakeOpenAIServer() as fake:
        env = example_env(pg_dsn, migrated_schema, redis_url, key_prefix)
        env.update(
            OPENAI_BASE_URL=fake.base_url,
            OPENAI_API_KEY="test",
            VEL_EXAMPLE_TOKENS="alice-token=alice,bob-token=bob",
        )
        log = (tmp_path / "uvicorn.log").open("w")
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "examples.fastapi_chat:app",
                "--workers",
                "2",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            cwd=EXAMPLES.parent,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_port(port, timeout=60)
            headers, first = post_chat(port, "alice-token", "c1", "My name is Alice")
            by_sdk = {
                alias: aisdk.run(
                    "chat_client.mjs", alias, api, "alice-token", "c1", "What is my name?"
                )
                for alias in sorted(aisdk.PACKAGES)
            }
            stranger = aisdk.run(
                "chat_client.mjs", "ai6", api, "bob-token", "c1", "What is my name?"
            )
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
            log.close()
    assert headers["content-type"].startswith("text/event-stream")
    assert headers["x-vercel-ai-ui-message-stream"] == "v1"
    assert first[-1] == "data: [DONE]"
    events = [json.loads(c[6:]) for c in first[:-1]]
    assert events[0]["type"] == "start" and events[-1]["type"] == "finish"
    for alias, seen in by_sdk.items():
        assert seen["errors"] == [], alias
        texts = [p["text"] for p in seen["message"]["parts"] if p["type"] == "text"]
        assert texts == ["Your name is Alice."], alias
        assert seen["message"]["metadata"]["usage"]["totalTokens"] > 0, alias
    texts = [p["text"] for p in stranger["message"]["parts"] if p["type"] == "text"]
    assert texts == ["I don't know your name."]
    assert proc.returncode == 0, (tmp_path / "uvicorn.log").read_text()[-3000:]
