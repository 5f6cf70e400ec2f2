"""Several OS processes sharing sessions through 'database' and 'redis' storage.

Every worker is a real process (``tests/workers.py``) configured from the environment like a
deployed worker; the backends are the shared local Redis and Postgres, each test isolated by
its own Postgres schema and Redis key prefix. What the workers acknowledge is compared with
what the tiers hold by ``tests/checker.py``.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
import uuid
from collections.abc import Iterator

import pytest
from checker import acks_of, compare, postgres_rows, redis_rows, same_history
from workers import Proc, Stack, kill_all, worker_env

from vel.stores.tiered import TieredStore
from vel.testing.fake_openai import FakeOpenAIServer

STORAGES = ["database", "redis"]
pytestmark = pytest.mark.slow


def new_sid() -> str:
    return f"mp-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def fake_llm_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``python -m vel.testing.fake_openai`` in its own process, shared by the module."""
    out_dir = tmp_path_factory.mktemp("fake-llm")
    server = Proc(
        [sys.executable, "-m", "vel.testing.fake_openai"], worker_env(), out_dir, "fake-openai"
    )
    try:
        deadline = time.monotonic() + 20
        url = None
        while url is None:
            for line in server.stdout().splitlines():
                if line.startswith("FAKE_OPENAI_URL="):
                    url = line.partition("=")[2].strip()
            if url is None:
                assert server.poll() is None, f"fake LLM exited: {server.stderr()}"
                assert time.monotonic() < deadline, "fake LLM did not print its URL"
                time.sleep(0.05)
        yield url
        server.signal(signal.SIGTERM)  # it serves until then
        server.wait(10)
    finally:
        server.kill()


async def wait_all(procs: list[Proc], timeout: float) -> None:
    for proc in procs:
        proc.check(await proc.wait_async(timeout))


# -- 1 -----------------------------------------------------------------------------------


@pytest.mark.parametrize("storage", STORAGES)
async def test_a_fresh_process_continues_the_conversation_of_another(
    stack: Stack, fake_llm_url: str, storage: str
) -> None:
    sid = new_sid()
    env = stack.env(openai_url=fake_llm_url)
    first = stack.worker(
        "turn", storage=storage, session=sid, message="My name is Alice", name="turn-a", env=env
    )
    first.check(await first.wait_async(60))
    second = stack.worker(
        "turn", storage=storage, session=sid, message="What is my name?", name="turn-b", env=env
    )
    second.check(await second.wait_async(60))

    (a,) = first.events("answer")
    (b,) = second.events("answer")
    assert a["pid"] != b["pid"]
    assert a["answer"] == "You said: My name is Alice"
    assert b["answer"] == "Your name is Alice."
    # Both processes have exited (the redis worker drained its flusher on close): the
    # durable record holds both turns.
    rows = await postgres_rows(stack.pg_dsn, stack.schema, sid)
    assert [(r.seq, r.message["role"], r.content) for r in rows] == [
        (1, "user", "My name is Alice"),
        (2, "assistant", "You said: My name is Alice"),
        (3, "user", "What is my name?"),
        (4, "assistant", "Your name is Alice."),
    ]


# -- 2 -----------------------------------------------------------------------------------


@pytest.mark.parametrize("storage", [*STORAGES, "redis-cluster"])
async def test_concurrent_appends_from_four_processes_lose_and_duplicate_nothing(
    stack: Stack, storage: str, request: pytest.FixtureRequest
) -> None:
    if storage == "redis-cluster":
        # The same workers with REDIS_URL=redis+cluster://... (the local 3+3 cluster).
        stack.redis_url = request.getfixturevalue("redis_cluster_url")
    storage = storage.removesuffix("-cluster")
    tiered = stack.tiered()
    try:
        await _concurrent_appends(stack, tiered, storage)
    finally:
        await tiered.aclose()


async def _concurrent_appends(stack: Stack, tiered: TieredStore, storage: str) -> None:
    procs_n, tasks, appends = 4, 8, 5
    sid = new_sid()
    procs = [
        stack.worker(
            "append",
            storage=storage,
            session=sid,
            proc=p,
            tasks=tasks,
            appends=appends,
            name=f"append-{p}",
        )
        for p in range(procs_n)
    ]
    try:
        await wait_all(procs, 90)
    finally:
        kill_all(procs)
    acks = [a for p in procs for a in acks_of(p.lines())]
    assert len(acks) == procs_n * tasks * appends
    expected = 2 * len(acks)
    assert expected == 320

    if storage == "redis":
        hot = await redis_rows(stack.redis_url, stack.prefix, sid)
        compare(acks, hot, where="redis", session_id=sid).assert_ok()
        assert await tiered.flush(20), "the backlog did not drain"
        unflushed, _, dirty = await tiered.hot.backlog()
        assert (unflushed, dirty) == (0, 0)
    cold = await postgres_rows(stack.pg_dsn, stack.schema, sid)
    compare(acks, cold, where="postgres", session_id=sid).assert_ok()
    assert len(cold) == expected
    if storage == "redis":
        assert same_history(cold, hot) == []


# -- 3 -----------------------------------------------------------------------------------


