"""Cumulative counters shared through Redis, so ``vel stats`` can read every process's work.

Each process keeps its counters in memory (cheap per turn) and adds what changed since its
last report to one Redis hash at most once per ``interval`` (one pipelined call, not one per
turn). Flushed messages are also added to a per-second key that expires after a few minutes,
which gives a flush rate over the last minute without sampling twice.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from vel import _fork
from vel.errors import StoreError
from vel.logs import get_logger

if TYPE_CHECKING:
    from vel.stores.redis import RedisStore

__all__ = ["RATE_WINDOW", "Totals", "read_totals"]

log = get_logger("vel.totals")

RATE_WINDOW = 60  # seconds the flush rate is averaged over
_SECOND_TTL = 300


class Totals:
    """Publishes the growth of some counter dicts into the prefix's totals hash.

    Args:
        hot: the Redis store whose prefix (and connection) is used.
        sources: counter dicts owned by this process (their names must not collide).
        interval: minimum seconds between two reports.
    """

    def __init__(
        self, hot: RedisStore, sources: Sequence[Mapping[str, float]], interval: float = 1.0
    ) -> None:
        self.hot = hot
        self.sources = list(sources)
        self.interval = interval
        self._sent: dict[str, float] = {}
        self._last = time.monotonic()
        self._task: asyncio.Task[None] | None = None
        _fork.forget_in_child(self)

    def _forget_after_fork(self) -> None:
        # What the counters hold so far is the parent's to report: a child reporting it too
        # would count it twice. A report in flight belongs to the parent's loop.
        self._sent = {name: value for source in self.sources for name, value in source.items()}
        self._task = None

    def _deltas(self) -> dict[str, float]:
        deltas: dict[str, float] = {}
        for source in self.sources:
            for name, value in source.items():
                delta = value - self._sent.get(name, 0)
                if delta:
                    deltas[name] = delta
        return deltas

    def due(self) -> bool:
        return time.monotonic() - self._last >= self.interval

    async def publish(self) -> None:
        """Send what grew since the last report (a failed report is retried next time)."""
        self._last = time.monotonic()
        deltas = self._deltas()
        if not deltas:
            return
        keys = self.hot.keys
        second = int(time.time())

        async def run(c: Any) -> None:
            pipe = c.redis.pipeline(transaction=False)
            for name, delta in deltas.items():
                pipe.hincrbyfloat(keys.totals, name, delta)
            flushed = int(deltas.get("flushed_messages", 0))
            if flushed:
                pipe.incrby(keys.flushed_in(second), flushed)
                pipe.expire(keys.flushed_in(second), _SECOND_TTL)
            await pipe.execute()

        try:
            await self.hot.call("totals", run)
        except StoreError as exc:
            log.debug("could not report counters: %s", exc)
            return
        for name, delta in deltas.items():
            self._sent[name] = self._sent.get(name, 0) + delta

    def maybe_publish(self) -> None:
        """Start a report in the background when one is due (never blocks the caller)."""
        if not self.due() or (self._task is not None and not self._task.done()):
            return
        self._last = time.monotonic()
        self._task = asyncio.get_running_loop().create_task(self.publish(), name="vel-totals")

    async def finish(self, final: bool = True) -> None:
        """Wait for a report in flight, then (when ``final``) send the last growth."""
        task, self._task = self._task, None
        if task is not None and task.get_loop() is asyncio.get_running_loop():
            await task
        if final:
            await self.publish()


async def read_totals(hot: RedisStore) -> tuple[dict[str, float], float]:
    """Return (every process's cumulative counters, messages flushed per second over the
    last :data:`RATE_WINDOW` seconds)."""
    keys = hot.keys
    now = int(time.time())
    seconds = [keys.flushed_in(s) for s in range(now - RATE_WINDOW + 1, now + 1)]

    async def run(c: Any) -> tuple[dict[bytes, bytes], list[bytes | None]]:
        pipe = c.redis.pipeline(transaction=False)
        pipe.hgetall(keys.totals)
        pipe.mget(seconds)
        counters, per_second = await pipe.execute()
        return counters, per_second

    counters, per_second = await hot.call("read totals", run)
    totals = {k.decode(): float(v) for k, v in counters.items()}
    rate = sum(int(v) for v in per_second if v is not None) / RATE_WINDOW
    return totals, rate
