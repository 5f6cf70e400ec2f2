"""Organising sessions: owner and metadata, listings by cursor, pages of one session's history.

The :class:`SessionCatalog` protocol is what :class:`~vel.ContextManager`'s session calls
(``find_sessions``, ``get_session_info``, ``set_session_details``, ``get_session_messages``,
``delete_owner_sessions``) use; every shipped store implements it.

Listings and their cursors
--------------------------
A listing orders sessions by their last activity (``updated_at``), newest or oldest first, ties
broken by id. Its cursor is opaque to callers: it carries the position reached (a keyset, so a
page costs the same wherever it lies) and the listing's *snapshot*, taken with its first page.
The pages after the first show only sessions left unchanged since that snapshot. So, while
sessions are created and written during a listing:

- no session is ever returned twice by one listing;
- every session that exists and is not written from the first page to the last is returned,
  exactly once, in order;
- a session written during the listing has moved to the newest end: it is returned at most once
  (on a page read before it was written), and the next listing shows it on its first page.

"Written" is judged per store: in Postgres any new version of the session's row since the
snapshot (a write, a flush of one, new details, a load of it into the Redis tier, which renews
its tier lease); in memory a write; in Redis-only mode a write stamped after the first page.

In 'redis' mode listings read Postgres: a session appears there, with its ``updated_at``, once
the flusher has written it (at most one flush interval after the write).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol, runtime_checkable

from vel.bounds import COUNT
from vel.errors import InvalidInputError, StoreError
from vel.messages import Message, decode_message, validate_session_id

Order = Literal["newest", "oldest"]
ORDERS: tuple[Order, ...] = ("newest", "oldest")

# A metadata document, encoded, at most this many bytes (it is read with every listing row).
MAX_METADATA_BYTES = 64 * 1024
# A page of a listing or of a history holds at most this many entries.
MAX_PAGE = 1000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class _Unset:
    """The default of :meth:`SessionCatalog.set_details` arguments left unchanged."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()


@dataclass(frozen=True, slots=True)
class SessionDetails:
    """What :meth:`~vel.ContextManager.get_session_info` and listings report about a session.

    Attributes:
        session_id: the session.
        owner: the app's user or tenant the session belongs to (None: no owner).
        metadata: the JSON object set with the session (title, tags, ...); ``{}`` when none.
        message_count: messages in its history.
        created_at, updated_at: when it started and was last written.
        expires_at: when its retention runs out (None: never).
    """

    session_id: str
    owner: str | None
    metadata: dict[str, Any]
    message_count: int
    created_at: datetime
    updated_at: datetime
    expires_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class SessionPage:
    """One page of a listing: ``sessions``, and ``next_cursor`` (None: the last page)."""

    sessions: list[SessionDetails]
    next_cursor: str | None = None


@dataclass(frozen=True, slots=True)
class HistoryPage:
    """A range of one session's messages, oldest first.

    Attributes:
        messages: the messages.
        seqs: their sequence numbers (1 is the session's first message).
        last_seq: the session's newest seq when read (0: unknown or empty session).
        has_older: messages exist before ``seqs[0]`` (page back with ``before=seqs[0]``).
        has_newer: messages exist after ``seqs[-1]`` (page on with ``after=seqs[-1]``).
    """

    messages: list[Message]
    seqs: list[int]
    last_seq: int
    has_older: bool = False
    has_newer: bool = False


@dataclass(frozen=True, slots=True)
class Query:
    """A listing's parameters, as decoded from arguments or from a cursor."""

    owner: str | None
    metadata: dict[str, Any] | None
    order: Order
    limit: int
    # Where the previous page ended: (updated_at in Unix microseconds, session id).
    after: tuple[int, str] | None = None
    # The store's snapshot taken with the first page (its own format).
    snapshot: str | None = None
    metadata_json: str | None = field(default=None, compare=False)


@runtime_checkable
class SessionCatalog(Protocol):
    """Owner, metadata, listing, history paging and deletion by owner (every shipped store)."""

    async def session_details(self, session_id: str) -> SessionDetails | None:
        """The session's details; None when it has no messages (unknown, cleared, expired)."""
        ...

    async def set_details(
        self, session_id: str, owner: str | _Unset | None, metadata: dict[str, Any] | _Unset
    ) -> None:
        """Set the session's owner and/or metadata (arguments left UNSET are kept)."""
        ...

    async def find_sessions(self, query: Query) -> SessionPage:
        """One page of a listing (see the module docstring)."""
        ...

    async def history_page(
        self, session_id: str, before: int | None, after: int | None, limit: int
    ) -> HistoryPage:
        """Messages with ``after < seq < before``: the newest ``limit`` of them, or the oldest
        when only ``after`` is given."""
        ...

    async def delete_owner(self, owner: str) -> int:
        """Delete every session of ``owner`` (history and details); return how many."""
        ...


# -- argument checks ---------------------------------------------------------------------------


def check_owner(owner: object) -> str:
    """An owner id follows the session id's rules (non-empty text, at most 512 bytes)."""
    try:
        return validate_session_id(owner)
    except InvalidInputError as exc:
        raise InvalidInputError(str(exc).replace("session_id", "owner")) from None


