"""Background renewal of a lease (turn locks, flush claims, warms) that is stopped by an
event, not cancellation.

On Python 3.11, ``asyncio.wait_for`` (used inside redis-py and asyncpg) drops a cancellation
that arrives as the awaited call completes; a renewal loop stopped by ``task.cancel()`` can
then keep running forever and its owner hang waiting for it. An event cannot be lost.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from vel._shield import CancelWatch
from vel.errors import VelError
from vel.logs import get_logger

log = get_logger("vel.lease")


class LeaseKeeper:
    """Calls ``renew()`` every ``interval`` seconds until :meth:`stop` or until it says the
    lease was lost (returns False). Failed renewals are logged (with ``session_id``) and
    retried next tick."""

    def __init__(
        self,
        renew: Callable[[], Awaitable[bool]],
        interval: float,
        what: str,
        session_id: str | None = None,
    ) -> None:
        self._renew = renew
        self._interval = interval
        self._what = what
        self._extra = {"session_id": session_id}
        self._stopped = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name=f"vel-lease {what}")

    async def _run(self) -> None:
        # A cancellation (its loop shutting down) ends the keeper even when a driver
        # swallowed it (Python 3.11's wait_for) or turned it into an error.
        watch = CancelWatch()
        while True:
            try:
                async with asyncio.timeout(self._interval):
                    await self._stopped.wait()
                return
            except TimeoutError:
                pass
            try:
                renewed = await self._renew()
            except VelError as exc:
                watch.check()
                log.warning("could not renew %s: %s", self._what, exc, extra=self._extra)
                continue
            watch.check()
            if not renewed:
                log.warning("%s was lost (its lease ran out)", self._what, extra=self._extra)
                return

    async def stop(self) -> None:
        self._stopped.set()
        await asyncio.wait({self._task})


class DeferredKeeper:
    """A :class:`LeaseKeeper` started only once its holder has held the lease ``after``
    seconds: most turns end before a renewal is due, and then no task is ever created (a task
    per turn costs more than the rest of a turn's bookkeeping). ``start`` makes the keeper."""

    def __init__(self, start: Callable[[], LeaseKeeper], after: float) -> None:
        self._keeper: LeaseKeeper | None = None
        self._later: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(
            after, self._begin, start
        )

    def _begin(self, start: Callable[[], LeaseKeeper]) -> None:
        self._later = None
        self._keeper = start()

    async def stop(self) -> None:
        """Stop renewing (idempotent)."""
        if self._later is not None:
            self._later.cancel()
            self._later = None
        if self._keeper is not None:
            await self._keeper.stop()


@asynccontextmanager
async def renewed(
    renew: Callable[[], Awaitable[bool]],
    lease: float,
    what: str,
    session_id: str | None = None,
) -> AsyncIterator[None]:
    """Keep a lease of ``lease`` seconds alive while the block runs: renewed at half of it,
    then every third of it. Most blocks end before then, and never start a task."""
    loop = asyncio.get_running_loop()
    keeper: LeaseKeeper | None = None

    def begin() -> None:
        nonlocal keeper
        keeper = LeaseKeeper(renew, lease / 3, what, session_id)

    # The keeper's first renewal comes one interval (a third) after it starts.
    later = loop.call_later(lease / 6, begin)
    try:
        yield
    finally:
        later.cancel()
        if keeper is not None:
            await keeper.stop()
