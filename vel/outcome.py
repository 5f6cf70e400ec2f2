"""A turn's commit, and what became of a turn that did not return normally: stored, or not.

The rule (README, "Cancelling a turn"): a turn is stored whole or not at all. A cancellation
or failure before the turn's commit is sent stores nothing. Once the commit (one atomic
append) is sent, it completes whatever cancels the caller (bounded by the store's
timeouts), the session lock is released, and only then does the cancellation propagate,
unchanged: that turn is stored. Two ways to tell which happened:

- :func:`turn_committed` on the exception ``Agent.run`` raised (or the ``TimeoutError``
  that ``asyncio.timeout`` / ``asyncio.wait_for`` made of its CancelledError);
- a :class:`TurnReceipt` passed to ``run()`` / ``run_stream()``, read afterwards: it also
  works when nothing is raised to the caller (``anyio.move_on_after`` swallows the
  cancellation, a closed stream raises nothing).

:func:`commit` is where the Agent applies the rule.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import anyio.lowlevel

from vel._shield import settle
from vel.errors import (
    BackpressureError,
    ConfigurationError,
    InvalidInputError,
    StoreFullError,
    TierLeaseError,
)
from vel.settings import Settings, load_settings

_MARK = "_vel_turn_stored"
# Failures a store reports before anything is applied: the turn is not stored. A tier
# lease refuses a 'database' commit inside its one transaction, which rolls back whole.
_NOT_STORED = (InvalidInputError, BackpressureError, StoreFullError, TierLeaseError)


@dataclass
class TurnReceipt:
    """Filled in by ``Agent.run`` / ``run_stream`` as the turn goes.

    Attributes:
        stored: True once the turn's messages are stored (they are, whole); False while
            nothing of the turn is stored (also at the end of a turn that never reached its
            commit); None when the commit was sent but failed with the backend's answer
            lost (a timeout, a dropped connection): the turn may or may not be stored, whole.
        seq: the session's last sequence number after the commit (None unless stored).
    """

    stored: bool | None = False
    seq: int | None = None


def turn_committed(exc: BaseException) -> bool | None:
    """Whether the turn that raised ``exc`` out of ``Agent.run`` was stored.

    Follows ``__cause__`` / ``__context__``, so the ``TimeoutError`` that ``asyncio.timeout``
    or ``asyncio.wait_for`` raises from the turn's CancelledError is understood too.

    Returns:
        True: stored, whole (the cancellation arrived once the commit was sent).
        False: nothing of the turn is stored (also for any exception vel did not mark).
        None: the commit was sent but its outcome is unknown (the backend failed).
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if hasattr(current, _MARK):
            stored: bool | None = getattr(current, _MARK)
            return stored
        current = current.__cause__ or current.__context__
    return False


def mark(exc: BaseException, receipt: TurnReceipt, session_id: str | None) -> None:
    """Record on ``exc`` (escaping a turn past its commit) what the receipt says."""
    if receipt.stored is False or hasattr(exc, _MARK):
        return
    setattr(exc, _MARK, receipt.stored)
    if receipt.stored:
        exc.add_note(
            f"vel: the turn was stored (session {session_id!r}, last seq {receipt.seq}) "
            "before this took effect; see vel.turn_committed()"
        )
    else:
        exc.add_note(
            f"vel: the turn's commit to session {session_id!r} was sent but failed; it may "
            "or may not be stored (whole); see vel.turn_committed()"
        )


def commit_limit() -> float:
    """A safety net around a shielded commit: the store's own deadlines end it first (each
    call within ``VEL_OP_TIMEOUT``; an append retries a few times and may wait out
    backpressure)."""
    try:
        settings = load_settings()
    except ConfigurationError:
        settings = Settings()
    return 4 * settings.op_timeout + settings.backpressure_wait + 5.0


async def commit(
    work: Callable[[], Coroutine[Any, Any, int]], receipt: TurnReceipt, limit: float, what: str
) -> None:
    """Run a turn's commit by the rule above: ``work`` (idempotent: it carries its message
    ids) completes whatever cancels the caller meanwhile, ``receipt`` records the outcome,
    then that cancellation, or else the commit's own error, is raised."""
    receipt.stored = None  # sent: unknown until the store answers
    done = await settle(work, limit, what)
    if done.error is None:
        receipt.stored, receipt.seq = True, done.result
    elif isinstance(done.error, _NOT_STORED):
        receipt.stored = False
    if done.cancel is None:
        # An anyio scope cancelled meanwhile waits for the next checkpoint: this one, so the
        # cancellation propagates after the commit whoever requested it.
        try:
            await anyio.lowlevel.checkpoint_if_cancelled()
        except asyncio.CancelledError as exc:
            done.cancel = exc
    if done.cancel is not None:
        if done.error is not None:
            done.cancel.add_note(f"vel: the turn's commit failed: {done.error!r}")
        raise done.cancel
    if done.error is not None:
        raise done.error
