"""Loop-end work (vel._loops.at_loop_end) and per-loop resources closed with their loop."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import warnings
import weakref
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing

import pytest

from vel._asyncgens import Owned
from vel._loops import CLOSE, DRAIN, PerLoop, at_loop_end, hold_end


class Resource:
    def __init__(self) -> None:
        self.closed = False


def test_per_loop_resources_are_closed_when_their_loop_ends() -> None:
    made: list[Resource] = []

    async def make() -> Resource:
        made.append(Resource())
        return made[-1]

    async def close(item: Resource) -> None:
        item.closed = True

    per_loop = PerLoop(make, close)

    async def use() -> None:
        assert await per_loop.get() is await per_loop.get()

    for _ in range(3):
        asyncio.run(use())
    assert [r.closed for r in made] == [True, True, True]
    assert len(per_loop._items) == 0  # nothing of the ended loops is kept


def test_drain_work_runs_before_close_work_and_owners_stay_collectable() -> None:
    order: list[str] = []

    class Owner:
        async def close(self) -> None:
            order.append("close")

        async def drain(self) -> None:
            order.append("drain")

    class Gone:
        async def close(self) -> None:
            order.append("gone")

    kept: list[Owner] = []

    async def main() -> weakref.ref[Gone]:
        owner = Owner()
        kept.append(owner)
        at_loop_end(owner, Owner.close, CLOSE)
        at_loop_end(owner, Owner.drain, DRAIN)
        at_loop_end(owner, Owner.drain, DRAIN)  # once per owner and loop
        gone = Gone()
        at_loop_end(gone, Gone.close)
        ref = weakref.ref(gone)
        del gone
        gc.collect()
        return ref

    ref = asyncio.run(main())
    assert ref() is None  # registering work did not keep its owner alive
    assert order == ["drain", "close"]


def test_loop_end_work_is_bounded_and_its_failure_only_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Slow:
        async def close(self) -> None:
            await asyncio.sleep(30)

    class Failing:
        async def close(self) -> None:
            raise RuntimeError("boom")

    keep = [Slow(), Failing()]

    async def main() -> None:
        at_loop_end(keep[0], Slow.close)
        at_loop_end(keep[1], Failing.close)

    loop = asyncio.new_event_loop()
    started = loop.time()
    loop.run_until_complete(main())
    loop.run_until_complete(loop.shutdown_asyncgens())
    assert loop.time() - started < 5
    loop.close()
    assert "boom" in caplog.text


def test_loop_end_work_first_asked_for_inside_an_owned_step_still_runs() -> None:
    """The loop's first vel use may come inside a turn stream (an Owned step, whose own
    generators the loop does not track): the loop-end generator made there is tracked."""
    ran: list[str] = []

    async def work(owner: Resource) -> None:
        ran.append("closed")

    owner = Resource()

    async def inner() -> AsyncGenerator[int, None]:
        at_loop_end(owner, work)
        yield 1

    async def main() -> None:
        async with aclosing(Owned(inner())) as steps:
            async for _ in steps:
                pass

    asyncio.run(main())
    assert ran == ["closed"]


def test_generators_first_iterated_in_an_owned_step_are_left_to_their_owner() -> None:
    """The loop's shutdown closes the generator the program holds, which closes what it
    owns in order; it does not close the owned one itself (nor while it is closing)."""
    events: list[str] = []

    async def owned() -> AsyncGenerator[int, None]:
        try:
            yield 1
        finally:
            events.append("owned closed")

    async def outer() -> AsyncGenerator[int, None]:
        done = hold_end()
        try:
            async with aclosing(Owned(owned())) as steps:
                async for item in steps:
                    yield item
        finally:
            events.append("outer closed")
            done()

    kept: list[AsyncGenerator[int, None]] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stream = outer()
        kept.append(stream)
        assert await anext(stream) == 1
        tracked = loop._asyncgens  # type: ignore[attr-defined]
        assert stream in tracked and len(tracked) == 2  # the stream and vel's loop-end hook

    asyncio.run(main())
    assert events == ["owned closed", "outer closed"]


def test_work_that_loop_end_work_registers_runs_in_the_same_end() -> None:
    """The drain may open a pool this loop had not needed yet: its close, registered during
    the loop's end, runs in that end (it started an end of its own that never ran: the pool
    stayed open, and asyncio warned that vel's loop-end generator came after its shutdown)."""
    ran: list[str] = []
    drained, opened = Resource(), Resource()

    @contextlib.asynccontextmanager
    async def transaction() -> AsyncIterator[None]:
        yield

    async def close(owner: Resource) -> None:
        ran.append("close")

    async def drain(owner: Resource) -> None:
        async with transaction():  # a generator first iterated after the shutdown began
            ran.append("drain")
        at_loop_end(opened, close)

    async def main() -> None:
        at_loop_end(drained, drain, DRAIN)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        asyncio.run(main())
    assert ran == ["drain", "close"]
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []
