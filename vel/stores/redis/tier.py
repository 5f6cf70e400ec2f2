"""The write-behind calls of :class:`~vel.stores.redis.RedisStore`: what the two-tier store's
warm, flusher, purge and operators call on the Redis tier (DESIGN.md 3.2-3.3, 3.8, 3.10). A
mixin, so the store's facade stays one class while each group of calls is documented in one
place; the work is done by :class:`~vel.stores.redis.sessions.Sessions` and
:class:`~vel.stores.redis.writebehind.WriteBehind`."""

from __future__ import annotations

from collections.abc import Sequence

from vel.stores.redis.items import Copy
from vel.stores.redis.sessions import Sessions
from vel.stores.redis.writebehind import Claim, Conflict, Pending, WriteBehind


class HotTier:
    """The warm's seed and extend, the flusher's claims, reads and acks, conflicts, and the
    purge's drops (see each method)."""

    _sessions: Sessions
    _write_behind: WriteBehind

    async def read_copy(self, session_id: str) -> Copy | None:
        """The session's whole Redis copy in one step (None: absent)."""
        return await self._sessions.read_copy(session_id)

    async def seed(
        self,
        session_id: str,
        token: str,
        *,
        gen: int,
        rev: int,
        last_seq: int,
        rows: Sequence[tuple[int, str, str]],
        created_ms: int,
        updated_ms: int,
        expires_ms: int | None,
        lease_until_ms: int,
    ) -> int:
        """Install a window read from Postgres (rows: seqs ``last_seq - len(rows) + 1 ..
        last_seq``), see SEED. Returns 1, 0 or -1."""
        return await self._sessions.seed(
            session_id,
            token,
            gen=gen,
            rev=rev,
            last_seq=last_seq,
            rows=rows,
            created_ms=created_ms,
            updated_ms=updated_ms,
            expires_ms=expires_ms,
            lease_until_ms=lease_until_ms,
        )

    async def extend(
        self,
        session_id: str,
        gen: int,
        rev: int | None,
        base: int,
        rows: Sequence[tuple[int, str, str]],
    ) -> int:
        """Prepend older rows to a partial copy; returns its new base or -1 (it changed)."""
        return await self._sessions.extend(session_id, gen, rev, base, rows)

    # -- flushing (write-behind) -----------------------------------------------------------

    async def sweep(
        self,
        buckets: Sequence[int],
        hold: float,
        lease: float,
        limit: int,
        max_rows: int,
        gap: float = 0.0,
    ) -> tuple[list[tuple[Claim, list[Pending | None]]] | None, int]:
        """Claim the sessions of ``buckets`` due ``hold`` seconds ago or earlier (up to
        ``limit`` per bucket) for ``lease`` seconds and read what they have to copy (at
        most ``max_rows`` messages each), in one step; None when another flusher swept less
        than ``gap`` seconds ago (see WriteBehind.sweep)."""
        return await self._write_behind.sweep(buckets, hold, lease, limit, max_rows, gap)

    async def renew_claim(self, claim: Claim, lease: float) -> bool:
        """Extend ``claim`` by ``lease`` seconds from now, for the sessions it still holds;
        False when it holds none any more."""
        return await self._write_behind.renew_claim(claim, lease)

    async def try_sweep(self, bucket: int, interval: float) -> bool:
        """Take the bucket's sweep turn for ``interval`` seconds (False: taken by another)."""
        return await self._write_behind.try_sweep(bucket, interval)

    async def reschedule(self, bucket: int, session_ids: Sequence[str], delay: float) -> None:
        """Make claimed sessions due again after ``delay`` seconds (if still dirty)."""
        await self._write_behind.reschedule(bucket, session_ids, delay)

    async def pending(self, session_ids: Sequence[str], max_rows: int) -> list[Pending | None]:
        """Read what each claimed session still has to copy (one pipelined round trip)."""
        return await self._write_behind.pending(session_ids, max_rows)

    async def ack(
        self, acks: Sequence[tuple[str, int, int] | tuple[str, int, int, int]]
    ) -> list[int]:
        """Acknowledge ``(session id, generation, flushed up to seq[, tier lease end ms])``."""
        return await self._write_behind.ack(acks)

    async def conflict(self, session_id: str, gen: int, rev: int | None, reason: str) -> bool:
        """Set a session aside as a flush conflict (see WriteBehind.conflict)."""
        return await self._write_behind.conflict(session_id, gen, rev, reason)

    async def resolved(self, session_id: str, seq: int, gen: int) -> bool:
        """Drop a resolved conflict's copy if unchanged (see WriteBehind.resolved)."""
        return await self._write_behind.resolved(session_id, seq, gen)

    async def conflicts(self, limit: int = 1000) -> list[Conflict]:
        """Sessions whose flush could not be applied, oldest first."""
        return await self._write_behind.conflicts(limit)

    async def conflict_count(self) -> int:
        """How many sessions are in conflict (one ZCARD per bucket)."""
        return await self._write_behind.conflict_count()

    async def backlog(self) -> tuple[int, float, int]:
        """(unflushed messages, oldest dirty age in seconds, dirty sessions)."""
        return await self._write_behind.backlog()

    async def drop_clean(self, session_ids: Sequence[str]) -> int:
        """Delete the Redis copies of these sessions, except dirty ones (their unflushed
        messages must reach Postgres first); returns how many were dropped."""
        return sum(code > 0 for code in await self.drop_clean_each(session_ids))

    async def drop_clean_each(self, session_ids: Sequence[str]) -> list[int]:
        """As :meth:`drop_clean`, per session: 1 dropped, 0 had no copy, -1 kept (dirty or
        in conflict)."""
        return await self._write_behind.drop_clean(session_ids)
