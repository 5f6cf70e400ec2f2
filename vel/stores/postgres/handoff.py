"""Lock handoff: a turn waiting for its session's turn lock is woken when the lock is released,
instead of polling for it with backoff (DESIGN.md 4: turns; migration 0008).

Waiting turns of one event loop queue per session, first come first served (a new turn
that finds a queue joins it rather than barging in); only the queue's head tries the lock
when it is woken. The release of a lease marked ``waited`` sends ``NOTIFY vel_turn_lock``
(payload: the session id) in its own transaction, and one connection per event loop, opened
when a turn of this loop first waits, listens to that channel: the heads of every process
and loop are woken by the same notification and try at once, so no process keeps the lock
to itself. A release in this loop also wakes its own head after :data:`LOCAL_WAKE` seconds,
in case the notification is lost (sent before the listener listened).

The lease row is marked ``waited`` by each failed attempt, and by a head that takes the lock
while more turns of its process queue behind it. Nothing here is needed for correctness:
every waiter still tries again after a bounded backoff, so a lost notification (a crashed
holder, a listener connection that failed) costs latency, never a turn.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from vel.stores.postgres.connector import log

CHANNEL = "vel_turn_lock"
# Seconds after a release in this loop that its own head is woken if no notification came
# first. Not at once: the head would then always beat other processes' heads, which learn
# of the release one hop later, and they would starve.
LOCAL_WAKE = 0.05


class Waiter:
    """One waiting turn's place in its session's queue."""

    __slots__ = ("woken",)

    def __init__(self) -> None:
        self.woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def rearm(self) -> None:
        """Forget an earlier wake-up (called just before each try at the lock, so that a
        release committed during the try is not missed)."""
        if self.woken.done():
            self.woken = asyncio.get_running_loop().create_future()

    async def sleep(self, seconds: float) -> None:
        """Wait until woken, or ``seconds`` at most."""
        if self.woken.done():
            return
        timer = asyncio.get_running_loop().call_later(seconds, _wake, self.woken)
        try:
            await self.woken
        finally:
            timer.cancel()


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Handoff:
    """The waiting turns of one event loop, per session, and the loop's listener connection.

    ``connect`` opens the listener connection (None: no listener; cross-process waits then
    rely on the backoff alone).
    """

    def __init__(self, connect: Callable[[], Awaitable[asyncpg.Connection]] | None) -> None:
        self._connect = connect
        self._queues: dict[str, deque[Waiter]] = {}
        # Local wake-ups due unless the release's notification comes first.
        self._fallbacks: dict[str, asyncio.TimerHandle] = {}
        self._conn: asyncpg.Connection | None = None
        self._listening: asyncio.Task[None] | None = None

    def join(self, session_id: str) -> Waiter:
        """Queue a waiter at the end of ``session_id``'s queue."""
        waiter = Waiter()
        self._queues.setdefault(session_id, deque()).append(waiter)
        return waiter

    def is_head(self, session_id: str, waiter: Waiter) -> bool:
        queue = self._queues.get(session_id)
        return queue is not None and queue[0] is waiter

    def queued(self, session_id: str) -> bool:
        """Whether turns of this loop wait for ``session_id``."""
        return session_id in self._queues

    def others(self, session_id: str) -> bool:
        """Whether more than one turn of this loop waits for ``session_id``."""
        queue = self._queues.get(session_id)
        return queue is not None and len(queue) > 1

    def leave(self, session_id: str, waiter: Waiter, *, wake_next: bool) -> None:
        """Take ``waiter`` out of its queue. A head that leaves without the lock (it gave up,
        failed or was cancelled) passes a wake-up on (``wake_next``): the lock may be free, and
        nobody else may be about to try. One that got the lock does not: its release will."""
        queue = self._queues.get(session_id)
        if queue is None:
            return
        was_head = queue[0] is waiter
        with contextlib.suppress(ValueError):
            queue.remove(waiter)
        if not queue:
            del self._queues[session_id]
        elif was_head and wake_next:
            _wake(queue[0].woken)

    def wake(self, session_id: str) -> None:
        """A release of ``session_id``: wake the head of its queue, if any."""
        queue = self._queues.get(session_id)
        if queue:
            _wake(queue[0].woken)

    def released(self, session_id: str) -> None:
        """A release of ``session_id`` in this loop: wake the head in :data:`LOCAL_WAKE`
        seconds unless the release's notification wakes it first."""
        if session_id in self._queues and session_id not in self._fallbacks:
            self._fallbacks[session_id] = asyncio.get_running_loop().call_later(
                LOCAL_WAKE, self._fallback, session_id
            )

    def _fallback(self, session_id: str) -> None:
        self._fallbacks.pop(session_id, None)
        self.wake(session_id)

    async def listen(self) -> None:
        """Make sure the listener connection is listening (best effort: on failure, waits
        rely on the backoff, and the next waiting turn tries again)."""
        if self._connect is None or (self._conn is not None and not self._conn.is_closed()):
            return
        if self._listening is None or self._listening.done():
            self._listening = asyncio.ensure_future(self._open())
        # asyncio.wait: a cancelled waiter does not cut off the opening the next waiter needs,
        # and an opening cancelled by aclose() does not raise in the waiter.
        await asyncio.wait({self._listening})

    async def _open(self) -> None:
        assert self._connect is not None
        conn: asyncpg.Connection | None = None
        try:
            conn = await self._connect()
            await conn.add_listener(CHANNEL, self._notified)
        except Exception as exc:
            log.debug("turn lock handoff: no listener connection (%s); waits poll", exc)
            if conn is not None:
                conn.terminate()
            return
        self._conn = conn

    def _notified(
        self,
        _conn: asyncpg.Connection | PoolConnectionProxy[Any],
        _pid: int,
        _channel: str,
        payload: object,
    ) -> None:
        session_id = str(payload)
        fallback = self._fallbacks.pop(session_id, None)
        if fallback is not None:
            fallback.cancel()
        self.wake(session_id)

    async def aclose(self) -> None:
        """Close the listener connection (waiters keep polling)."""
        for fallback in self._fallbacks.values():
            fallback.cancel()
        self._fallbacks.clear()
        if self._listening is not None and not self._listening.done():
            self._listening.cancel()
            # Its own end (cancelled, or failed) is swallowed; a cancellation of the caller
            # is not: gather raises it.
            await asyncio.gather(self._listening, return_exceptions=True)
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await asyncio.wait_for(conn.close(), 2.0)
            except Exception:
                conn.terminate()  # a frozen server: closing must not hang or fail
            except BaseException:
                conn.terminate()
                raise
