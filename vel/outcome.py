"""What became of a turn that did not return normally: stored, or not.

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
"""

from __future__ import annotations

from dataclasses import dataclass

_MARK = "_vel_turn_stored"


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
