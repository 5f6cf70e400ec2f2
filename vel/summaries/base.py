"""What a stored summary is, and the small protocol each storage mode implements for it.

A summary is kept *beside* a session's messages, never instead of them: it says which seq it
covers and the id of the message at that seq, so a summary of a history that was cleared or
replaced since (new messages, new ids) is recognised and never served.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from vel.messages import Message


@dataclass(frozen=True, slots=True)
class Summary:
    """A session's summary.

    Attributes:
        text: the summary the model reads (one system message before the window).
        covered_seq: it summarises messages ``1 .. covered_seq``.
        covered_id: the message id of message ``covered_seq`` (what ties it to the history).
        updated_at: Unix time it was written.
    """

    text: str
    covered_seq: int
    covered_id: str
    updated_at: float


@dataclass(frozen=True, slots=True)
class Entry:
    """One stored message with its seq and message id."""

    seq: int
    message_id: str
    message: Message


@dataclass(frozen=True, slots=True)
class History:
    """Messages after some seq, read in one step with the session's last seq.

    ``stamp``: what the backend needs to refuse a summary write if the history changed
    meanwhile (the Redis generation; unused elsewhere).
    """

    last_seq: int
    entries: Sequence[Entry]
    stamp: Any = None


class SummaryBackend(Protocol):
    """Where summaries, their leases and their bookkeeping live for one session store."""

    async def get(self, session_id: str) -> Summary | None:
        """The session's summary, or None (none yet, or it no longer matches the history)."""
        ...

    async def history(self, session_id: str, after: int, limit: int) -> History:
        """Up to ``limit`` messages with seq > ``after``, oldest first."""
        ...

    async def put(
        self, session_id: str, summary: Summary, previous: Summary | None, basis: History
    ) -> bool:
        """Store ``summary`` unless another summary replaced ``previous`` meanwhile or the
        history changed (cleared, replaced); True when stored."""
        ...

    async def delete(self, session_id: str) -> None:
        """Forget the session's summary (the history was cleared or replaced)."""
        ...

    async def try_lease(self, session_id: str, token: str, seconds: float) -> bool:
        """Take the session's summarisation lease (one summariser at a time, all processes)."""
        ...

    async def renew_lease(self, session_id: str, token: str, seconds: float) -> bool: ...

    async def release_lease(self, session_id: str, token: str) -> None: ...

    async def note(self, session_id: str, lag: int, *, calls: int = 0, failures: int = 0) -> None:
        """Record what the summariser saw (uncovered messages) and did, for ``vel stats``."""
        ...

    async def figures(self) -> dict[str, float]:
        """Shared summary figures: lag, sessions behind, calls and failures (where kept)."""
        ...

    async def aclose(self) -> None: ...
