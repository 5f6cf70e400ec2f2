"""Postgres server CPU spent on a run: the CPU time of the backends connected to the bench's
own database, read from ``/proc`` while the run goes on.

On a machine shared with other work, turns/s moves with the load, while CPU per turn (the
client's, which the workers report, and the server's, which this measures) says what a mode
costs. Needs Postgres on this host and ``/proc/<pid>/stat`` readable (the same user, or
root); otherwise it reports nothing. A backend's CPU is sampled every ``interval`` seconds and
its last sample counts, so what a backend spends in its last interval before it exits is
missed (a few milliseconds per connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import os

import asyncpg

_PIDS = "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()"


def _cpu_seconds(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class ServerCpu:
    """Samples the CPU of ``database``'s backends through ``conn`` until :meth:`stop`."""

    def __init__(self, conn: asyncpg.Connection, database: str, interval: float = 0.05) -> None:
        self._conn = conn
        self._database = database
        self._interval = interval
        self._start: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._task: asyncio.Task[None] | None = None

    async def _sample(self, first: bool) -> None:
        for record in await self._conn.fetch(_PIDS, self._database):
            pid = int(record["pid"])
            seconds = _cpu_seconds(pid)
            if seconds is None:
                continue  # exited meanwhile (its last sample stands), or not readable here
            # A backend seen at the start counts from there; a later one from its fork.
            self._start.setdefault(pid, seconds if first else 0.0)
            self._last[pid] = seconds

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self._sample(False)

    async def start(self) -> None:
        await self._sample(True)
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> float | None:
        """Stop sampling; the backends' CPU seconds since :meth:`start` (None: unreadable)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._sample(False)
        if not self._last:  # no backend readable: another host or user
            return None
        return sum(self._last[pid] - self._start.get(pid, 0.0) for pid in self._last)
