"""Summaries shared by OS processes ('database' and 'redis' modes): recall through a summary
with turns spread over three workers, single-flight summarisation, a killed summariser's
work completed by another worker without any turn waiting."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import schema_dsn
from workers import HERE, Proc, worker_env

from vel.summaries.prompt import INSTRUCTIONS
from vel.testing import FakeOpenAIServer

pytestmark = pytest.mark.slow


class Worker:
    """One summary_worker.py process, driven line by line."""

    def __init__(self, proc: Proc) -> None:
        self.proc = proc
        self.seen = 0
        self.expect("ready", 30)

    def expect(self, event: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            lines = self.proc.lines()
            for line in lines[self.seen :]:
                self.seen += 1
                if line.get("event") == event:
                    return line
            assert self.proc.poll() is None, f"{self.proc.name} exited: {self.proc.stderr()}"
            assert time.monotonic() < deadline, f"{self.proc.name}: no {event!r} in time"
            time.sleep(0.02)

    def send(self, **command: Any) -> None:
        self.proc.send_line(json.dumps(command))

    def ask(self, event: str, timeout: float = 30, **command: Any) -> dict[str, Any]:
        self.send(**command)
        return self.expect(event, timeout)

    def turn(self, message: str) -> dict[str, Any]:
        return self.ask("answer", op="turn", message=message)


@pytest.fixture
def env_of(
    srv: FakeOpenAIServer, pg_dsn: str, migrated_schema: str, redis_url: str, key_prefix: str
) -> dict[str, str]:
    return worker_env(
        postgres_dsn=schema_dsn(pg_dsn, migrated_schema),
        redis_url=redis_url,
        key_prefix=key_prefix,
        openai_url=srv.base_url,
    )


@pytest.fixture
def spawn(env_of: dict[str, str], tmp_path: Path) -> Iterator[Any]:
    procs: list[Proc] = []

    def start(storage: str, sid: str, *, every: int = 10, lease: float = 60.0) -> Worker:
        argv = [sys.executable, str(HERE / "summary_worker.py"), storage, sid, "4", str(every)]
        proc = Proc([*argv, str(lease)], env_of, tmp_path, f"w{len(procs)}", stdin=True)
        procs.append(proc)
        return Worker(proc)

    yield start
    for proc in procs:
        proc.kill()


def summary_requests(srv: FakeOpenAIServer) -> list[dict[str, Any]]:
    return [r for r in srv.requests if r["messages"][0].get("content") == INSTRUCTIONS]


def wait_summary(worker: Worker, covered: int, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        seen = worker.ask("summary", op="summary")
        if seen["covered"] >= covered:
            return seen
        assert time.monotonic() < deadline, f"summary stuck at {seen['covered']}"
        time.sleep(0.1)


@pytest.mark.parametrize("storage", ["database", "redis"])
@pytest.mark.parametrize("summarize", [True, False])
async def test_recall_with_turns_spread_over_three_processes(
    srv: FakeOpenAIServer, spawn: Any, storage: str, summarize: bool
) -> None:
    sid = f"sp-{uuid.uuid4().hex[:8]}"
    workers = [spawn(storage, sid, every=10 if summarize else 0) for _ in range(3)]
    assert workers[0].turn("My name is Alice")["answer"] == "You said: My name is Alice"
    for i in range(20):
        workers[(i + 1) % 3].turn(f"unrelated topic number {i}")
    if summarize:
        # Background work: the question waits for the summary to reach turn 1's messages
        # (it did long before; this only makes the test independent of timing).
        wait_summary(workers[1], 2)
    answer = workers[2].turn("What is my name?")["answer"]
    assert answer == ("Your name is Alice." if summarize else "I don't know your name.")
    calls = summary_requests(srv)
    if summarize:
        # At most one call per K new messages: 44 stored with the question's turn, 40 of
        # them older than the window; each call summarises at least K of them, never twice.
        assert 1 <= len(calls) <= (44 - 4) // 10
        for request in calls:
            new = request["messages"][1]["content"].partition("New messages:\n")[2]
            assert len(new.splitlines()) >= 10
    else:
        assert calls == []
    for worker in workers:
        worker.send(op="quit")
        worker.proc.check(worker.proc.wait(30))


@pytest.mark.parametrize("storage", ["database", "redis"])
async def test_one_summarisation_call_when_three_processes_race(
    srv: FakeOpenAIServer, spawn: Any, storage: str
) -> None:
    sid = f"sf-{uuid.uuid4().hex[:8]}"
    workers = [spawn(storage, sid) for _ in range(3)]
    history = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i}"}
        for i in range(30)
    ]
    history[0]["content"] = "My name is Alice"
    workers[0].ask("set", op="set", messages=history)
    srv.summary_latency = 1.0  # the first holds the lease while the others try
    for worker in workers:
        worker.send(op="run_once")
    written = [w.expect("ran", 30)["written"] for w in workers]
    assert sorted(written) == [0, 0, 1]
    assert len(summary_requests(srv)) == 1
    assert wait_summary(workers[2], 26)["covered"] == 26  # 30 - the window of 4
    for worker in workers:
        worker.send(op="quit")


@pytest.mark.parametrize("storage", ["database", "redis"])
async def test_a_killed_summariser_is_taken_over_and_no_turn_waits(
    srv: FakeOpenAIServer, spawn: Any, storage: str
) -> None:
    sid = f"sk-{uuid.uuid4().hex[:8]}"
    doomed = spawn(storage, sid, lease=1.0)
    other = spawn(storage, sid, lease=1.0)
    srv.summary_latency = 30.0  # doomed never gets its answer
    doomed.turn("My name is Alice")
    for i in range(6):  # 14 messages: lag 10 after the 7th turn, summarisation starts
        doomed.turn(f"topic {i}")
    deadline = time.monotonic() + 10
    while not summary_requests(srv):
        assert time.monotonic() < deadline, "no summarisation started"
        await asyncio.sleep(0.02)
    doomed.proc.signal(signal.SIGKILL)
    doomed.proc.wait(10)
    srv.summary_latency = 0.0
    seconds = []
    covered = 0
    deadline = time.monotonic() + 30
    while covered < 10:  # the other worker's turns go on; its summariser takes over
        seconds.append(other.turn("and another thing")["seconds"])
        covered = other.ask("summary", op="summary")["covered"]
        assert time.monotonic() < deadline, "nobody completed the summary"
        await asyncio.sleep(0.3)
    # No turn waited for a summariser (the dead one's call would have lasted 30 s).
    assert max(seconds) < 5.0
    assert other.turn("What is my name?")["answer"] == "Your name is Alice."
    other.send(op="quit")
    other.proc.check(other.proc.wait(30))
