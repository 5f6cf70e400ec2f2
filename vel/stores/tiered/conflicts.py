"""Resolving flush conflicts: a session whose Redis copy holds writes that Postgres could not
take, because Postgres changed behind the tier (DESIGN.md 3.8).

The flusher never acknowledges such a copy: it stays in Redis without TTL, in its bucket's
conflict set, and keeps taking appends, until an operator picks what the session becomes
(``vel sessions resolve``):

- ``postgres``: the history Postgres holds; what only Redis held is discarded (the caller may
  save it first: :attr:`Resolution.discarded`).
- ``both``: Postgres' history, then the messages only Redis held, in their order (ids
  Postgres already holds are skipped, so a duplicated retry is stored once).
- ``redis``: the Redis copy, whole (only when Redis holds the whole history).

Postgres is written first (one transaction that bumps the generation and revision, so no older
copy or flush can write over it); then the copy is dropped if it took no write meanwhile (else
the resolution runs again with what it took), and the next use warms the session afresh.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vel.errors import InvalidInputError, StoreError
from vel.messages import Message, decode_message, validate_session_id
from vel.stores.postgres import PostgresStore
from vel.stores.redis import RedisStore

KEEP = ("postgres", "both", "redis")


@dataclass
class Resolution:
    """What :func:`resolve` did.

    Attributes:
        keep: the side kept (``postgres``, ``both``, ``redis``).
        last_seq: the session's last seq afterwards.
        discarded: messages only Redis held that ``postgres`` threw away (with their ids).
    """

    keep: str
    last_seq: int
    discarded: list[tuple[str, Message]] = field(default_factory=list)


async def resolve(hot: RedisStore, cold: PostgresStore, session_id: str, keep: str) -> Resolution:
    """Resolve the flush conflict of ``session_id`` by keeping ``keep`` (see module docs).

    Raises:
        InvalidInputError: the session is not in conflict, ``keep`` is unknown, or ``redis``
            was asked of a copy that holds only the newest part of the history.
        StoreError: the copy kept taking writes (10 rounds), or a backend failed.
    """
    validate_session_id(session_id)
    if keep not in KEEP:
        raise InvalidInputError(f"keep must be one of {', '.join(KEEP)}, got {keep!r}")
    discarded: dict[str, Message] = {}
    for _ in range(10):
        copy = await hot.read_copy(session_id)
        if copy is None or copy.conflict is None:
            raise InvalidInputError(f"session {session_id!r} has no flush conflict to resolve")
        last = (await cold.last_seq(session_id))[1]
        if keep == "postgres":
            discarded.update((mid, decode_message(text)) for mid, text in copy.unflushed())
        elif keep == "both":
            pairs = copy.unflushed()
            last = await cold.resolve(
                session_id, [m for m, _ in pairs], [t for _, t in pairs], replace=False
            )
        else:
            if copy.base:
                raise InvalidInputError(
                    f"session {session_id!r}: Redis holds only its messages after seq "
                    f"{copy.base}, so it cannot replace the history whole; keep 'both' "
                    "(Postgres' history, then what only Redis holds) or 'postgres'"
                )
            last = await cold.resolve(
                session_id,
                [m for m, _ in copy.items],
                [t for _, t in copy.items],
                replace=True,
            )
        if await hot.resolved(session_id, copy.seq, copy.gen):
            return Resolution(keep, last, list(discarded.items()))
    raise StoreError(f"session {session_id!r} kept taking writes while being resolved")
