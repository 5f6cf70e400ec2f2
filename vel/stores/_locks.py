"""In-process per-session locks, shared by every event loop and thread of the process, removed
when nobody holds or waits for them.

An Agent may be driven by several loops at once (threads each running ``asyncio.run`` per job),
and the memory store's sessions are the process's, so its turn lock cannot be an
``asyncio.Lock`` (bound to the first loop that waits on it). Each key's state is guarded by one
``threading.Lock`` (never held across an await); a waiter parks on a future of its own loop,
and a release hands the lock to the oldest waiter directly (first come, first served) through
that loop's ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

from vel import _fork
from vel.errors import SessionLockedError
from vel.metrics.histograms import LOCK_WAIT

_Waiter = tuple[asyncio.AbstractEventLoop, "asyncio.Future[None]"]


class _KeyLock:
    __slots__ = ("owner", "users", "waiters")

    def __init__(self) -> None:
        # Who holds it: the holder's future once handed over, ``True`` if taken at once,
        # None if free.
        self.owner: asyncio.Future[None] | bool | None = None
        self.users = 0  # holders and waiters, so the entry goes when the last one leaves
        self.waiters: deque[_Waiter] = deque()


class KeyedLocks:
    """One FIFO lock per key, usable from any loop and thread (see the module docstring)."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, _KeyLock] = {}
        self.waits = 0
        _fork.forget_in_child(self)

    def _forget_after_fork(self) -> None:
        # Turns that held these ran on the parent's threads, which the child does not have.
        self._guard = threading.Lock()
        self._locks = {}

    @asynccontextmanager
    async def hold(self, key: str, timeout: float | None = None) -> AsyncIterator[None]:
        """Hold ``key``'s lock for the block.

        Args:
            timeout: seconds to wait for it (None: as long as it takes).

        Raises:
            SessionLockedError: another holder kept it for ``timeout`` seconds.
        """
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        with self._guard:
            entry = self._locks.get(key)
            if entry is None:
                entry = self._locks[key] = _KeyLock()
            entry.users += 1
            waiter: asyncio.Future[None] | None = None
            if entry.owner is None:
                entry.owner = True
            else:
                waiter = loop.create_future()
                entry.waiters.append((loop, waiter))
                self.waits += 1
        held = waiter is None
        try:
            if waiter is not None:
                try:
                    async with asyncio.timeout(timeout):
                        await waiter
                except TimeoutError:
                    raise SessionLockedError(
                        f"session {key!r} is locked by another turn (waited {timeout} s)"
                    ) from None
                finally:
                    # Handed over (even if this waiter then timed out or was cancelled: it
                    # passes the lock on below) or still queued (it leaves the queue).
                    held = self._settle(entry, loop, waiter)
            # Every acquisition, an uncontended one too (its wait is ~0).
            LOCK_WAIT.observe(time.perf_counter() - started)
            yield
        finally:
            self._leave(key, entry, held)

    def _settle(
        self, entry: _KeyLock, loop: asyncio.AbstractEventLoop, waiter: asyncio.Future[None]
    ) -> bool:
        """Whether ``waiter`` was handed the lock; one still queued leaves the queue."""
        with self._guard:
            if entry.owner is waiter:
                return True
            with suppress(ValueError):
                entry.waiters.remove((loop, waiter))
            return False

    def _leave(self, key: str, entry: _KeyLock, held: bool) -> None:
        with self._guard:
            if held:
                entry.owner = None
                while entry.waiters:
                    loop, waiter = entry.waiters.popleft()
                    try:
                        loop.call_soon_threadsafe(_grant, waiter)
                    except RuntimeError:
                        continue  # its loop is closed: it waits no more
                    entry.owner = waiter
                    break
            entry.users -= 1
            # A fork meanwhile forgot the entry (this is the child): nothing to remove.
            if entry.users <= 0 and self._locks.get(key) is entry:
                del self._locks[key]


def _grant(waiter: asyncio.Future[None]) -> None:
    # A waiter cancelled (or timed out) meanwhile finds itself the owner in _settle and
    # passes the lock on when it leaves.
    if not waiter.done():
        waiter.set_result(None)
