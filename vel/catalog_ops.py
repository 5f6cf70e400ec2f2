"""The session-organising calls of :class:`~vel.ContextManager` (``agent.ctxmgr``): owner and
metadata, listings, pages of a history, deletion by owner, in plain form and as ``a*`` twins.

A chat sidebar, for example::

    agent.ctxmgr.set_session_details('conv-42', owner='user-7', metadata={'title': 'Trip'})
    page = agent.ctxmgr.find_sessions(owner='user-7')              # newest activity first
    more = agent.ctxmgr.find_sessions(cursor=page.next_cursor)     # the next page
    last = agent.ctxmgr.get_session_messages('conv-42', limit=20)  # the newest 20 messages
    back = agent.ctxmgr.get_session_messages('conv-42', before=last.seqs[0], limit=20)

See :mod:`vel.stores.listing` for what a listing's cursor guarantees while sessions change.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vel._sync import run_sync
from vel.errors import ConfigurationError, InvalidInputError
from vel.messages import validate_session_id
from vel.stores.base import SessionStore
from vel.stores.listing import (
    UNSET,
    HistoryPage,
    SessionCatalog,
    SessionDetails,
    SessionPage,
    check_owner,
    check_page_limit,
    check_seq,
    make_query,
)


def catalog_of(store: SessionStore) -> SessionCatalog:
    """The store as a :class:`SessionCatalog`.

    Raises:
        ConfigurationError: the store does not implement the catalog calls.
    """
    if isinstance(store, SessionCatalog):
        return store
    raise ConfigurationError(
        f"{type(store).__name__} does not support owners, metadata, listings or history pages "
        "(see vel.stores.listing.SessionCatalog)"
    )


class SessionCatalogOps:
    """Mixed into :class:`~vel.ContextManager`; ``store`` is the agent's session store."""

    @property
    def store(self) -> SessionStore:
        raise NotImplementedError

    # -- async -------------------------------------------------------------------------

    async def aset_session_details(
        self,
        session_id: str,
        *,
        owner: str | None = UNSET,
        metadata: Mapping[str, Any] = UNSET,
    ) -> None:
        """Set the owner and/or the metadata of ``session_id`` (before its first turn or
        later); an argument not given is kept, ``owner=None`` removes the owner, and
        ``metadata`` replaces the whole document.

        Setting details is not a write of the session: its ``updated_at`` does not move.

        Raises:
            InvalidInputError: bad id, owner, or metadata (a JSON object of at most 64 KiB).
            StoreError: the backend failed; nothing changed.
        """
        validate_session_id(session_id)
        if metadata is not UNSET and not isinstance(metadata, Mapping):
            raise InvalidInputError("metadata must be a dict (a JSON object)")
        document = metadata if metadata is UNSET else dict(metadata)
        await catalog_of(self.store).set_details(session_id, owner, document)

    async def aget_session_info(self, session_id: str) -> SessionDetails | None:
        """``session_id``'s owner, metadata, message count and times; None when it has no
        messages (unknown, cleared, deleted or expired)."""
        return await catalog_of(self.store).session_details(validate_session_id(session_id))

    async def afind_sessions(
        self,
        owner: str | None = None,
        *,
        metadata: Mapping[str, Any] | None = None,
        order: str = "newest",
        limit: int = 50,
        cursor: str | None = None,
    ) -> SessionPage:
        """One page of sessions with messages, by last activity.

        Args:
            owner: only this owner's sessions (None: every session).
            metadata: only sessions whose metadata contains this JSON object (Postgres'
                ``@>``: ``{'tags': ['work']}`` matches a session tagged work among others).
            order: ``'newest'`` (most recently active first) or ``'oldest'``.
            limit: sessions per page (1..1000).
            cursor: ``next_cursor`` of the previous page; the listing's owner, filter and
                order come with it.

        Returns:
            The page, and ``next_cursor`` (None on the last page).

        Raises:
            InvalidInputError: a bad argument or cursor.
            StoreError: the backend failed.
        """
        query = make_query(owner, metadata, order, limit, cursor)
        return await catalog_of(self.store).find_sessions(query)

    async def aget_session_messages(
        self,
        session_id: str,
        *,
        before: int | None = None,
        after: int | None = None,
        limit: int = 50,
    ) -> HistoryPage:
        """A range of ``session_id``'s history, oldest first, with the messages' seqs.

        With neither ``before`` nor ``after``: the newest ``limit`` messages. With ``before``:
        the newest ``limit`` of those with a smaller seq (page back with
        ``before=page.seqs[0]``). With only ``after``: the oldest ``limit`` of those with a
        larger seq. Reads only the range asked for, in every mode.

        Raises:
            InvalidInputError: bad id, seq or limit.
            StoreError: the backend failed.
        """
        session_id = validate_session_id(session_id)
        before = check_seq(before, "before")
        after = check_seq(after, "after")
        limit = check_page_limit(limit)
        return await catalog_of(self.store).history_page(session_id, before, after, limit)

    async def adelete_owner_sessions(self, owner: str) -> int:
        """Delete every session of ``owner``, in every tier, with its owner and metadata (a
        user asking to be forgotten). No flush that started before can bring a history back.

        Returns:
            How many sessions were deleted.

        Raises:
            InvalidInputError: bad owner.
            TierLeaseError: ('database' storage) a session is held by the Redis tier.
            StoreError: the backend failed; call again to finish.
        """
        return await catalog_of(self.store).delete_owner(check_owner(owner))

    # -- plain twins -------------------------------------------------------------------

    def set_session_details(
        self,
        session_id: str,
        *,
        owner: str | None = UNSET,
        metadata: Mapping[str, Any] = UNSET,
    ) -> None:
        """Plain twin of :meth:`aset_session_details`."""
        run_sync(lambda: self.aset_session_details(session_id, owner=owner, metadata=metadata))

    def get_session_info(self, session_id: str) -> SessionDetails | None:
        """Plain twin of :meth:`aget_session_info`."""
        return run_sync(self.aget_session_info, session_id)

    def find_sessions(
        self,
        owner: str | None = None,
        *,
        metadata: Mapping[str, Any] | None = None,
        order: str = "newest",
        limit: int = 50,
        cursor: str | None = None,
    ) -> SessionPage:
        """Plain twin of :meth:`afind_sessions`."""
        return run_sync(
            lambda: self.afind_sessions(
                owner, metadata=metadata, order=order, limit=limit, cursor=cursor
            )
        )

    def get_session_messages(
        self,
        session_id: str,
        *,
        before: int | None = None,
        after: int | None = None,
        limit: int = 50,
    ) -> HistoryPage:
        """Plain twin of :meth:`aget_session_messages`."""
        return run_sync(
            lambda: self.aget_session_messages(session_id, before=before, after=after, limit=limit)
        )

    def delete_owner_sessions(self, owner: str) -> int:
        """Plain twin of :meth:`adelete_owner_sessions`."""
        return run_sync(self.adelete_owner_sessions, owner)
