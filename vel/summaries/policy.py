"""When a summary is brought up to date, and which messages it may cover.

The window is the last ``max_history`` messages; everything older is the summary's to cover.
*Lag* is the number of older messages the summary does not cover yet. A summarisation starts
when the lag reaches ``every`` (K), and covers all of it, so there is at most one model call
per K new messages (a failed call is retried with backoff, and counted as a failure).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vel.bounds import COUNT
from vel.errors import ConfigurationError
from vel.summaries.base import Entry

DEFAULT_EVERY = 10


@dataclass(frozen=True, slots=True)
class SummaryPolicy:
    """Tuning of background summarisation.

    Attributes:
        every: start a summarisation once this many messages older than the window are not
            covered yet (K: at most one summarisation call per K new messages).
        lease: seconds a summariser holds a session before another process may take over
            (renewed while it works: a killed worker's lease simply runs out).
        attempts: model calls per summarisation before giving up until the next trigger.
        backoff: seconds before the first retry; doubles per retry, and per failed
            summarisation of the session (up to ``max_backoff``) before it is tried again.
        max_backoff: the ceiling of that backoff.
        batch: at most this many messages summarised by one call (a long lag is caught up
            in several calls, each covering at least ``every``).
    """

    every: int = DEFAULT_EVERY
    lease: float = 60.0
    attempts: int = 3
    backoff: float = 0.5
    max_backoff: float = 60.0
    batch: int = 200

    def __post_init__(self) -> None:
        COUNT.check_int("summarize_every", self.every, ConfigurationError)
        if self.every < 1:
            raise ConfigurationError("summarize_every must be at least 1")
        if self.batch < self.every:
            raise ConfigurationError("the summary batch must be at least summarize_every")


def lag(last_seq: int, window: int, covered: int) -> int:
    """Messages older than the window that the summary does not cover."""
    return max(0, last_seq - window - covered)


def cut(entries: Sequence[Entry], last_seq: int, window: int, covered: int, batch: int) -> int:
    """The seq the next summary should cover up to (``covered`` when nothing to do).

    At most ``batch`` messages past ``covered`` and never into the window, except that a
    cut is moved past ``tool`` results that follow it: the window never starts on a tool
    message (its parent would be missing, see :func:`vel.context.trim_window`), so those
    results are the summary's, and a tool-call pair is never split between the two.
    """
    upto = min(last_seq - window, covered + batch)
    if upto <= covered:
        return covered
    by_seq = {e.seq: e for e in entries}
    while (nxt := by_seq.get(upto + 1)) is not None and nxt.message.get("role") == "tool":
        upto += 1
    return upto
