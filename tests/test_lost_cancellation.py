"""A cancellation that a driver drops still ends the turn: no tool runs, nothing is stored
after the deadline, and a cancellation during the commit follows the documented rule.

Failing input 8 of issue 12: on Python 3.11, ``asyncio.wait_for`` (redis-py wraps sending a
command in one because vel sets ``socket_timeout``; asyncpg uses it too) drops a cancellation
that arrives as the awaited call completes: the call returns normally, the task's
``cancelling()`` count alone remembers the request. A redis-mode turn under
``asyncio.timeout(0.004)`` then went on, ran its tool and returned its answer 0.6 s late.
Python 3.12 fixed ``wait_for``, but any driver may do the same, so the store here drops the
cancellation itself, exactly as 3.11's ``wait_for`` did, on every Python: vel must notice
(``vel._shield.CancelWatch``) after each backend call of the turn.

The deadline is made to expire while the chosen store call waits (the store moves it), so
each case is deterministic.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import pytest
from conftest import model_for

import vel
from vel import Agent
from vel.messages import Message
from vel.stores.memory import MemoryStore
from vel.testing import FakeOpenAIServer

HOLD = 0.3  # seconds the dropping call waits after the cancellation arrived


async def wait_dropping_cancellation(seconds: float) -> bool:
    """Wait ``seconds``; a cancellation meanwhile is dropped (what Python 3.11's wait_for
    does when it arrives as the inner call completes). True if one was dropped."""
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        # Neither re-raised nor uncancel()ed: only the task's cancelling() count keeps it.
        await asyncio.sleep(HOLD)
        return True
    return False


class DroppingStore(MemoryStore):
    """A memory store whose call ``where`` (``lock``, ``load`` or ``commit``) behaves like
    a 3.11 driver: when it starts, ``on_call`` fires (the test cancels the turn then), and
    the cancellation is dropped."""

    def __init__(self, where: str, on_call: Callable[[], None]) -> None:
        super().__init__()
        self.where = where
        self.on_call = on_call
        self.dropped = 0
        self.armed = False

    async def _driver(self, what: str) -> None:
        if self.armed and what == self.where:
            self.armed = False
            self.on_call()
            self.dropped += await wait_dropping_cancellation(HOLD)

    def turn_lock(
        self, session_id: str, timeout: float | None = None
    ) -> AbstractAsyncContextManager[None]:
        @asynccontextmanager
        async def locked() -> AsyncIterator[None]:
            async with MemoryStore.turn_lock(self, session_id, timeout):
                await self._driver("lock")
                yield

        return locked()

    async def load(self, session_id: str, limit: int | None = None) -> list[Message]:
        await self._driver("load")
        return await super().load(session_id, limit)

    async def append(
        self,
        session_id: str,
        messages: Sequence[Message],
        message_ids: Sequence[str] | None = None,
    ) -> int:
        seq = await super().append(session_id, messages, message_ids)
        if messages:
            await self._driver("commit")  # the reply of a write that was applied
        return seq


def tool_log() -> tuple[list[str], Any]:
    ran: list[str] = []

    async def note(tag: str) -> str:
        """Record that the turn ran its tool.

        Args:
            tag: the turn's tag.
        """
        ran.append(tag)
        return f"noted {tag}"

    return ran, note


async def cancelled_turn(
    where: str, how: str, srv: FakeOpenAIServer
) -> tuple[BaseException | None, DroppingStore, list[str], float]:
    """One turn (a tool call, then an answer) cancelled by ``how`` while the store's
    ``where`` call runs; returns what ``run()`` raised (None: it returned), the store, the
    tools that ran, and how long after the cancellation ``run()`` ended."""
    loop = asyncio.get_running_loop()
    deadline: asyncio.Timeout | None = None
    turn_task: asyncio.Task[Any] | None = None
    cancelled_at: list[float] = []

    def cancel_now() -> None:
        cancelled_at.append(time.monotonic())
        if how == "timeout":
            assert deadline is not None
            deadline.reschedule(loop.time())  # expires at once: the deadline passes now
        else:
            assert turn_task is not None
            turn_task.cancel()

    store = DroppingStore(where, cancel_now)
    ran, note = tool_log()
    async with Agent(id="lc", model=model_for(srv), session_storage=store, tools=[note]) as agent:
        await agent.run({"message": "first"}, session_id="s")
        srv.requests.clear()
        store.armed = True

        async def turn() -> None:
            nonlocal deadline
            async with asyncio.timeout(None) as deadline:
                await agent.run({"message": 'late [[call note {"tag": "late"}]]'}, session_id="s")

        turn_task = asyncio.create_task(turn())
        raised: BaseException | None = None
        try:
            await turn_task
        except (TimeoutError, asyncio.CancelledError) as exc:
            raised = exc
        ended = time.monotonic()
        # The session's lock is free: the next turn, not waiting at all, runs.
        agent.lock_timeout = 0
        await agent.run({"message": "next"}, session_id="s")
    assert store.dropped == 1, "the store did not drop the cancellation"
    return raised, store, ran, ended - cancelled_at[0]


def contents(messages: list[Message]) -> list[Any]:
    return [m.get("content") for m in messages if m["role"] == "user"]


@pytest.mark.parametrize("how", ["timeout", "task.cancel"])
@pytest.mark.parametrize("where", ["lock", "load"])
async def test_a_cancellation_dropped_before_the_model_ends_the_turn_there(
    where: str, how: str, srv: FakeOpenAIServer
) -> None:
    """Dropped while the turn takes its lock or reads its window: the model is never called,
    no tool runs, nothing of the turn is stored, and the caller gets the cancellation
    (TimeoutError from ``asyncio.timeout``) as soon as the dropping call returns."""
    raised, store, ran, late = await cancelled_turn(where, how, srv)
    expected = TimeoutError if how == "timeout" else asyncio.CancelledError
    assert isinstance(raised, expected), raised
    assert vel.turn_committed(raised) is False
    assert ran == []
    assert [r for r in srv.requests if "late" in str(r)] == []
    assert contents(await store.load("s")) == ["first", "next"]
    assert late < HOLD + 1.0  # not after the model's steps and the tool


@pytest.mark.parametrize("how", ["timeout", "task.cancel"])
async def test_a_cancellation_dropped_during_the_commit_is_raised_after_it(
    how: str, srv: FakeOpenAIServer
) -> None:
    """Dropped while the commit's write is answered: the documented rule for a cancellation
    during the commit holds (the turn is stored whole, then the cancellation propagates and
    ``turn_committed`` says the turn was stored); ``run()`` does not return as if in time."""
    raised, store, ran, _ = await cancelled_turn("commit", how, srv)
    expected = TimeoutError if how == "timeout" else asyncio.CancelledError
    assert isinstance(raised, expected), raised
    assert vel.turn_committed(raised) is True
    assert ran == ["late"]  # the tool ran before the commit, in time
    assert contents(await store.load("s")) == [
        "first",
        'late [[call note {"tag": "late"}]]',
        "next",
    ]
