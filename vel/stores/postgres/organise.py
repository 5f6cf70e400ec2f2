"""The :class:`~vel.stores.listing.SessionCatalog` calls of
:class:`~vel.stores.postgres.PostgresStore`: owner and metadata, listings, pages of a history,
deletion by owner. A mixin, as :mod:`.tier` is; the SQL is :mod:`.catalog`'s."""

from __future__ import annotations

from typing import Any

from vel.stores.listing import HistoryPage, Query, SessionDetails, SessionPage, _Unset
from vel.stores.postgres.catalog import Catalog
from vel.stores.postgres.sessions import Sessions


class Organising:
    """Organising sessions (see each method)."""

    catalog: Catalog
    _sessions: Sessions

    async def session_details(self, session_id: str) -> SessionDetails | None:
        """The session's owner, metadata, size and times; None without messages.

        Raises:
            InvalidInputError: bad session id.
            StoreError: Postgres failed.
        """
        return await self.catalog.session_details(session_id)

    async def set_details(
        self, session_id: str, owner: str | _Unset | None, metadata: dict[str, Any] | _Unset
    ) -> None:
        """Set the owner and/or metadata (UNSET: kept). Not a write of the history: allowed
        while the Redis tier holds the session, and its ``updated_at`` does not move.

        Raises:
            InvalidInputError: bad id, owner or metadata.
            StoreError: Postgres failed; nothing changed.
        """
        await self.catalog.set_details(session_id, owner, metadata)

    async def find_sessions(self, query: Query) -> SessionPage:
        """One page of a listing by index (see :mod:`vel.stores.listing`).

        Raises:
            InvalidInputError: a cursor that is not vel's.
            StoreError: Postgres failed.
        """
        return await self.catalog.find_sessions(query)

    async def history_page(
        self, session_id: str, before: int | None, after: int | None, limit: int
    ) -> HistoryPage:
        """Messages with ``after < seq < before`` (the newest ``limit``, or the oldest when
        only ``after`` is given), read by the primary key's range scan.

        Raises:
            InvalidInputError: bad session id.
            StoreError: Postgres failed.
        """
        return await self.catalog.history_page(session_id, before, after, limit)

    async def delete_owner(self, owner: str) -> int:
        """Delete every session of ``owner``: its history (as :meth:`clear` does, leaving a
        tombstone that carries the generation) and its owner and metadata.

        Returns:
            How many sessions the owner had.

        Raises:
            TierLeaseError: a session is held by the Redis tier (use 'redis' storage); the
                sessions before it are deleted.
            StoreError: Postgres failed; run it again to finish.
        """
        deleted, after = 0, ""
        while ids := await self.catalog.owned(owner, after, 500):
            for session_id in ids:
                await self._sessions.clear(session_id)
            await self.catalog.forget_details(owner, ids)
            deleted += len(ids)
            after = ids[-1]
        return deleted
