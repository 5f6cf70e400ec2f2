"""Resources bound to the event loop that created them.

asyncpg pools and redis.asyncio connections only work on the loop that made them. Agents are
often built once and driven from several loops (``asyncio.run`` called twice, or the plain
``agent.ctxmgr.*`` calls, which run on vel's helper thread), so each loop gets its own
resource, created on first use.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class PerLoop(Generic[T]):
    def __init__(
        self,
        factory: Callable[[], Awaitable[T]],
        closer: Callable[[T], Awaitable[None]],
    ) -> None:
        self._factory = factory
        self._closer = closer
        self._items: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, T] = (
            weakref.WeakKeyDictionary()
        )
        self._creating: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
            weakref.WeakKeyDictionary()
        )

    def current(self) -> T | None:
        return self._items.get(asyncio.get_running_loop())

    async def get(self) -> T:
        loop = asyncio.get_running_loop()
        item = self._items.get(loop)
        if item is not None:
            return item
        lock = self._creating.setdefault(loop, asyncio.Lock())
        async with lock:
            item = self._items.get(loop)
            if item is None:
                item = await self._factory()
                self._items[loop] = item
            return item

    async def aclose(self) -> None:
        """Close this loop's resource; forget those of loops that are gone or closed."""
        loop = asyncio.get_running_loop()
        item = self._items.pop(loop, None)
        for other in list(self._items):
            if other.is_closed():
                self._items.pop(other, None)
        if item is not None:
            await self._closer(item)
