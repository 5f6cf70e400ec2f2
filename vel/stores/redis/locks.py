"""Leases in Redis: the warm lease, turn locks, and the locked turn (:class:`RedisTurn`).

A lease is a key holding its holder's token with a PX expiry: taken with ``SET NX``, renewed
and released by scripts that check the token, so a holder whose lease ran out can never
extend or delete its successor's. A turn's lock is taken by the script that reads its window
and released by the append that stores its messages (DESIGN.md 4, turns).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, TypeVar

from vel import tracing
from vel._ids import new_id
from vel._lease import LeaseKeeper
from vel._shield import release
from vel.bounds import limit_arg, wait_arg
from vel.errors import (
    SessionLockedError,
    StoreError,
    StoreTimeoutError,
    StoreUnavailableError,
)
from vel.instrument import observed
from vel.logs import get_logger
from vel.messages import Message, validate_session_id
from vel.metrics.histograms import APPEND, LOAD, LOCK_WAIT
from vel.stores.redis.client import Client, Connector, ms
from vel.stores.redis.items import Window, encode
from vel.stores.redis.keys import KeyLayout, SessionKeys
from vel.stores.redis.scripts import LOCKED
from vel.stores.redis.sessions import Sessions
from vel.stores.redis.windowread import read_window

log = get_logger("vel.redis")
T = TypeVar("T")

# A turn waiting for a lock blocks on its wake list this long at most, then tries again (a
# holder that died leaves no wake-up, its lease runs out; a released lock's reservation for
# the waiters, see scripts._HANDOFF, lasts as long).
WAKE_POLL = 1.0


class RedisTurn:
    """A turn holding its session's lock (see :meth:`RedisStore.turn`)."""

    def __init__(
        self,
        sessions: Sessions,
        session_id: str,
        token: str,
        on_miss: Callable[[], Awaitable[None]] | None,
    ) -> None:
        self.sessions = sessions
        self.session_id = session_id
        self.token = token
        self.on_miss = on_miss
        self.window: list[Message] = []
        # What the lock's read found in Redis: the window's messages, and where they sit in
        # the history (a partial copy may need older messages from Postgres).
        self.view: Window | None = None
        self.keeper: LeaseKeeper | None = None
        self._keep_later: asyncio.TimerHandle | None = None
        self.committed = False

    def keep_lease(self, start: Callable[[], LeaseKeeper], after: float) -> None:
        """Renew the lock from ``after`` seconds on: most turns end before a renewal is due,
        and then no renewal task is ever created (a task per turn costs more than the rest
        of the turn's bookkeeping)."""

        def begin() -> None:
            self._keep_later = None
            self.keeper = start()

        self._keep_later = asyncio.get_running_loop().call_later(after, begin)

    async def stop_lease(self) -> None:
        if self._keep_later is not None:
            self._keep_later.cancel()
            self._keep_later = None
        if self.keeper is not None:
            await self.keeper.stop()

    async def commit(
        self, messages: Sequence[Message], message_ids: Sequence[str] | None = None
    ) -> int:
        """Append the turn's messages and release the lock in one step; return the last seq.

        Raises:
            InvalidInputError: bad messages; nothing was stored and the lock is still held.
            StoreError: as :meth:`RedisStore.append`.
        """
        if self.committed:
            raise StoreError("this turn was already committed")
        items = encode(messages, message_ids)
        if not items:
            return await self.sessions.last_seq(self.session_id)
        await self.stop_lease()  # the append below ends the lease
        first_id = items[0].partition("\n")[0]
        with observed(APPEND, "append", self.session_id):
            seq = await self.sessions.append_items(
                self.session_id, items, first_id, self.on_miss, unlock=self.token
            )
        self.committed = True
        return seq


