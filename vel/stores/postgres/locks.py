"""Turn locks of the Postgres tier: one lease row per session in ``vel_locks``, and the locked
turn (:class:`PostgresTurn`).

A holder renews its lease while it runs and releases it when done; a holder that dies loses
the lock once its lease runs out. No connection is held in between (DESIGN.md 4, turns). The
lease table is UNLOGGED (migration 0002): taking and giving back a lease costs no durable
commit. A turn as the Agent runs it takes two round trips: ``vel_turn_begin`` takes the lock
and reads the window, and the commit's append releases the lease in its own transaction (the
row stays, expired, so the next turn takes it with an in-place update: migration 0008).
A turn that finds the lock held waits in its session's queue and is handed the lock when it
is released (:mod:`~vel.stores.postgres.handoff`), with a bounded backoff as the fallback.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import TypeVar

import asyncpg

from vel import tracing
from vel._ids import new_id
from vel._lease import DeferredKeeper, LeaseKeeper
from vel._loops import PerLoop
from vel._shield import release
from vel.bounds import limit_arg, wait_arg
from vel.errors import SessionLockedError, StoreError, StoreUnavailableError, TierLeaseError
from vel.instrument import observed
from vel.messages import Message, decode_texts, validate_session_id
from vel.metrics.histograms import APPEND, LOAD, LOCK_WAIT
from vel.stores.postgres.connector import Conn, Connector, log
from vel.stores.postgres.handoff import CHANNEL, Handoff
from vel.stores.postgres.sessions import LEASED, Sessions

T = TypeVar("T")

DEFAULT_LOCK_TIMEOUT = 30.0
# Seconds a waiter queued behind its session's head sleeps between tries if nothing wakes it.
_BEHIND_HEAD = 1.0

# Takes the lease if nobody holds it or the holder's lease ran out (a crashed holder), unless
# the row is this very token's, expired: the tombstone of an abandoned attempt (see below).
# vel_turn_begin (migration 0003) takes it the same way. Also says, at no extra round trip,
# whether the Redis tier holds the session (its tier lease, DESIGN.md 3.8), so that a
# 'database'-mode turn is refused before it calls the model.
_LOCK_ACQUIRE = f"""
INSERT INTO vel_locks AS l (session_id, token, expires_at)
VALUES ($1, $2, now() + $3::float8 * interval '1 second')
ON CONFLICT (session_id) DO UPDATE
   SET token = EXCLUDED.token, expires_at = EXCLUDED.expires_at
 WHERE l.expires_at < now() AND l.token <> EXCLUDED.token
RETURNING token,
          (SELECT s.hot_until FROM vel_session_rows s WHERE s.id = $1 AND {LEASED}) AS held_until
"""
# Gives up an attempt whose outcome is unknown (cancelled, reply lost): unless another token
# holds the lease, the row becomes this token's, expired now. Whether the attempt already ran
# (the lock is free again) or is still on its way (it meets its own tombstone and fails; if
# it is mid-insert, this waits for it and then expires it), the lock ends up free. Purged
# with the other expired rows an hour later. Turns waiting for the lease are told (0008).
_LOCK_ABANDON = f"""
WITH a AS (
    INSERT INTO vel_locks AS l (session_id, token, expires_at) VALUES ($1, $2, now())
    ON CONFLICT (session_id) DO UPDATE SET token = EXCLUDED.token, expires_at = now()
     WHERE l.token = EXCLUDED.token OR l.expires_at < now()
    RETURNING waited
)
SELECT pg_notify('{CHANNEL}', $1) FROM a WHERE a.waited
"""
_LOCK_RENEW = """
UPDATE vel_locks SET expires_at = now() + $3::float8 * interval '1 second'
 WHERE session_id = $1 AND token = $2
