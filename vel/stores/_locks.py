"""In-process per-session locks, removed when nobody holds or waits for them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from vel import _fork
from vel.errors import SessionLockedError
from vel.metrics.histograms import LOCK_WAIT


class KeyedLocks:
    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}
        self.waits = 0
        _fork.forget_in_child(self)

    def _forget_after_fork(self) -> None:
        # Turns that held these ran on the parent's threads, which the child does not have.
        self._locks = {}

    @asynccontextmanager
    async def hold(self, key: str, timeout: float | None = None) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (None, 0))
        if lock is None:
            lock = asyncio.Lock()
        self._locks[key] = (lock, users + 1)
        try:
            if lock.locked():
                self.waits += 1
            started = time.perf_counter()
            try:
                async with asyncio.timeout(timeout):
                    await lock.acquire()
                LOCK_WAIT.observe(time.perf_counter() - started)
            except TimeoutError:
                raise SessionLockedError(
                    f"session {key!r} is locked by another turn (waited {timeout} s)"
                ) from None
            try:
                yield
            finally:
                lock.release()
        finally:
            held, users = self._locks.get(key, (None, 0))
            if held is not lock:
                pass  # forgotten by a fork that happened meanwhile (this is the child)
            elif users <= 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)
