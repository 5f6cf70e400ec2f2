"""The durable-tier calls of :class:`~vel.stores.postgres.PostgresStore`: what the two-tier
store's warm, flusher, purge and operators call (DESIGN.md 3.3-3.5, 3.8-3.10). A mixin, so the
store's facade stays one class while each group of calls is documented in one place."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from vel.stores.postgres.flushes import FlushBatch, FlushResult
from vel.stores.postgres.lease import Snapshot, TierLease
from vel.stores.postgres.resolve import Resolver
from vel.stores.postgres.sessions import Sessions
from vel.stores.postgres.sink import Sink
from vel.stores.postgres.sql import Row


class DurableTier:
    """Warm reads, last seqs, flushes, lease releases and conflict resolutions (see each
    method)."""

    _sessions: Sessions
    _sink: Sink
    _lease: TierLease
    _resolver: Resolver

    async def load_snapshot(self, session_id: str) -> Snapshot | None:
        """Return the whole session as stored, in one consistent read.

        Returns:
            None for an unknown or expired session; a cleared session gives a snapshot with
            its generation and no rows.

        Raises:
            InvalidInputError: bad session id.
            StoreError: Postgres failed.
        """
        return await self._lease.load_snapshot(session_id)

    async def take_lease(self, session_id: str, window: int, lease: float, now_ms: int) -> Snapshot:
        """Take the session's tier lease and read what a warm needs: the header and the last
        ``window`` rows (seqs ``base + 1 .. last_seq``), in one transaction.

        The row is created if missing (so the lease is recorded), and an expired session
        (judged at ``now_ms``, the caller's clock) starts afresh in place.

        Args:
            session_id: the session.
            window: how many of the newest rows to read.
            lease: seconds the lease runs from now (never shortened).
            now_ms: the caller's clock, Unix ms.

        Raises:
            InvalidInputError: bad session id or window.
            StoreError: Postgres failed, or its rows do not end at the session's last seq.
        """
        return await self._lease.take_lease(session_id, window, lease, now_ms)

    async def load_range(
        self,
        session_id: str,
        first: int,
        last: int,
        generation: int,
        revision: int | None,
        now_ms: int,
    ) -> list[Row] | None:
        """Rows ``first..last`` of the history a Redis copy was loaded from.

        Returns:
            The rows, oldest first; None when Postgres no longer holds that history (another
            generation or revision, expired at ``now_ms``, or rows missing).

        Raises:
            StoreError: Postgres failed.
        """
        return await self._lease.load_range(session_id, first, last, generation, revision, now_ms)

    async def apply_flush(
        self, session_id: str, generation: int, rows: Sequence[Row]
    ) -> FlushResult:
        """Write one session's batch copied from the hot tier; see :meth:`apply_flushes`."""
        (result,) = await self.apply_flushes([(session_id, generation, rows)])
        return result

    async def apply_flushes(
        self,
        batches: Sequence[FlushBatch | tuple[str, int, Sequence[Row]]],
        truncations: Mapping[str, tuple[int, int]] | None = None,
        lease: float | None = None,
    ) -> list[FlushResult]:
        """Write batches copied from the hot tier, idempotently, in one transaction.

        Per session: a batch of an older generation than Postgres holds is not applied
        (``stale``: a clear, replace or pop happened after it was read); a newer generation
        first wipes the stored messages (a session expired as of the batch's writes counts as
        absent, whatever its generation), or, with a truncation whose generation Postgres has
        reached, drops only the messages above its kept seq (the newer generation came from
        pops). A :class:`FlushBatch` is also checked against the history its Redis copy was
        loaded from: another revision, or a deleted row, makes it ``stale`` with ``conflict``
        set (DESIGN.md 3.8). Rows already stored with the same message id count as
        duplicates. The cost is a fixed five to seven round trips, whatever the number of
        sessions and rows.

        Args:
            batches: :class:`FlushBatch`, or ``(session_id, generation, rows)``, each session
                at most once; ``rows`` are ``(seq, message_id, message JSON text)``, possibly
                empty (to record a newer generation only).
            truncations: session id -> ``(from_generation, keep)`` (or a batch's
                ``truncate``): Postgres at ``from_generation`` or later (below the batch's
                generation) holds the session's history up to seq ``keep``.
            lease: extend each applied session's tier lease to this many seconds from now
                (None: leave it).

        Returns:
            One :class:`FlushResult` per batch, in order.

        Raises:
            InvalidInputError: malformed input; nothing was written.
            FlushConflictError: Postgres holds other messages at a session's seqs or ids;
                nothing of any batch was written (``exc.session_id`` names the session, so
                the others can be retried without it).
            StoreError: Postgres failed; nothing was written, the batches may be retried.
        """
        return await self._sink.apply_flushes(batches, truncations, lease)

    async def apply_clear(self, session_id: str, generation: int) -> None:
        """Record a clear made at ``generation``: wipe the messages unless Postgres is newer.

        A missing session gets an empty row carrying ``generation``, so that an older flush
        arriving later is recognised as stale.

        Raises:
            InvalidInputError: bad session id or generation.
            StoreError: Postgres failed; nothing changed.
        """
        await self._sink.apply_clear(session_id, generation)

    async def resolve(
        self, session_id: str, message_ids: Sequence[str], texts: Sequence[str], *, replace: bool
    ) -> int:
        """An operator's resolution of a flush conflict: append these messages after the
        history (skipping ids it already holds), or with ``replace`` make them the history.

        Ignores the tier lease (the caller acts for the tier) and bumps the generation and
        revision, so no older Redis copy or read can write over the result. Returns the new
        last seq.

        Raises:
            InvalidInputError: bad id, message ids or texts.
            StoreError: Postgres failed; nothing changed.
        """
        return await self._resolver.resolve(session_id, message_ids, texts, replace=replace)

    async def release_lease(self, session_ids: Sequence[str]) -> None:
        """End the tier lease of these sessions (the caller made sure Redis holds no copy
        and none can be seeded meanwhile: see ``TieredStore.release``)."""
        await self._lease.release(session_ids)

    async def release_expired(self, session_ids: Sequence[str]) -> None:
        """End the tier lease of these sessions if they are expired (their Redis copies are
        gone), so that :meth:`purge_expired` may delete them."""
        await self._lease.release_expired(session_ids)

    async def expired_leased(self, limit: int = 1000, after: str = "") -> list[str]:
        """Expired sessions that still carry a tier lease (purge spares them), in id order
        from after ``after``."""
        return await self._lease.expired_leased(limit, after)

    async def last_seq(self, session_id: str) -> tuple[int, int]:
        """Return ``(generation, last_seq)``; ``(0, 0)`` for an unknown or expired session.

        Raises:
            InvalidInputError: bad session id.
            StoreError: Postgres failed.
        """
        return await self._sessions.last_seq(session_id)
