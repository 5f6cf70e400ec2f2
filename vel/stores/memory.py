"""MemoryStore: sessions in a dict of this process (``session_storage='memory'``).

Retention counts from a session's last write (DESIGN.md 3.9): the dict is kept in last-write
order, so the expired sessions are always at its front, and every call removes up to
:data:`SWEEP_PER_CALL` of them. Sessions nobody asks about again thus leave memory at the
pace the store is used, with bounded work per call. The session catalog's calls (owner,
metadata, listings, history pages) are the mixin :class:`~vel.stores.memory_catalog.MemoryCatalog`.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from vel import _fork, metrics
from vel.bounds import COUNT, TTL, age_arg, limit_arg, wait_arg
from vel.errors import InvalidInputError
from vel.instrument import observed
from vel.messages import (
    Message,
    check_message_ids,
    decode_message,
    encode_messages,
    validate_session_id,
)
from vel.metrics.histograms import APPEND, LOAD
from vel.stores._locks import KeyedLocks
from vel.stores.base import SessionInfo
from vel.stores.memory_catalog import MemoryCatalog

# Expired sessions removed per call, at most: more than one per write, so a store that is
# being used always catches up with its expired sessions.
SWEEP_PER_CALL = 16


@dataclass
class _Session:
    created: float
    updated: float
    last_seq: int = 0
    # (message_id, json text); the seq of entry i is last_seq - len(entries) + 1 + i.
    entries: list[tuple[str, str]] = field(default_factory=list)
    ids: dict[str, int] = field(default_factory=dict)
    # The store's write counter at this session's last write (a listing's snapshot).
    version: int = 0


class MemoryStore(MemoryCatalog):
    """Sessions kept in this process only: fast, lost on restart, not shared.

    Messages are stored as JSON text, so what comes back is always a fresh copy and what
    goes in must be JSON-serialisable, exactly as with the durable stores.

    Args:
        retention_ttl: seconds after its last write that a session expires (None: never).
    """

    def __init__(self, retention_ttl: float | None = None) -> None:
        self.retention_ttl = TTL.check_optional("retention_ttl", retention_ttl)
        # In last-write order (a write moves its session to the end): see the module docstring.
        self._sessions: dict[str, _Session] = {}
        # Plain calls run on vel's helper thread while the agent's loop runs elsewhere.
        self._mutex = threading.Lock()
        self._locks = KeyedLocks()
        self._counters = {"appends": 0.0, "duplicates_suppressed": 0.0}
        # Owner and metadata per session id; they outlive a clear, not the retention.
        self._details: dict[str, tuple[str | None, dict[str, Any]]] = {}
        self._writes = 0
        metrics.track(self, functools.partial(_counters, self._counters, self._locks), "memory")
        _fork.forget_in_child(self)

    def _forget_after_fork(self) -> None:
        # A plain call on the parent's helper thread may have held it at the fork.
        self._mutex = threading.Lock()

    def __repr__(self) -> str:
        return f"MemoryStore(sessions={len(self._sessions)})"

    def _expired(self, session: _Session, now: float) -> bool:
        return self.retention_ttl is not None and now - session.updated >= self.retention_ttl

    def _live(self, session_id: str, now: float) -> _Session | None:
        """The session unless it expired (then it is removed); sweeps a few expired ones."""
        self._sweep(now, SWEEP_PER_CALL)
        session = self._sessions.get(session_id)
        if session is None:
            return None
        if self._expired(session, now):
            del self._sessions[session_id]
            self._details.pop(session_id, None)
            return None
        return session

    def _sweep(self, now: float, budget: int) -> int:
        """Remove up to ``budget`` expired sessions from the front (the oldest writes)."""
        removed = 0
        while removed < budget and self._sessions:
            sid = next(iter(self._sessions))
            if not self._expired(self._sessions[sid], now):
                break
            del self._sessions[sid]
            self._details.pop(sid, None)
            removed += 1
        return removed

    def _touch(self, session_id: str, session: _Session) -> None:
        """Record a write: the session moves to the end of the last-write order."""
        self._sessions.pop(session_id, None)
        self._sessions[session_id] = session
        self._writes += 1
        session.version = self._writes

    async def load(self, session_id: str, limit: int | None = None) -> list[Message]:
        with observed(LOAD, "load", session_id):
            return self._load(session_id, limit)

    def _load(self, session_id: str, limit: int | None) -> list[Message]:
        validate_session_id(session_id)
        limit = limit_arg(limit)
        with self._mutex:
            session = self._live(session_id, time.time())
            if session is None or limit == 0:
                return []
            entries = session.entries if limit is None else session.entries[-limit:]
            texts = [text for _, text in entries]
        return [decode_message(t) for t in texts]

    async def append(
        self,
        session_id: str,
        messages: Sequence[Message],
        message_ids: Sequence[str] | None = None,
    ) -> int:
        with observed(APPEND, "append", session_id):
            return self._append(session_id, messages, message_ids)

    def _append(
        self, session_id: str, messages: Sequence[Message], message_ids: Sequence[str] | None
    ) -> int:
        validate_session_id(session_id)
        texts = encode_messages(messages)
        ids = check_message_ids(message_ids, len(texts))
        now = time.time()
        with self._mutex:
            session = self._live(session_id, now)
            if session is None:
                session = self._sessions[session_id] = _Session(created=now, updated=now)
            if ids and ids[0] in session.ids:
                self._counters["duplicates_suppressed"] += 1
                return max(session.ids.get(i, 0) for i in ids)
            if texts:
                for offset, (mid, text) in enumerate(zip(ids, texts, strict=True), start=1):
                    session.entries.append((mid, text))
                    session.ids[mid] = session.last_seq + offset
                session.last_seq += len(texts)
                session.updated = now
                self._touch(session_id, session)
                self._counters["appends"] += 1
            elif not session.entries:
                del self._sessions[session_id]
            return session.last_seq

    async def pop(self, session_id: str) -> Message | None:
        validate_session_id(session_id)
        with self._mutex:
            session = self._live(session_id, time.time())
            if session is None or not session.entries:
                return None
            mid, text = session.entries.pop()
            del session.ids[mid]
            session.last_seq -= 1
            session.updated = time.time()
            if not session.entries:
                del self._sessions[session_id]
            else:
                self._touch(session_id, session)
        return decode_message(text)

    async def replace(
        self,
        session_id: str,
        messages: Sequence[Message],
        message_ids: Sequence[str] | None = None,
    ) -> None:
        """Replace the whole history (any length up to ``MAX_MESSAGES_PER_REPLACE``);
        ``message_ids`` as for :meth:`append` (generated when None)."""
        validate_session_id(session_id)
        texts = encode_messages(messages, whole_history=True)
        ids = check_message_ids(message_ids, len(texts))
        now = time.time()
        with self._mutex:
            old = self._live(session_id, now)
            if not texts:
                self._sessions.pop(session_id, None)
                return
            session = _Session(created=old.created if old else now, updated=now)
            session.entries = list(zip(ids, texts, strict=True))
            session.ids = {mid: seq for seq, mid in enumerate(ids, start=1)}
            session.last_seq = len(texts)
            self._touch(session_id, session)

    async def clear(self, session_id: str) -> None:
        validate_session_id(session_id)
        with self._mutex:
            self._sweep(time.time(), SWEEP_PER_CALL)
            self._sessions.pop(session_id, None)

    def entries_after(
        self, session_id: str, after: int, limit: int
    ) -> tuple[int, list[tuple[int, str, Message]]]:
        """``(last seq, [(seq, message id, message)])``: up to ``limit`` messages with seq
        above ``after``, read in one step (what a summariser reads)."""
        with self._mutex:
            session = self._live(session_id, time.time())
            if session is None:
                return 0, []
            first = session.last_seq - len(session.entries) + 1
            start = max(0, after + 1 - first)
            picked = session.entries[start : start + limit]
            last = session.last_seq
        return last, [
            (first + start + i, mid, decode_message(text)) for i, (mid, text) in enumerate(picked)
        ]

    def message_id_at(self, session_id: str, seq: int) -> str | None:
        """The id of message ``seq`` (None: no such message)."""
        with self._mutex:
            session = self._live(session_id, time.time())
            if session is None:
                return None
            index = seq - (session.last_seq - len(session.entries) + 1)
            if not 0 <= index < len(session.entries):
                return None
            return session.entries[index][0]

    async def list_sessions(
        self, inactive_for: float | None = None, limit: int = 1000
    ) -> list[SessionInfo]:
        inactive_for = age_arg(inactive_for)
        limit = COUNT.check_int("limit", limit, InvalidInputError)
        now = time.time()
        with self._mutex:
            live = [
                (sid, s)
                for sid in list(self._sessions)
                if (s := self._live(sid, now)) is not None
                and (inactive_for is None or now - s.updated >= inactive_for)
            ]
        live.sort(key=lambda item: item[1].updated)

        def stamp(t: float) -> datetime:
            return datetime.fromtimestamp(t, UTC)

        return [
            SessionInfo(
                session_id=sid,
                message_count=len(s.entries),
                created_at=stamp(s.created),
                updated_at=stamp(s.updated),
                expires_at=None
                if self.retention_ttl is None
                else stamp(s.updated + self.retention_ttl),
            )
            for sid, s in live[:limit]
        ]

    async def purge_expired(self) -> int:
        now = time.time()
        with self._mutex:
            return self._sweep(now, len(self._sessions))

    def turn_lock(
        self, session_id: str, timeout: float | None = None
    ) -> AbstractAsyncContextManager[None]:
        return self._locks.hold(validate_session_id(session_id), wait_arg(timeout))

    async def stats(self) -> dict[str, float]:
        with self._mutex:
            return {
                "sessions": len(self._sessions),
                "messages": sum(len(s.entries) for s in self._sessions.values()),
                **_counters(self._counters, self._locks),
            }

    async def aclose(self) -> None:
        return None


def _counters(counters: dict[str, float], locks: KeyedLocks) -> dict[str, float]:
    # A function of the parts, not of the store, so tracking it does not keep the store alive.
    return {**counters, "lock_waits": float(locks.waits)}
