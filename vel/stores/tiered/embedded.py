"""The embedded flusher's lifecycle: one flusher task per event loop that drives the store,
ended with its loop whether or not the store was closed (DESIGN.md 4, lifecycle).

A loop that ends without ``aclose()`` (``asyncio.run(main())`` in a script) spends at most
:data:`LOOP_END_DRAIN` seconds flushing the sessions this process wrote; what is left stays
dirty in Redis, without a TTL, for the next flusher, and one warning line says so. ``aclose()``
stops the task and drains this process's writes for up to the store's ``drain_timeout``.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Sequence

from vel import _fork
from vel._loops import DRAIN, at_loop_end
from vel._shield import CancelWatch
from vel._sync import in_helper_thread
from vel.errors import VelError
from vel.logs import get_logger
from vel.stores.redis import RedisStore
from vel.stores.tiered.flusher import Flusher
from vel.totals import Totals

log = get_logger("vel.tiered")

# Seconds a loop that ends without aclose() spends flushing this process's writes (its
# process is about to exit).
LOOP_END_DRAIN = 0.4
# Seconds it then spends sending this process's counters (`vel stats`).
LOOP_END_REPORT = 0.1
# Sessions tracked for that drain; beyond this many, none more is tracked.
WRITTEN_MAX = 10_000


class EmbeddedFlusher:
    """Runs ``flusher`` in each loop that writes through the store (when ``enabled``), and
    remembers what this process wrote so that an ending loop or ``aclose()`` can push it to
    Postgres."""

    def __init__(
        self, hot: RedisStore, flusher: Flusher, *, enabled: bool, reports: Sequence[Totals]
    ) -> None:
        self.hot = hot
        self.flusher = flusher
        self.enabled = enabled
        self.reports = list(reports)
        # The flusher task of each loop driving the store (keys weak: dropped when their loop
        # ends, see _loop_ended).
        self._tasks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Task[None]] = (
            weakref.WeakKeyDictionary()
        )
        # Whether this process wrote anything that a drain on close should push to Postgres.
        self.wrote = False
        # Sessions this process wrote since its last drain, which a loop ending without
        # aclose() tries to flush (bounded: beyond WRITTEN_MAX, none is tracked).
        self._written: set[str] = set()
        _fork.forget_in_child(self)

    def _forget_after_fork(self) -> None:
        # The parent's flusher task belongs to a loop no thread of the child runs: the child
        # starts its own flusher on first use, and drains only its own writes.
        self._tasks = weakref.WeakKeyDictionary()
        self.wrote = False
        self._written = set()

    def ensure(self) -> None:
        """Start the flusher on the running loop if it has none: it runs in whichever loop
        drives the store, and ends with that loop (see :meth:`_loop_ended`)."""
        if not self.enabled or in_helper_thread():
            return
        loop = asyncio.get_running_loop()
        task = self._tasks.get(loop)
        if task is not None and not task.done():
            return
        self._tasks[loop] = loop.create_task(self.flusher.run(), name="vel-flusher")
        at_loop_end(self, EmbeddedFlusher._loop_ended, DRAIN)

    def note_write(self, session_id: str) -> None:
        self.wrote = True
        if len(self._written) < WRITTEN_MAX:
            self._written.add(session_id)

    async def _loop_ended(self) -> None:
        """The loop that ran a flusher ends without ``aclose()`` (``asyncio.run`` has
        cancelled the flusher task by now): flush this process's writes, best effort and
        briefly. The loop's pools are closed after this."""
        task = self._tasks.pop(asyncio.get_running_loop(), None)
        if task is None or not self._written:
            return
        left = len(self._written)
        # The deadline's cancellation can be dropped by a driver (Python 3.11's wait_for in
        # redis-py): the watch still sees it, so the drain never outlives its deadline.
        watch = CancelWatch()
        try:
            async with asyncio.timeout(LOOP_END_DRAIN):
                while left:
                    await self.flusher.flush_once()
                    watch.check()
                    left = await self._unflushed_writes()
                    watch.check()
        except (TimeoutError, VelError):
            pass
        # The counters this process grew (flushes, hits) go to Redis for `vel stats`, which
        # sums every process's: a short-lived process would otherwise never report them.
        try:
            async with asyncio.timeout(LOOP_END_REPORT):
                for totals in self.reports:
                    await totals.publish()
                    watch.check()
        except (TimeoutError, VelError):
            pass
        if left:
            log.warning(
                "event loop ended (without Agent.aclose()) before %d session(s) written by "
                "this process reached Postgres; what is unflushed stays in Redis, without a "
                "TTL, for the next flusher (close the Agent, or use `async with`, to wait)",
                left,
            )

    async def _unflushed_writes(self) -> int:
        """How many sessions this process wrote still hold unflushed writes (forgetting
        the others)."""
        ids = list(self._written)
        pending = await self.hot.pending(ids, 1)
        for sid, item in zip(ids, pending, strict=True):
            if item is None or (not item.rows and item.fgen == item.gen):
                self._written.discard(sid)
        return len(self._written)

    async def stop(self, drain_timeout: float) -> bool:
        """Stop this loop's flusher task and drain this process's writes (at most
        ``drain_timeout`` seconds); True when nothing of them is left unflushed (or this
        loop ran no flusher and Redis answered it last)."""
        # Tasks of other loops end with their loops (_loop_ended).
        task = self._tasks.pop(asyncio.get_running_loop(), None)
        ran = False
        if task is not None and not task.done():
            ran = True
            self.flusher.stop()
            try:
                await task
            except Exception:
                log.exception("embedded flusher failed")
        # Only this process's own writes are worth waiting for at close; with none, the
        # other flushers' backlog is theirs.
        if not self.wrote or not self.enabled:
            return ran and not self.flusher.outage.ongoing  # Redis answered the last flush
        # Drained even when this loop ran no flusher: a program that ran each job in its own
        # asyncio.run() closes in a fresh loop, and what the earlier loops' short loop-end
        # drains left would otherwise wait in Redis for another process's flusher.
        drained = await self.flusher.drain(drain_timeout)
        if not drained:
            why = self.flusher.last_error
            log.warning(
                "closing before every write of this process reached Postgres%s; "
                "what is unflushed stays in Redis, without a TTL, for the next flusher",
                f" ({why})" if why is not None else f" within {drain_timeout} s",
            )
        return drained
