"""The memory store's turn lock is the process's: every loop and thread shares it.

newuser found that an Agent in the default memory mode, driven by threads that each run
``asyncio.run`` per job on one session (what the README allows: "An Agent may be driven by
any number of loops"), failed turns with ``RuntimeError: <asyncio.locks.Lock> is bound to a
different event loop`` (2 threads: 4 of 10 jobs, 12 of 20 messages stored) and made one turn
wait its whole ``lock_timeout`` with nothing holding the lock.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import pytest
from conftest import model_for

from vel import Agent
from vel.errors import SessionLockedError
from vel.stores._locks import KeyedLocks
from vel.testing import FakeOpenAIServer


def in_threads(count: int, job: Callable[[int], object]) -> list[BaseException]:
    """Run ``job(i)`` (a plain function) in ``count`` threads; the exceptions they raised."""
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            job(i)
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return errors


def test_one_memory_agent_driven_by_threads_on_one_session_stores_every_turn(
    srv: FakeOpenAIServer,
) -> None:
    agent = Agent(id="t", model=model_for(srv), policies={"lock_timeout": 20})
    started = time.monotonic()

    def worker(w: int) -> None:
        for i in range(5):
            asyncio.run(agent.run({"message": f"w{w} j{i}"}, session_id="shared"))

    assert in_threads(4, worker) == []
    elapsed = time.monotonic() - started
    stored = agent.ctxmgr.get_session_context("shared")
    assert len(stored) == 40
    users = [m["content"] for m in stored if m["role"] == "user"]
    assert sorted(users) == sorted(f"w{w} j{i}" for w in range(4) for i in range(5))
    # Turns never interleave: each user message is followed by its own answer.
    assert all(
        stored[k]["role"] == "user"
        and stored[k + 1]["content"] == f"You said: {stored[k]['content']}"
        for k in range(0, 40, 2)
    )
    assert elapsed < 20, "a turn waited for a lock nobody held"
    asyncio.run(agent.aclose())


def test_the_lock_excludes_across_loops_and_hands_over_first_come_first_served() -> None:
    locks = KeyedLocks()
    inside: list[int] = []
    order: list[int] = []
    overlap = threading.Event()
    first_in = threading.Event()

    async def turn(i: int) -> None:
        async with locks.hold("s", timeout=10):
            order.append(i)
            inside.append(i)
            if len(inside) > 1:
                overlap.set()
            first_in.set()
            await asyncio.sleep(0.05)
            inside.remove(i)

    def worker(i: int) -> None:
        if i > 0:
            first_in.wait(5)
            time.sleep(0.02 * i)  # queue up in order 1, 2, 3 behind 0
        asyncio.run(turn(i))

    assert in_threads(4, worker) == []
    assert not overlap.is_set()
    assert order == [0, 1, 2, 3]
    assert locks._locks == {}  # nothing kept once nobody holds or waits


def test_a_waiter_that_times_out_or_is_cancelled_leaves_the_lock_usable() -> None:
    locks = KeyedLocks()

    async def main() -> None:
        release = asyncio.Event()

        async def holder() -> None:
            async with locks.hold("s"):
                await release.wait()

        task = asyncio.create_task(holder())
        await asyncio.sleep(0.01)
        with pytest.raises(SessionLockedError):
            async with locks.hold("s", timeout=0.05):
                pass
        waiting = asyncio.create_task(locks.hold("s").__aenter__())
        await asyncio.sleep(0.01)
        waiting.cancel()
        release.set()
        await task
        with pytest.raises(asyncio.CancelledError):
            await waiting
        async with locks.hold("s", timeout=0.5):
            pass
        assert locks._locks == {}

    asyncio.run(main())


def test_a_waiter_cancelled_after_it_was_handed_the_lock_passes_it_on() -> None:
    """The handover and the waiter's cancellation race (the grant runs on the waiter's loop
    a moment after the release): the lock must not stay with a waiter that left."""
    locks = KeyedLocks()

    async def main() -> None:
        got_it = asyncio.Event()

        async def third() -> None:
            async with locks.hold("s", timeout=2):
                got_it.set()

        cm = locks.hold("s")
        await cm.__aenter__()
        second = asyncio.create_task(locks.hold("s").__aenter__())
        await asyncio.sleep(0.01)
        waiting_third = asyncio.create_task(third())
        await asyncio.sleep(0.01)
        await cm.__aexit__(None, None, None)  # hands the lock to `second` (grant scheduled)
        second.cancel()  # before the grant ran
        with pytest.raises(asyncio.CancelledError):
            await second
        await asyncio.wait_for(waiting_third, 2)
        assert got_it.is_set()
        assert locks._locks == {}

    asyncio.run(main())
