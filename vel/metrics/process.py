"""This process's counters, summed over every store and flusher it created.

Each store and flusher registers its counters with :func:`track`; :func:`process_counters`
adds up the live ones plus what collected ones had counted, so a total never goes down while
the process lives (what Prometheus expects of a counter).
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections.abc import Callable, Mapping

from vel import _fork

__all__ = ["process_counters", "track"]

Source = Callable[[], Mapping[str, float]]

_lock = threading.Lock()


def _renew_lock() -> None:
    global _lock
    _lock = threading.Lock()  # another thread of the parent may have held it at the fork


_fork.at_fork_in_child(_renew_lock)
_live: dict[int, tuple[Source, str | None]] = {}
_retired: dict[tuple[str, str | None], float] = {}
_idents = itertools.count()


def _add(into: dict[tuple[str, str | None], float], source: Source, tier: str | None) -> None:
    for key, value in source().items():
        into[key, tier] = into.get((key, tier), 0.0) + float(value)


def _retire(ident: int) -> None:
    with _lock:
        entry = _live.pop(ident, None)
        if entry is not None:
            _add(_retired, *entry)


def track(owner: object, counters: Mapping[str, float] | Source, tier: str | None) -> None:
    """Count ``counters`` (a dict kept up to date, or a function returning one) in this
    process's totals while ``owner`` lives, and keep their last values after it is gone.

    ``counters`` must not refer to ``owner`` (that would keep it alive forever).
    """
    source: Source = counters if callable(counters) else (lambda: counters)
    ident = next(_idents)  # not id(owner): ids of collected objects are reused
    with _lock:
        _live[ident] = (source, tier)
    weakref.finalize(owner, _retire, ident).atexit = False


def process_counters() -> dict[tuple[str, str | None], float]:
    """``{(stats key, tier): total}`` over every store and flusher of this process."""
    with _lock:
        totals = dict(_retired)
        live = list(_live.values())
    for source, tier in live:
        _add(totals, source, tier)
    return totals
