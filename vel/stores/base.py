"""The session store protocol every backend implements, and the shared value types."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, runtime_checkable

from vel.messages import Message


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """What :meth:`SessionStore.list_sessions` reports about one session."""

    session_id: str
    message_count: int
    created_at: datetime
    updated_at: datetime
    expires_at: datetime | None = None


@runtime_checkable
class SessionStore(Protocol):
    """Where session histories live. All methods are safe to call concurrently.

    A session is an ordered list of JSON objects: OpenAI-format chat messages for vel's Agent,
    Responses API items for an OpenAI Agents SDK session. Appends are atomic: either every
    message of an append is stored, contiguously and in order, or none is.
    """

    async def load(self, session_id: str, limit: int | None = None) -> list[Message]:
        """Return the session's last ``limit`` messages (all when None), oldest first.

        An unknown or expired session is empty. Implementations push the window down to
        the backend so a read costs the same whatever the session's length.
        """
        ...

    async def append(
        self,
        session_id: str,
        messages: Sequence[Message],
        message_ids: Sequence[str] | None = None,
    ) -> int:
        """Atomically append ``messages``; return the session's new last sequence number.

        ``message_ids`` (one per message, generated when omitted) make the append
        idempotent: replaying the same ids does not store the messages twice.

        Raises:
            InvalidInputError: bad id or message; nothing was stored.
            StoreError: the backend failed; nothing was stored, or the same append may be
                retried with the same ``message_ids``.
        """
        ...

    async def pop(self, session_id: str) -> Message | None:
        """Atomically remove and return the session's last message (None when it has none).

        One step in the backend: concurrent pops take different messages, and a pop ordered
        after an append removes that append's last message. The next append reuses the
        popped message's sequence number.

        Raises:
            InvalidInputError: bad session id.
            StoreError: the backend failed; the message may or may not have been removed.
        """
        ...

    async def replace(self, session_id: str, messages: Sequence[Message]) -> None:
        """Atomically replace the whole history with ``messages``."""
        ...

    async def clear(self, session_id: str) -> None:
        """Delete the session's history (a no-op for an unknown session)."""
        ...

    async def list_sessions(
        self, inactive_for: float | None = None, limit: int = 1000
    ) -> list[SessionInfo]:
        """Sessions with messages, least recently updated first.

        Args:
            inactive_for: only sessions not updated for at least this many seconds.
            limit: at most this many.
        """
        ...

    async def purge_expired(self) -> int:
        """Delete sessions whose retention has run out; return how many were deleted."""
        ...

    def turn_lock(
        self, session_id: str, timeout: float | None = None
    ) -> AbstractAsyncContextManager[None]:
        """Hold the session's turn lock across processes (where the backend allows).

        Raises:
            SessionLockedError: not acquired within ``timeout`` seconds.
        """
        ...

    async def stats(self) -> dict[str, float]:
        """Operational counters and gauges (see DESIGN.md section 6)."""
        ...

    async def aclose(self) -> None:
        """Release connections and background tasks. Idempotent."""
        ...
