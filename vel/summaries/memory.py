"""Summaries of a :class:`~vel.stores.memory.MemoryStore`'s sessions, in the same process.

A summary is served only while the message it says it covers is still the store's message
at that seq: a cleared, replaced or expired session drops its summary on the next read,
whoever cleared it.
"""

from __future__ import annotations

import threading
import time

from vel import _fork
from vel.stores.memory import MemoryStore
from vel.summaries.base import Entry, History, Summary


class MemorySummaries:
    def __init__(self, store: MemoryStore) -> None:
        self.store = store
        self._mutex = threading.Lock()
        self._summaries: dict[str, Summary] = {}
        self._leases: dict[str, tuple[str, float]] = {}
        self._lags: dict[str, int] = {}
        self._totals = {"summary_calls": 0.0, "summary_failures": 0.0}
        _fork.forget_in_child(self)

    def _forget_after_fork(self) -> None:
        # Another thread may have held the lock at the fork; the parent's summarisers (and
        # their leases) do not run in the child.
        self._mutex = threading.Lock()
        self._leases = {}

    def _valid(self, session_id: str) -> Summary | None:
        summary = self._summaries.get(session_id)
        if summary is None:
            return None
        if self.store.message_id_at(session_id, summary.covered_seq) != summary.covered_id:
            del self._summaries[session_id]
            self._lags.pop(session_id, None)
            return None
        return summary

    async def get(self, session_id: str) -> Summary | None:
        with self._mutex:
            return self._valid(session_id)

    async def history(self, session_id: str, after: int, limit: int) -> History:
        last, rows = self.store.entries_after(session_id, after, limit)
        return History(last, [Entry(seq, mid, message) for seq, mid, message in rows])

    async def put(
        self, session_id: str, summary: Summary, previous: Summary | None, basis: History
    ) -> bool:
        with self._mutex:
            current = self._valid(session_id)
            if current != previous:
                return False
            if self.store.message_id_at(session_id, summary.covered_seq) != summary.covered_id:
                return False
            self._summaries[session_id] = summary
            return True

    async def delete(self, session_id: str) -> None:
        with self._mutex:
            self._summaries.pop(session_id, None)
            self._lags.pop(session_id, None)

    async def try_lease(self, session_id: str, token: str, seconds: float) -> bool:
        now = time.monotonic()
        with self._mutex:
            held = self._leases.get(session_id)
            if held is not None and held[1] > now:
                return False
            self._leases[session_id] = (token, now + seconds)
            return True

    async def renew_lease(self, session_id: str, token: str, seconds: float) -> bool:
        with self._mutex:
            held = self._leases.get(session_id)
            if held is None or held[0] != token:
                return False
            self._leases[session_id] = (token, time.monotonic() + seconds)
            return True

    async def release_lease(self, session_id: str, token: str) -> None:
        with self._mutex:
            held = self._leases.get(session_id)
            if held is not None and held[0] == token:
                del self._leases[session_id]

    async def note(self, session_id: str, lag: int, *, calls: int = 0, failures: int = 0) -> None:
        with self._mutex:
            if lag > 0:
                self._lags[session_id] = lag
            else:
                self._lags.pop(session_id, None)
            self._totals["summary_calls"] += calls
            self._totals["summary_failures"] += failures

    async def figures(self) -> dict[str, float]:
        with self._mutex:
            lags = list(self._lags.values())
            return {
                **self._totals,
                "summary_lag_messages": float(sum(lags)),
                "summary_max_lag": float(max(lags, default=0)),
                "summary_sessions_behind": float(len(lags)),
            }

    async def aclose(self) -> None:
        return None
