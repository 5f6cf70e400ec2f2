"""The write-through calls of :class:`~vel.stores.postgres.PostgresStore` (its
:class:`~vel.stores.base.SessionStore` history calls): one session's history read and written
in Postgres directly, for ``session_storage='database'``. A mixin, as :mod:`.tier` is: the
store's facade stays one class while each group of calls is documented in one place; the SQL
is :mod:`.sessions`'."""

from __future__ import annotations

from collections.abc import Sequence

from vel.instrument import observed
from vel.messages import Message
from vel.metrics.histograms import APPEND, LOAD
from vel.stores.postgres.sessions import ImportCounts, ImportEntry, Sessions


class WriteThrough:
    """Append, load, pop, replace, clear and import (see each method)."""

    _sessions: Sessions

    async def append(
        self,
        session_id: str,
        messages: Sequence[Message],
        message_ids: Sequence[str] | None = None,
    ) -> int:
        """Atomically append ``messages``; return the session's new last seq.

        Replaying an append with the same ``message_ids`` stores nothing and returns the seq
        of the last of those messages. Appending to an expired session starts a new history.

        Args:
            session_id: the session.
            messages: OpenAI-format message dicts (empty: nothing is written).
            message_ids: one unique id per message, kept across retries; generated if None.

        Returns:
            The seq of the last message of the session after the append.

        Raises:
            InvalidInputError: bad id or message, or ids already used by other messages.
            TierLeaseError: the session is held by the Redis tier (use 'redis' mode).
            StoreError: Postgres failed; retry with the same ``message_ids``.
        """
        with observed(APPEND, "append", session_id):
            return await self._sessions.append(session_id, messages, message_ids)

    async def load(self, session_id: str, limit: int | None = None) -> list[Message]:
        """Return the last ``limit`` messages (all when None), oldest first.

        Cost depends on ``limit``, not on the session's length. Unknown, cleared and expired
        sessions are empty.

        Raises:
            InvalidInputError: bad session id or limit.
            StoreError: Postgres failed.
        """
        with observed(LOAD, "load", session_id):
            return await self._sessions.load(session_id, limit)

    async def pop(self, session_id: str) -> Message | None:
        """Atomically remove and return the newest message (None for an unknown, empty or
        expired session); one transaction whose ``DELETE ... RETURNING`` takes the message.

        The session's generation moves on, as with :meth:`clear`, so a Redis copy made
        before the pop is never flushed back over it.

        Raises:
            InvalidInputError: bad session id.
            StoreError: Postgres failed; nothing changed (unless it failed while
                committing: then the message may be gone).
        """
        return await self._sessions.pop(session_id)

    async def replace(
        self,
        session_id: str,
        messages: Sequence[Message],
        message_ids: Sequence[str] | None = None,
    ) -> None:
        """Atomically replace the whole history with ``messages`` (seqs restart at 1).

        Any length up to ``MAX_MESSAGES_PER_REPLACE``, written in chunks inside one
        transaction (readers see the old history or the new one).

        Args:
            session_id: the session.
            messages: the new history.
            message_ids: one unique id per message (generated when None).

        Raises:
            InvalidInputError: bad id or message; nothing changed.
            TierLeaseError: the session is held by the Redis tier; nothing changed.
            StoreError: Postgres failed; nothing changed.
        """
        await self._sessions.replace(session_id, messages, message_ids)

    async def clear(self, session_id: str) -> None:
        """Delete the session's history; a no-op for an unknown session.

        The session row stays behind (with ``last_seq`` 0) so that its generation outlives
        the messages; :meth:`purge_expired` removes it an hour later.

        Raises:
            InvalidInputError: bad session id.
            TierLeaseError: the session is held by the Redis tier; nothing changed.
            StoreError: Postgres failed; nothing changed.
        """
        await self._sessions.clear(session_id)

    async def import_sessions(
        self, entries: Sequence[ImportEntry], *, replace: bool = False
    ) -> ImportCounts:
        """Write a whole import in one transaction: every session of it, or none.

        A session that already has messages is skipped, or with ``replace`` its history is
        replaced; new sessions get the entries' histories with their message ids.

        Raises:
            InvalidInputError: a session listed twice; nothing was written.
            TierLeaseError: one of the sessions is held by the Redis tier; nothing was
                written (import with 'redis' storage instead).
            StoreError: Postgres failed; nothing was written.
        """
        return await self._sessions.import_sessions(entries, replace=replace)