class Locks:
    """Leases and turn locks; ``lease`` is the seconds a turn lock lives without renewal,
    ``counters`` the RedisStore's counters dict (shared, updated in place)."""

    def __init__(
        self,
        redis: Connector,
        keys: KeyLayout,
        counters: dict[str, float],
        sessions: Sessions,
        *,
        lease: float,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._counters = counters
        self._sessions = sessions
        self._lease = lease

    async def try_lock(self, key: str, token: str, lease: float) -> bool:
        """Take the lease-based lock ``key`` for ``token`` (again, if it holds it already)."""
        args: list[Any] = [token, ms(lease)]
        return bool(
            await self._redis.call("lock", lambda c: c.take(keys=[key], args=args), idempotent=True)
        )

    async def renew_lock(self, key: str, token: str, lease: float) -> bool:
        args: list[Any] = [token, ms(lease)]
        return bool(
            await self._redis.call(
                "renew", lambda c: c.renew(keys=[key], args=args), idempotent=True
            )
        )

    async def release_lock(self, key: str, token: str, wake: str | None = None) -> None:
        """Release ``key`` if ``token`` holds it; ``wake``: a turn lock's wake list, which
        gets a wake-up if turns wait for the lock."""
        names = [key] if wake is None else [key, wake]
        args: list[Any] = [token, ms(self._lease)]
        await self._redis.call(
            "unlock", lambda c: c.release(keys=names, args=args), idempotent=True
        )

    async def abandon_lock(
        self, key: str, token: str, lease: float, wake: str | None = None
    ) -> None:
        """Give up an attempt at ``key`` whose outcome is unknown (cancelled, reply lost):
        the lock is free afterwards even if the attempt reaches Redis later (``wake`` as
        :meth:`release_lock`)."""
        names = [key] if wake is None else [key, wake]
        args: list[Any] = [token, ms(lease)]
        await self._redis.call(
            "abandon lock", lambda c: c.abandon(keys=names, args=args), idempotent=True
        )

    def turn_lock(
        self, session_id: str, timeout: float | None = None
    ) -> AbstractAsyncContextManager[None]:
        keys = self._keys.session(validate_session_id(session_id))
        return self._turn_lock(keys, wait_arg(timeout))

    async def _until_locked(
        self,
        keys: SessionKeys,
        timeout: float | None,
        attempt: Callable[[], Awaitable[T | None]],
        handoff: bool = False,
    ) -> tuple[T, float]:
        """Call ``attempt`` (one try at the turn lock) until it returns a value; return it
        and the ``perf_counter()`` time the successful attempt began. Between attempts:
        with ``handoff`` (the attempt marks a held lock, so its release leaves a wake-up),
        block on the session's wake list; else back off."""
        started = tried = time.perf_counter()
        deadline = time.monotonic() + (30.0 if timeout is None else timeout)
        delay = 0.005
        waited = False
        while (result := await attempt()) is None:
            if not waited:
                waited = True
                self._counters["lock_waits"] += 1
            left = deadline - time.monotonic()
            if left <= 0:
                raise SessionLockedError(
                    f"session lock {keys.turn_lock!r} is held by another turn (waited {timeout} s)"
                )
            if not handoff:
                await asyncio.sleep(min(left, delay * (0.5 + random.random())))
                delay = min(delay * 2, 0.2)
            elif not await self._wait_wake(keys, left):
                # Every waiting slot is taken: poll, often (a released lock is reserved
                # for a turn that waited, this one as much as those woken).
                await asyncio.sleep(min(left, 0.02 * (0.5 + random.random())))
            tried = time.perf_counter()
        LOCK_WAIT.observe(tried - started)  # the waiting, not the last round trip
        return result, tried

    async def _wait_wake(self, keys: SessionKeys, left: float) -> bool:
        """Block until the lock's holder leaves a wake-up on its release (or a short while
        passes: a holder that died leaves none); False if every waiting slot is taken (the
        caller polls instead)."""
        # Well within the call's deadline (op_timeout), so a long wait is never cut off.
        seconds = max(0.01, min(left, WAKE_POLL, self._redis.op_timeout / 2))

        async def wait(c: Client) -> bool:
            if c.waiters.locked():
                return False
            async with c.waiters:
                await c.redis.blpop([keys.wake], timeout=seconds)
            return True

        return await self._redis.call("lock wait", wait, idempotent=True)

    def _keep_lock(self, keys: SessionKeys, token: str) -> LeaseKeeper:
        return LeaseKeeper(
            lambda: self.renew_lock(keys.turn_lock, token, self._lease),
            self._lease / 3,
            f"turn lock {keys.turn_lock!r}",
            self._keys.session_id_of(keys.meta),
        )

    async def _unlock(self, keys: SessionKeys, token: str) -> None:
        try:
            await self.release_lock(keys.turn_lock, token, keys.wake)
        except StoreError:
            log.warning(
                "could not release turn lock %s; its lease will run out",
                keys.turn_lock,
                extra={"session_id": self._keys.session_id_of(keys.meta)},
            )

    async def _locked(self, keys: SessionKeys, token: str, until_locked: Awaitable[T]) -> T:
        """Await ``until_locked`` (attempts at the turn lock with ``token``); if it fails or is
        cancelled, abandon the attempt: Redis may have granted the lock with the reply lost,
        or may still receive the attempt."""
        try:
            return await until_locked
        except SessionLockedError:
            raise
        except BaseException as exc:
            # An attempt that found Redis unreachable: its caller is told, so a failed
            # abandon is not logged again.
            quiet = isinstance(exc, StoreUnavailableError)
            await release(
                lambda: self._abandon(keys, token, quiet), self._limit, "turn lock release"
            )
            raise

    async def _abandon(self, keys: SessionKeys, token: str, quiet: bool = False) -> None:
        try:
            await self.abandon_lock(keys.turn_lock, token, self._lease, keys.wake)
        except StoreError:
            log.log(
                logging.DEBUG if quiet else logging.WARNING,
                "could not release turn lock %s; its lease will run out",
                keys.turn_lock,
                extra={"session_id": self._keys.session_id_of(keys.meta)},
            )

    @property
    def _limit(self) -> float:
        """Bound of a shielded release: one call's deadline, and a little more."""
        return self._redis.op_timeout + 1.0

    @asynccontextmanager
    async def _turn_lock(self, keys: SessionKeys, timeout: float | None) -> AsyncIterator[None]:
        token = new_id()

        async def attempt() -> bool | None:
            return await self.try_lock(keys.turn_lock, token, self._lease) or None

        await self._locked(keys, token, self._until_locked(keys, timeout, attempt))
        keeper = self._keep_lock(keys, token)
        try:
            yield
        finally:
            # Shielded and bounded: an anyio scope cancels every await of a plain finally.
            await release(lambda: self._end_lock(keeper, keys, token), self._limit, "unlock")

    async def _end_lock(self, keeper: LeaseKeeper, keys: SessionKeys, token: str) -> None:
        await keeper.stop()
        await self._unlock(keys, token)

    @asynccontextmanager
    async def turn(
        self,
        session_id: str,
        limit: int | None = None,
        timeout: float | None = None,
        on_miss: Callable[[], Awaitable[None]] | None = None,
    ) -> AsyncIterator[RedisTurn]:
        keys = self._keys.session(validate_session_id(session_id))
        limit = limit_arg(limit)
        timeout = wait_arg(timeout)
        token = new_id()
        turn_keys = [*keys.layout, keys.turn_lock, keys.wake]
        args: list[Any] = [
            *self._sessions.common(session_id),
            -1 if limit is None else limit,
            ms(self._sessions.lease_margin),
            token,
            ms(self._lease),
            "0",
        ]

        async def attempt() -> list[Any] | None:
            reply = await self._redis.call(
                "lock+load",
                lambda c: read_window(c.lock_head, c.lock_load, turn_keys, args, args[5]),
                idempotent=True,
            )
            if int(reply[0]) == LOCKED:
                args[-1] = "1"  # a waiter: once it has the lock, it wakes the next one
                return None
            return reply

        turn: RedisTurn | None = None
        try:
            # The lock and the window come in one script; what the turn waited for the lock
            # goes to the lock-wait histogram, the rest (with any warm) is the load.
            with tracing.span("load", session_id):
                reply, tried = await self._locked(
                    keys, token, self._until_locked(keys, timeout, attempt, handoff=True)
                )
                turn = RedisTurn(self._sessions, session_id, token, on_miss)
                window = self._sessions.window(session_id, reply)
                for _ in range(5):
                    if window is not None or on_miss is None:
                        break
                    await on_miss()
                    window = await self._sessions.read(session_id, limit)
                if window is None and on_miss is not None:
                    raise StoreTimeoutError(f"session {session_id!r} kept vanishing from Redis")
                LOAD.observe(time.perf_counter() - tried)
            turn.view = window
            turn.window = [] if window is None else window.messages
            # Started after a sixth of the lease, the keeper first renews at half of it.
            turn.keep_lease(lambda: self._keep_lock(keys, token), self._lease / 6)
            yield turn
        finally:
            if turn is not None and not turn.committed:
                held = turn
                # Shielded and bounded: an anyio scope cancels every await of a plain finally.
                await release(lambda: self._end_turn(held, keys), self._limit, "unlock")
            # A committed turn has nothing left to do: its commit stopped the lease keeping
            # and released the lock.

    async def _end_turn(self, turn: RedisTurn, keys: SessionKeys) -> None:
        await turn.stop_lease()
        if not turn.committed:
            await self._unlock(keys, turn.token)
