"""One instrumentation point: a latency histogram observation and, when tracing is on, a span.

Stores wrap their operations in :class:`observed`; the cost without an OpenTelemetry SDK is two
clock reads, a histogram observation and a shared no-op context manager (about half a
microsecond).
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any

from vel import tracing
from vel.metrics.histograms import Histogram

__all__ = ["observed"]


class observed:  # lower case: used like a function, ``with observed(LOAD, "load", sid):``
    """Time the block into ``histogram`` (failures included) inside the span ``vel.<name>``.

    Args:
        histogram: where the seconds go.
        name: the span's name after ``vel.``.
        session_id: the span's ``vel.session_id``.
        attributes: more span attributes (``vel.<key>``).
    """

    __slots__ = ("_span", "_started", "histogram")

    def __init__(
        self, histogram: Histogram, name: str, session_id: str | None = None, **attributes: Any
    ) -> None:
        self.histogram = histogram
        self._span: AbstractContextManager[Any] = tracing.span(name, session_id, **attributes)
        self._started = 0.0

    def __enter__(self) -> observed:
        self._span.__enter__()
        self._started = time.perf_counter()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        self.histogram.observe(time.perf_counter() - self._started)
        return self._span.__exit__(exc_type, exc, tb)
