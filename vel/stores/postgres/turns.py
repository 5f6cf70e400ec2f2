"""The turn-lock entry points of :class:`~vel.stores.postgres.PostgresStore`: the session's
turn lock alone (:meth:`TurnEntry.turn_lock`) and the locked turn the Agent runs
(:meth:`TurnEntry.turn`). A mixin, as :mod:`.tier` is; the lease rows and the turn are
:mod:`.locks`'."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager

from vel.stores.postgres.locks import PostgresTurn, TurnLocks


class TurnEntry:
    """The turn lock and the locked turn (see each method)."""

    _locks: TurnLocks

    @property
    def lock_lease(self) -> float:
        """Seconds a turn lock outlives its holder (renewed while held)."""
        return self._locks.lease

    def turn_lock(
        self, session_id: str, timeout: float | None = None
    ) -> AbstractAsyncContextManager[None]:
        """Hold the session's turn lock, a lease row shared by every process.

        The lease is renewed in the background every ``lock_lease / 3`` seconds while held
        and released on exit; a holder that dies loses it after ``lock_lease`` seconds.
        No connection is held in between.

        Args:
            session_id: the session.
            timeout: seconds to wait for the lock (default 30; 0 tries once).

        Raises:
            SessionLockedError: another holder kept the lock for ``timeout`` seconds.
            StoreError: Postgres failed while acquiring.
        """
        return self._locks.hold(session_id, timeout)

    def turn(
        self, session_id: str, limit: int | None = None, timeout: float | None = None
    ) -> AbstractAsyncContextManager[PostgresTurn]:
        """A turn under the session's turn lock, in two round trips: the lock is taken with
        the window read and released by :meth:`PostgresTurn.commit
        <vel.stores.postgres.locks.PostgresTurn.commit>` in the append's own transaction
        (the Agent runs its turns this way).

        ``turn.window`` holds the last ``limit`` messages (all when None), oldest first. Leaving
        the block without committing releases the lock and stores nothing. The lease is
        renewed while a turn outlives a sixth of ``lock_lease``; a holder that dies loses it
        after ``lock_lease`` seconds.

        Args:
            session_id: the session.
            limit: the window's size (None: the whole history).
            timeout: seconds to wait for the lock (default 30; 0 tries once).

        Raises:
            SessionLockedError: another holder kept the lock for ``timeout`` seconds.
            InvalidInputError: bad session id or limit.
            StoreError: Postgres failed.
        """
        return self._locks.turn(session_id, limit, timeout)