@pytest.mark.parametrize("storage", STORAGES)
async def test_turn_lock_serialises_agent_turns_of_one_session_across_processes(
    stack: Stack, tiered: TieredStore, storage: str
) -> None:
    procs_n, tasks, turns = 4, 2, 2
    total = procs_n * tasks * turns
    sid = new_sid()
    with FakeOpenAIServer() as llm:
        llm.latency = 0.05  # long enough for unserialised turns to overlap
        env = stack.env(openai_url=llm.base_url)
        procs = [
            stack.worker(
                "agent-turns",
                storage=storage,
                session=sid,
                proc=p,
                tasks=tasks,
                turns=turns,
                name=f"turns-{p}",
                env=env,
            )
            for p in range(procs_n)
        ]
        try:
            await wait_all(procs, 120)
        finally:
            kill_all(procs)
        requests = [r for r in llm.requests if isinstance(r.get("messages"), list)]

    results = [t for p in procs for t in p.events("turn")]
    assert len(results) == total
    for turn in results:
        assert turn["answer"] == "You said: " + turn["message"]

    if storage == "redis":
        assert await tiered.flush(20)
        hot = await redis_rows(stack.redis_url, stack.prefix, sid)
    rows = await postgres_rows(stack.pg_dsn, stack.schema, sid)
    if storage == "redis":
        assert same_history(rows, hot) == []
    history = [(r.message["role"], r.content) for r in rows]
    assert [r.seq for r in rows] == list(range(1, 2 * total + 1))
    # Strictly alternating pairs, each answer echoing its own question.
    for k in range(0, len(history), 2):
        (role_q, question), (role_a, answer) = history[k], history[k + 1]
        assert (role_q, role_a) == ("user", "assistant"), history[k : k + 2]
        assert answer == "You said: " + question, history[k : k + 2]
    assert sorted(q for role, q in history if role == "user") == sorted(
        t["message"] for t in results
    )
    # Serialised: the k-th turn's model call saw exactly the k-1 turns committed before it
    # (unserialised turns would have sent the same, shorter history twice).
    assert len(requests) == total
    seen = sorted(len(r["messages"]) for r in requests)
    assert seen == list(range(1, 2 * total, 2)), seen
    for request in requests:
        sent = [(m["role"], m["content"]) for m in request["messages"]]
        assert sent[:-1] == history[: len(sent) - 1]
        assert sent[-1] == history[len(sent) - 1]


# -- 4 -----------------------------------------------------------------------------------


async def test_session_lost_by_redis_is_served_from_postgres_to_a_new_process(
    stack: Stack, tiered: TieredStore, fake_llm_url: str
) -> None:
    sid = new_sid()
    env = stack.env(openai_url=fake_llm_url)
    first = stack.worker(
        "turn", storage="redis", session=sid, message="My name is Alice", name="turn-a", env=env
    )
    first.check(await first.wait_async(60))
    assert await tiered.flush(20)
    assert [r.seq for r in await postgres_rows(stack.pg_dsn, stack.schema, sid)] == [1, 2]

    client = (await tiered.hot.client()).redis
    assert await client.delete(*tiered.hot.keys.session(sid).data) >= 2
    assert not await tiered.hot.exists(sid)

    second = stack.worker(
        "turn", storage="redis", session=sid, message="What is my name?", name="turn-b", env=env
    )
    second.check(await second.wait_async(60))
    (b,) = second.events("answer")
    assert b["answer"] == "Your name is Alice."

    assert await tiered.flush(20)
    cold = await postgres_rows(stack.pg_dsn, stack.schema, sid)
    assert [(r.seq, r.content) for r in cold] == [
        (1, "My name is Alice"),
        (2, "You said: My name is Alice"),
        (3, "What is my name?"),
        (4, "Your name is Alice."),
    ]
    assert same_history(cold, await redis_rows(stack.redis_url, stack.prefix, sid)) == []


# -- 5 -----------------------------------------------------------------------------------


async def test_cold_session_is_loaded_from_postgres_once_for_200_readers_in_2_processes(
    stack: Stack, tiered: TieredStore
) -> None:
    sid = new_sid()
    messages = [{"role": "user", "content": f"message {i}"} for i in range(20)]
    for i in range(0, 20, 2):
        await tiered.append(sid, messages[i : i + 2])
    assert await tiered.flush(20)
    client = (await tiered.hot.client()).redis
    await client.delete(*tiered.hot.keys.session(sid).data)
    assert not await tiered.hot.exists(sid)

    readers = [
        stack.worker("read", session=sid, readers=100, limit=5, name=f"read-{p}", stdin=True)
        for p in range(2)
    ]
    try:
        deadline = time.monotonic() + 30
        while not all(r.events("ready") for r in readers):
            for r in readers:
                assert r.poll() is None, f"{r.name} exited early: {r.stderr()[-2000:]}"
            assert time.monotonic() < deadline, "readers did not get ready"
            await asyncio.sleep(0.02)
        for r in readers:
            r.send_line("go")
        await wait_all(readers, 60)
    finally:
        kill_all(readers)

    loads = []
    for r in readers:
        (result,) = r.events("result")
        assert result["error_count"] == 0, result["errors"]
        assert result["distinct"] == [messages[-5:]]
        loads.append(result["stats"]["postgres_loads"])
    print(f"\npostgres_loads per process: {loads}")
    assert all(n <= 1 for n in loads), loads
    assert sum(loads) == 1, loads
    assert json.dumps(await tiered.load(sid, 5)) == json.dumps(messages[-5:])
