"""The :class:`~vel.stores.listing.SessionCatalog` calls of
:class:`~vel.stores.memory.MemoryStore`: each session's owner and metadata, listings by them
with a cursor over a snapshot of the store's writes, pages of a history, and deletion by owner.

Owner and metadata are kept apart from the messages, so they outlive a clear but not the
retention; a listing's cursor carries the store's write counter at its first page, and later
pages leave out the sessions written since.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from vel.errors import InvalidInputError
from vel.messages import validate_session_id
from vel.stores.listing import (
    HistoryPage,
    Query,
    SessionDetails,
    SessionPage,
    _Unset,
    check_metadata,
    check_owner,
    contains,
    micros,
    next_cursor,
    page_of,
)

if TYPE_CHECKING:
    from vel.stores.memory import _Session


class MemoryCatalog:
    """A mixin of :class:`~vel.stores.memory.MemoryStore`, over its state (under its mutex)."""

    retention_ttl: float | None
    _sessions: dict[str, _Session]
    _details: dict[str, tuple[str | None, dict[str, Any]]]
    _mutex: threading.Lock
    _writes: int
    _live: Callable[[str, float], _Session | None]

    def _info(self, session_id: str, session: _Session) -> SessionDetails:
        owner, metadata = self._details.get(session_id, (None, {}))
        ttl = self.retention_ttl
        return SessionDetails(
            session_id=session_id,
            owner=owner,
            metadata=json.loads(json.dumps(metadata)),
            message_count=session.last_seq,
            created_at=datetime.fromtimestamp(session.created, UTC),
            updated_at=datetime.fromtimestamp(session.updated, UTC),
            expires_at=None if ttl is None else datetime.fromtimestamp(session.updated + ttl, UTC),
        )

    async def session_details(self, session_id: str) -> SessionDetails | None:
        validate_session_id(session_id)
        with self._mutex:
            session = self._live(session_id, time.time())
            return None if session is None else self._info(session_id, session)

    async def set_details(
        self, session_id: str, owner: str | _Unset | None, metadata: dict[str, Any] | _Unset
    ) -> None:
        validate_session_id(session_id)
        if not isinstance(owner, _Unset) and owner is not None:
            owner = check_owner(owner)
        checked = None if isinstance(metadata, _Unset) else check_metadata(metadata)[0]
        with self._mutex:
            old_owner, old_metadata = self._details.get(session_id, (None, {}))
            self._details[session_id] = (
                old_owner if isinstance(owner, _Unset) else owner,
                old_metadata if checked is None else checked,
            )

    async def find_sessions(self, query: Query) -> SessionPage:
        if query.snapshot is not None and not query.snapshot.isdigit():
            raise InvalidInputError("cursor is not a cursor returned by a listing")
        newest = query.order == "newest"
        with self._mutex:
            now = time.time()
            snapshot = int(query.snapshot) if query.snapshot is not None else self._writes
            found: list[tuple[tuple[int, str], SessionDetails]] = []
            for sid in list(self._sessions):
                session = self._live(sid, now)
                if session is None or not session.entries or session.version > snapshot:
                    continue
                owner, metadata = self._details.get(sid, (None, {}))
                if query.owner is not None and owner != query.owner:
                    continue
                if query.metadata is not None and not contains(metadata, query.metadata):
                    continue
                info = self._info(sid, session)
                key = (micros(info.updated_at), sid)
                if query.after is not None and (
                    key >= query.after if newest else key <= query.after
                ):
                    continue
                found.append((key, info))
        found.sort(key=lambda item: item[0], reverse=newest)
        page = [info for _, info in found[: query.limit]]
        if len(found) <= query.limit:
            return SessionPage(page, None)
        return SessionPage(page, next_cursor(query, page[-1], str(snapshot)))

    async def history_page(
        self, session_id: str, before: int | None, after: int | None, limit: int
    ) -> HistoryPage:
        validate_session_id(session_id)
        low = 0 if after is None else after
        high = 2**62 if before is None else before
        with self._mutex:
            session = self._live(session_id, time.time())
            if session is None:
                return page_of([], 0, low, high)
            first = session.last_seq - len(session.entries) + 1
            pairs = [
                (seq, text)
                for seq, (_, text) in enumerate(session.entries, start=first)
                if low < seq < high
            ]
            last = session.last_seq
        pairs = pairs[:limit] if after is not None and before is None else pairs[-limit:]
        return page_of(pairs, last, low, high)

    async def delete_owner(self, owner: str) -> int:
        owner = check_owner(owner)
        with self._mutex:
            ids = [sid for sid, (who, _) in self._details.items() if who == owner]
            for sid in ids:
                del self._details[sid]
                self._sessions.pop(sid, None)
        return len(ids)
