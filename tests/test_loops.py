"""Loop-end work (vel._loops.at_loop_end) and per-loop resources closed with their loop."""

from __future__ import annotations

import asyncio
import gc
import weakref

import pytest

from vel._loops import CLOSE, DRAIN, PerLoop, at_loop_end


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
