"""Latency histograms of this process: turn, load, append, flush, warm and lock wait.

Observations are a bisect and two additions under a lock (well under a microsecond), cheap
enough for every turn. Buckets run from half a millisecond (a Redis round trip) to two
minutes (a slow model turn).
"""

from __future__ import annotations

import threading
from bisect import bisect_left

from vel import _fork

__all__ = [
    "APPEND",
    "BUCKETS",
    "FLUSH",
    "HISTOGRAMS",
    "LOAD",
    "LOCK_WAIT",
    "TURN",
    "WARM",
    "Histogram",
]

BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)


class Histogram:
    """A Prometheus histogram of durations in seconds (cumulative ``le`` buckets, sum, count).

    Args:
        name: family name after ``vel_`` (ends in ``_seconds``).
        help: the HELP text.
        buckets: upper bounds in seconds, increasing (``+Inf`` is implied).
    """

    __slots__ = ("_counts", "_lock", "_sum", "buckets", "help", "name")

    def __init__(self, name: str, help: str, buckets: tuple[float, ...] = BUCKETS) -> None:
        self.name = name
        self.help = help
        self.buckets = buckets
        self._counts = [0] * (len(buckets) + 1)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        index = bisect_left(self.buckets, seconds)  # first bound >= seconds: its ``le``
        with self._lock:
            self._counts[index] += 1
            self._sum += seconds

    def snapshot(self) -> tuple[list[tuple[float, int]], float, int]:
        """``([(upper bound, cumulative count)...], sum, count)``, ``+Inf`` last."""
        with self._lock:
            counts = list(self._counts)
            total = self._sum
        cumulative: list[tuple[float, int]] = []
        running = 0
        for bound, count in zip((*self.buckets, float("inf")), counts, strict=True):
            running += count
            cumulative.append((bound, running))
        return cumulative, total, running


TURN = Histogram(
    "turn_duration_seconds", "Agent turns, start to end (model calls and tools included)."
)
LOAD = Histogram("load_duration_seconds", "Session window reads (a turn's read included).")
APPEND = Histogram("append_duration_seconds", "Appends (a turn's commit included).")
FLUSH = Histogram(
    "flush_duration_seconds", "Flush batches: the Postgres transaction and the acknowledgement."
)
WARM = Histogram("warm_duration_seconds", "Warms: a session loaded from Postgres into Redis.")
LOCK_WAIT = Histogram(
    "lock_wait_seconds", "Time turns waited for their session's turn lock (0 when free)."
)
HISTOGRAMS: tuple[Histogram, ...] = (TURN, LOAD, APPEND, FLUSH, WARM, LOCK_WAIT)


def _renew_locks() -> None:
    for histogram in HISTOGRAMS:
        histogram._lock = threading.Lock()  # another thread of the parent may have held it


_fork.at_fork_in_child(_renew_locks)
