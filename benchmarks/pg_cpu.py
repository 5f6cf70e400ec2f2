"""Postgres server CPU spent on the bench's own database, sampled from ``/proc``.

Every backend serving the bench's database (``pg_stat_activity.datname``) is read from
``/proc/<pid>/stat`` (user + system time) every :data:`PERIOD` seconds while the workers
run; a backend's CPU is its last reading minus its first (or minus nothing when it started
during the run). Backends exit with their workers, so the last ``PERIOD`` of each is missed:
the figure is a slight undercount. Only for a Postgres on this machine (Linux); elsewhere
the sampler reports nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

import asyncpg

PERIOD = 0.05
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_HAVE_PROC = os.path.exists("/proc/self/stat")


def _cpu_s(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime (fields 14, 15)


class BackendCpu:
    """Samples the backends of ``database`` through ``admin`` (an asyncpg connection to
    another database, so it is not sampled itself) from :meth:`start` to :meth:`stop`."""

    def __init__(self, admin: asyncpg.Connection, database: str) -> None:
        self.admin = admin
        self.database = database
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self._task: asyncio.Task[None] | None = None

    async def _sample(self, initial: bool = False) -> None:
        pids = await self.admin.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1", self.database
        )
        for row in pids:
            cpu = _cpu_s(row["pid"])
            if cpu is None:
                continue
            self.first.setdefault(row["pid"], cpu if initial else 0.0)
            self.last[row["pid"]] = cpu

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(PERIOD)
            await self._sample()

    async def start(self) -> BackendCpu:
        if _HAVE_PROC:
            await self._sample(initial=True)
            self._task = asyncio.create_task(self._run())
        return self

    async def stop(self) -> float | None:
        """Seconds of CPU the database's backends used; None where /proc is not there."""
        if self._task is None:
            return None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        return sum(self.last[pid] - self.first[pid] for pid in self.last)