def check_metadata(metadata: object, name: str = "metadata") -> tuple[dict[str, Any], str]:
    """A JSON object of at most MAX_METADATA_BYTES; returns it (a copy) and its encoding."""
    if not isinstance(metadata, Mapping):
        raise InvalidInputError(f"{name} must be a dict (a JSON object)")
    try:
        text = json.dumps(dict(metadata), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"{name} is not JSON-serialisable: {exc}") from None
    if "\\u0000" in text:
        raise InvalidInputError(f"{name} must not contain NUL characters")
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_METADATA_BYTES:
        raise InvalidInputError(f"{name} is {size} bytes; the limit is {MAX_METADATA_BYTES}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInputError(f"{name} must be valid Unicode (no lone surrogates)") from None
    copied: dict[str, Any] = json.loads(text)
    return copied, text


def check_page_limit(limit: object, name: str = "limit") -> int:
    value = COUNT.check_int(name, limit, InvalidInputError)
    if not 1 <= value <= MAX_PAGE:
        raise InvalidInputError(f"{name} must be between 1 and {MAX_PAGE}, got {value}")
    return value


def check_seq(value: object, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInputError(f"{name} must be a seq (an int >= 0) or None, got {value!r}")
    return value


def contains(document: Any, pattern: Any) -> bool:
    """JSON containment as Postgres' ``@>`` judges it (for the stores without Postgres)."""
    if isinstance(pattern, dict):
        return isinstance(document, dict) and all(
            k in document and contains(document[k], v) for k, v in pattern.items()
        )
    if isinstance(pattern, list):
        if not isinstance(document, list):
            return False
        return all(any(contains(d, p) for d in document) for p in pattern)
    if isinstance(document, list) and not isinstance(pattern, (dict, list)):
        # '["a", "b"]' @> '"a"': a top-level array contains a scalar it lists.
        return any(d == pattern and type(d) is type(pattern) for d in document)
    return bool(document == pattern and type(document) is type(pattern))


# -- cursors -----------------------------------------------------------------------------------


def micros(moment: datetime) -> int:
    """A timestamp as integer Unix microseconds (exact, so a keyset position never drifts)."""
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_micros(value: int) -> datetime:
    return _EPOCH + timedelta(microseconds=value)


def make_query(
    owner: str | None,
    metadata: Mapping[str, Any] | None,
    order: str,
    limit: int,
    cursor: str | None,
) -> Query:
    """Check a listing's arguments; with a cursor, its parameters come from the cursor.

    Raises:
        InvalidInputError: a bad argument, a cursor that is not one of vel's, or arguments
            that differ from those the cursor's listing was started with.
    """
    limit = check_page_limit(limit)
    if owner is not None:
        owner = check_owner(owner)
    if order not in ORDERS:
        raise InvalidInputError(f"order must be 'newest' or 'oldest', got {order!r}")
    wanted = None if metadata is None else check_metadata(metadata, "metadata filter")[0]
    if cursor is None:
        return _query(owner, wanted, order, limit, None, None)
    fields = _decode_cursor(cursor)
    started = (fields["w"], fields["m"], fields["o"])
    if (owner is not None and owner != started[0]) or (wanted is not None and wanted != started[1]):
        raise InvalidInputError("this cursor belongs to a listing with another owner or filter")
    position = (int(fields["k"][0]), str(fields["k"][1]))
    return _query(started[0], started[1], started[2], limit, position, fields["s"])


def _query(
    owner: str | None,
    metadata: dict[str, Any] | None,
    order: Any,
    limit: int,
    after: tuple[int, str] | None,
    snapshot: str | None,
) -> Query:
    text = None if metadata is None else json.dumps(metadata, ensure_ascii=False)
    return Query(owner, metadata, order, limit, after, snapshot, text)


def next_cursor(query: Query, last: SessionDetails, snapshot: str) -> str:
    """The cursor of the page after one ending with ``last``."""
    fields = {
        "v": 1,
        "w": query.owner,
        "m": query.metadata,
        "o": query.order,
        "k": [micros(last.updated_at), last.session_id],
        "s": snapshot,
    }
    raw = json.dumps(fields, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def _decode_cursor(cursor: object) -> dict[str, Any]:
    bad = InvalidInputError("cursor is not a cursor returned by a listing")
    if not isinstance(cursor, str) or not cursor or len(cursor) > 16_384:
        raise bad
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        fields = json.loads(raw)
    except (binascii.Error, ValueError):
        raise bad from None
    if (
        not isinstance(fields, dict)
        or fields.get("v") != 1
        or fields.get("o") not in ORDERS
        or not (fields.get("w") is None or isinstance(fields.get("w"), str))
        or not (fields.get("m") is None or isinstance(fields.get("m"), dict))
        or not isinstance(fields.get("s"), str)
    ):
        raise bad
    key = fields.get("k")
    if (
        not isinstance(key, list)
        or len(key) != 2
        or isinstance(key[0], bool)
        or not isinstance(key[0], int)
        or not isinstance(key[1], str)
    ):
        raise bad
    try:
        validate_session_id(key[1])
        if fields["w"] is not None:
            check_owner(fields["w"])
    except InvalidInputError:
        raise bad from None
    return fields


def page_of(pairs: list[tuple[int, str]], last: int, low: int, high: int) -> HistoryPage:
    """A HistoryPage of ``(seq, JSON text)`` pairs read from seqs ``low < seq < high`` of a
    history whose newest seq is ``last`` (seqs are gap-free: 1 .. last)."""
    if not pairs:
        return HistoryPage([], [], last, has_older=low >= 1 and last >= 1, has_newer=last > low)
    seqs = [seq for seq, _ in pairs]
    if seqs != list(range(seqs[0], seqs[0] + len(seqs))):
        raise StoreError("a page of the history has a gap in its seqs")
    return HistoryPage(
        messages=[decode_message(text) for _, text in pairs],
        seqs=seqs,
        last_seq=last,
        has_older=seqs[0] > 1,
        has_newer=seqs[-1] < last,
    )