RETURNING token
"""
# Releases by token; a lease some turn waits for is released with a NOTIFY (0008).
_LOCK_RELEASE = f"""
WITH r AS (
    UPDATE vel_locks SET expires_at = '-infinity' WHERE session_id = $1 AND token = $2
    RETURNING waited
)
SELECT pg_notify('{CHANNEL}', $1) FROM r WHERE r.waited
"""
# Lock and window in one round trip: NULL when held by another turn, else newest first.
# $5: more turns of this process wait for the session (the lease is then marked waited).
_TURN_BEGIN = "SELECT vel_turn_begin($1, $2, $3::float8, $4::bigint, $5::boolean)"
# What vel_turn_begin raises (migration 0004) for a session the Redis tier holds; its DETAIL
# is the tier lease's end in Unix seconds.
TIER_LEASED = "VL001"


async def _begin(
    conn: Conn, session_id: str, token: str, lease: float, limit: int | None, queued: bool
) -> list[str] | None:
    try:
        result: list[str] | None = await conn.fetchval(
            _TURN_BEGIN, session_id, token, lease, limit, queued
        )
    except asyncpg.PostgresError as exc:
        if exc.sqlstate != TIER_LEASED:
            raise
        until = datetime.fromtimestamp(float(getattr(exc, "detail", 0) or 0), UTC)
        raise TierLeaseError(session_id, until) from None
    return result


async def _acquire(conn: Conn, session_id: str, token: str, lease: float) -> str | None:
    got = await conn.fetchrow(_LOCK_ACQUIRE, session_id, token, lease)
    if got is None:
        return None
    if got["held_until"] is not None:
        await conn.execute(_LOCK_RELEASE, session_id, token)
        raise TierLeaseError(session_id, got["held_until"])
    return str(got["token"])


class PostgresTurn:
    """A turn holding its session's lock (see :meth:`PostgresStore.turn
    <vel.stores.postgres.PostgresStore.turn>`)."""

    def __init__(
        self,
        sessions: Sessions,
        session_id: str,
        token: str,
        keeper: DeferredKeeper,
        released: Callable[[str], None],
    ) -> None:
        self.sessions = sessions
        self.session_id = session_id
        self.token = token
        self.keeper = keeper
        self._on_release = released
        self.window: list[Message] = []
        self.committed = False
        self.released = False

    async def commit(
        self, messages: Sequence[Message], message_ids: Sequence[str] | None = None
    ) -> int:
        """Append the turn's messages and release the lock in one transaction; return the
        last seq.

        Raises:
            InvalidInputError: bad messages; nothing was stored and the lock is still held.
            StoreError: as :meth:`PostgresStore.append <vel.stores.postgres.PostgresStore.append>`.
        """
        if self.committed:
            raise StoreError("this turn was already committed")
        await self.keeper.stop()  # the append below ends the lease
        with observed(APPEND, "append", self.session_id):
            seq, self.released = await self.sessions.append_unlocking(
                self.session_id, messages, message_ids, self.token
            )
        self.committed = True
        if self.released:
            self._on_release(self.session_id)
        return seq


class TurnLocks:
    """Lease rows in ``vel_locks``; ``lease`` is the seconds one lives without renewal."""

    def __init__(self, db: Connector, sessions: Sessions, lease: float) -> None:
        self._db = db
        self._sessions = sessions
        self.lease = lease
        self.waits = 0
        self._handoffs: PerLoop[Handoff] = PerLoop(self._new_handoff, Handoff.aclose)
        # Turns queued for a lock, all loops together: with none, a turn skips the queues.
        self._queued = 0

    async def _new_handoff(self) -> Handoff:
        return Handoff(self._db.listener if self._db.can_listen else None)

    async def aclose(self) -> None:
        """Close this loop's listener connection (and the helper loop's)."""
        await self._handoffs.aclose()

    def _released(self, session_id: str) -> None:
        """A lock this loop released: its next waiting turn is woken by the NOTIFY, or
        shortly after if that is lost (see :mod:`~vel.stores.postgres.handoff`)."""
        if self._queued:
            handoff = self._handoffs.current()
            if handoff is not None:
                handoff.released(session_id)

    @property
    def _limit(self) -> float:
        """Bound of a shielded release: one call's deadline, and a little more."""
        return self._db.op_timeout + 1.0

    @asynccontextmanager
    async def hold(self, session_id: str, timeout: float | None = None) -> AsyncIterator[None]:
        """See :meth:`PostgresStore.turn_lock <vel.stores.postgres.PostgresStore.turn_lock>`."""
        session_id = validate_session_id(session_id)
        checked = wait_arg(timeout)
        wait = DEFAULT_LOCK_TIMEOUT if checked is None else checked
        token = new_id()  # unique across processes (vel._ids)
        # Released by token, shielded and bounded, whatever ends the turn: an anyio scope
        # cancels every await of a plain ``finally``. A cancelled or failed acquire gives the
        # lock up too: the server may have granted it with the reply lost, or may still
        # receive the attempt.
        try:
            await self._until_locked(
                session_id,
                wait,
                lambda _queued: self._db.run(
                    "acquire turn lock",
                    lambda c: _acquire(c, session_id, token, self.lease),
                ),
            )
        except SessionLockedError:
            raise
        except BaseException as exc:
            await self._abandon(session_id, token, quiet=isinstance(exc, StoreUnavailableError))
            raise
        keeper = self._keeper(session_id, token)
        try:
            yield
        finally:
            await release(lambda: self._end(keeper, session_id, token), self._limit, "unlock")

    @asynccontextmanager
    async def turn(
        self, session_id: str, limit: int | None = None, timeout: float | None = None
    ) -> AsyncIterator[PostgresTurn]:
        """See :meth:`PostgresStore.turn <vel.stores.postgres.PostgresStore.turn>`."""
        session_id = validate_session_id(session_id)
        limit = limit_arg(limit)
        checked = wait_arg(timeout)
        wait = DEFAULT_LOCK_TIMEOUT if checked is None else checked
        token = new_id()  # unique across processes (vel._ids)
        try:
            # The lock and the window come in one call; what the turn waited for the lock
            # goes to the lock-wait histogram, the last call and the decoding to the load.
            with tracing.span("load", session_id):
                newest_first: list[str]
                newest_first, tried = await self._until_locked(
                    session_id,
                    wait,
                    lambda queued: self._db.run(
                        "lock and load",
                        lambda c: _begin(c, session_id, token, self.lease, limit, queued),
                    ),
                )
                window = decode_texts(reversed(newest_first))
                LOAD.observe(time.perf_counter() - tried)
        except SessionLockedError:
            raise
        except BaseException as exc:
            # Postgres may have granted the lock with its reply lost, or may still receive
            # the attempt: give it up by token.
            await self._abandon(session_id, token, quiet=isinstance(exc, StoreUnavailableError))
            raise
        # Started after a sixth of the lease, the keeper first renews at half of it.
        keeper = DeferredKeeper(lambda: self._keeper(session_id, token), self.lease / 6)
        turn = PostgresTurn(self._sessions, session_id, token, keeper, self._released)
        turn.window = window
        try:
            yield turn
        finally:
            # A commit that released the lock stopped the lease keeping first: nothing is
            # left to do (and no shielded scope to pay for).
            if not turn.released:
                # Shielded and bounded: an anyio scope cancels every await of a plain finally.
                await release(lambda: self._end_turn(turn), self._limit, "unlock")

    async def _end(self, keeper: LeaseKeeper, session_id: str, token: str) -> None:
        await keeper.stop()
        await self._release(session_id, token)

    async def _end_turn(self, turn: PostgresTurn) -> None:
        await turn.keeper.stop()
        if not turn.released:
            await self._release(turn.session_id, turn.token)

    async def _abandon(self, session_id: str, token: str, *, quiet: bool = False) -> None:
        """Give up a lock attempt by token; ``quiet``: the attempt itself found Postgres
        unreachable, which its caller is told, so a failed abandon is not logged again."""
        await release(
            lambda: self._release(session_id, token, _LOCK_ABANDON, quiet=quiet),
            self._limit,
            "unlock",
        )

    def _keeper(self, session_id: str, token: str) -> LeaseKeeper:
        return LeaseKeeper(
            lambda: self._renew(session_id, token),
            self.lease / 3,
            f"turn lock of session {session_id!r}",
            session_id,
        )

    async def _release(
        self, session_id: str, token: str, sql: str = _LOCK_RELEASE, *, quiet: bool = False
    ) -> None:
        try:
            await self._db.run("release turn lock", lambda c: c.execute(sql, session_id, token))
            self._released(session_id)
        except StoreError as exc:
            # Not worth failing a finished turn over: the lease runs out by itself.
            log.log(
                logging.DEBUG if quiet else logging.WARNING,
                "could not release turn lock of session %r: %s",
                session_id,
                exc,
                extra={"session_id": session_id},
            )

    async def _until_locked(
        self, session_id: str, wait: float, attempt: Callable[[bool], Awaitable[T | None]]
    ) -> tuple[T, float]:
        """Call ``attempt`` (one try at the lock; its argument: more turns of this loop wait
        for the session) until it returns a value; return it and the ``perf_counter()`` time
        the successful attempt began.

        After a failed first try the turn joins its session's queue: its head tries again
        when a release wakes it, every waiter after a jittered backoff as the fallback.
        """
        started = time.perf_counter()
        current = self._handoffs.current() if self._queued else None
        # A turn of this loop that finds others of the session waiting queues behind them
        # rather than barging in: the lock goes first come first served.
        if current is None or not current.queued(session_id) or wait <= 0:
            got = await attempt(False)
            if got is not None:
                LOCK_WAIT.observe(0.0)
                return got, started
        self.waits += 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        if wait <= 0:
            raise SessionLockedError(
                f"session {session_id!r} is locked by another turn (waited {wait:g}s)"
            )
        handoff = await self._handoffs.get()
        waiter = handoff.join(session_id)
        self._queued += 1
        got_it = False
        try:
            await handoff.listen()
            delay = 0.005
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise SessionLockedError(
                        f"session {session_id!r} is locked by another turn (waited {wait:g}s)"
                    )
                if handoff.is_head(session_id, waiter):
                    # Jitter keeps waiters of one session from polling in lockstep.
                    delay = min(delay * 2, 0.25)
                    pause = random.uniform(delay / 2, delay)
                else:
                    # Behind the head: woken when it is this waiter's turn; the fallback
                    # only guards against a lost wake-up.
                    pause = _BEHIND_HEAD
                await waiter.sleep(min(remaining, pause))
                # Re-armed before the try: a release committed during it wakes the next sleep.
                waiter.rearm()
                tried = time.perf_counter()
                got = await attempt(handoff.others(session_id))
                if got is not None:
                    got_it = True
                    LOCK_WAIT.observe(tried - started)  # the waiting, not the last round trip
                    return got, tried
        finally:
            # The holder wakes the next waiter when it releases (its lease says waited);
            # a waiter that gives up passes its wake-up on instead.
            handoff.leave(session_id, waiter, wake_next=not got_it)
            self._queued -= 1

    async def _renew(self, session_id: str, token: str) -> bool:
        held = await self._db.run(
            "renew turn lock",
            lambda c: c.fetchval(_LOCK_RENEW, session_id, token, self.lease),
        )
        return held is not None
