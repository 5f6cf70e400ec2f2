"""Turn locks of the Postgres tier: one lease row per session in ``vel_locks``.

A holder renews its lease while it runs and deletes the row when done; a holder that dies loses
the lock once its lease runs out. No connection is held in between (DESIGN.md 4, turns).
"""

from __future__ import annotations

import asyncio
import random
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from vel._lease import LeaseKeeper
from vel._shield import finish
from vel.bounds import wait_arg
from vel.errors import SessionLockedError, StoreError
from vel.messages import validate_session_id
from vel.metrics.histograms import LOCK_WAIT
from vel.stores.postgres.connector import Connector, log

DEFAULT_LOCK_TIMEOUT = 30.0

# Takes the lease if nobody holds it or the holder's lease ran out (a crashed holder), unless
# the row is this very token's, expired: the tombstone of an abandoned attempt (see below).
_LOCK_ACQUIRE = """
INSERT INTO vel_locks AS l (session_id, token, expires_at)
VALUES ($1, $2, now() + $3::float8 * interval '1 second')
ON CONFLICT (session_id) DO UPDATE
   SET token = EXCLUDED.token, expires_at = EXCLUDED.expires_at
 WHERE l.expires_at < now() AND l.token <> EXCLUDED.token
RETURNING token
"""
# Gives up an attempt whose outcome is unknown (cancelled, reply lost): unless another token
# holds the lease, the row becomes this token's, expired now. Whether the attempt already ran
# (the lock is free again) or is still on its way (it meets its own tombstone and fails; if
# it is mid-insert, this waits for it and then expires it), the lock ends up free. Purged
# with the other expired rows an hour later.
_LOCK_ABANDON = """
INSERT INTO vel_locks AS l (session_id, token, expires_at) VALUES ($1, $2, now())
ON CONFLICT (session_id) DO UPDATE SET token = EXCLUDED.token, expires_at = now()
 WHERE l.token = EXCLUDED.token OR l.expires_at < now()
"""
_LOCK_RENEW = """
UPDATE vel_locks SET expires_at = now() + $3::float8 * interval '1 second'
 WHERE session_id = $1 AND token = $2
RETURNING token
"""
_LOCK_RELEASE = "DELETE FROM vel_locks WHERE session_id = $1 AND token = $2"


class TurnLocks:
    """Lease rows in ``vel_locks``; ``lease`` is the seconds one lives without renewal."""

    def __init__(self, db: Connector, lease: float) -> None:
        self._db = db
        self.lease = lease
        self.waits = 0

    @asynccontextmanager
    async def hold(self, session_id: str, timeout: float | None = None) -> AsyncIterator[None]:
        """See :meth:`PostgresStore.turn_lock <vel.stores.postgres.PostgresStore.turn_lock>`."""
        session_id = validate_session_id(session_id)
        checked = wait_arg(timeout)
        wait = DEFAULT_LOCK_TIMEOUT if checked is None else checked
        token = secrets.token_hex(16)
        # Released by token, shielded and bounded, whatever ends the turn: an anyio scope
        # cancels every await of a plain ``finally``. A cancelled or failed acquire releases
        # too: the server may have granted the lock while its reply was lost.
        release = f"release of the turn lock of session {session_id!r}"
        limit = self._db.op_timeout + 1.0
        try:
            await self._acquire(session_id, token, wait)
        except SessionLockedError:
            raise
        except BaseException:
            await finish(lambda: self._release(session_id, token, _LOCK_ABANDON), limit, release)
            raise
        keeper = LeaseKeeper(
            lambda: self._renew(session_id, token),
            self.lease / 3,
            f"turn lock of session {session_id!r}",
            session_id,
        )
        try:
            yield
        finally:
            await finish(lambda: self._end(keeper, session_id, token), limit, release)

    async def _end(self, keeper: LeaseKeeper, session_id: str, token: str) -> None:
        await keeper.stop()
        await self._release(session_id, token)

    async def _release(self, session_id: str, token: str, sql: str = _LOCK_RELEASE) -> None:
        try:
            await self._db.run("release turn lock", lambda c: c.execute(sql, session_id, token))
        except StoreError as exc:
            # Not worth failing a finished turn over: the lease runs out by itself.
            log.warning(
                "could not release turn lock of session %r: %s",
                session_id,
                exc,
                extra={"session_id": session_id},
            )

    async def _acquire(self, session_id: str, token: str, wait: float) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + wait
        delay = 0.005
        waited = False
        while True:
            attempt = loop.time()
            got = await self._db.run(
                "acquire turn lock",
                lambda c: c.fetchval(_LOCK_ACQUIRE, session_id, token, self.lease),
            )
            if got is not None:
                LOCK_WAIT.observe(attempt - started)  # the waiting, not the last round trip
                return
            if not waited:
                waited = True
                self.waits += 1
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise SessionLockedError(
                    f"session {session_id!r} is locked by another turn (waited {wait:g}s)"
                )
            # Jitter keeps waiters of one session from polling in lockstep.
            delay = min(delay * 2, 0.25)
            await asyncio.sleep(min(remaining, random.uniform(delay / 2, delay)))

    async def _renew(self, session_id: str, token: str) -> bool:
        held = await self._db.run(
            "renew turn lock",
            lambda c: c.fetchval(_LOCK_RENEW, session_id, token, self.lease),
        )
        return held is not None
